"""The state database and the only code that writes it: the schema (`schema`), runs, steps,
builds, releases and deployments (`store`), leases (`leases`) and the durable event queue
(`queue`). The only SQLAlchemy user. Imports `plan/` record types and `config/`, nothing
above."""
