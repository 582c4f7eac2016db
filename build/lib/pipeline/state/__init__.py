"""The state database and the only code that writes it: the schema (`schema`) and its Alembic
migrations (`migrate`, `migrations/`), runs, builds, releases and deployments (`store`), step
records (`steps`), per-host rollout records (`rollouts`), release settings and pins
(`rollbacks`), leases (`leases`) and the durable event queue (`queue`). The only SQLAlchemy
user. Imports `plan/` record types and `config/`, nothing above."""
