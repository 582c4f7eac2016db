"""Applying a plan: the runner of a pass (observe, plan, build, roll out), the per-host
rollout behind health checks with rollback on every host, the health probes, and the
operations on deployed services (rollback, status). May import everything below it
(`build/`, `sources/`, `hosts/`, `state/`, `plan/`, `config/`); never `service/` or `cli/`."""
