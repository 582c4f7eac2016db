"""The dashboard `pipeline serve` shows at `/`: every service, host and rollout at a glance,
a run's steps live, a service's releases, the plan, and the deploy, rollback and rebuild
actions behind a login (`routes`, `access`, `views`; templates and static files beside them)."""
