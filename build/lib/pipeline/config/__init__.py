"""The config model (`model`: one pydantic model per `pipeline.toml` table), loading with
every error located at file:line and key (`load`), durations and cron expressions (`cron`).
The bottom of the flow: imports no other folder, only the shared `errors` and `redact`."""
