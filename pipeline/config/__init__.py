"""The config model (`model`: one msgspec Struct per `pipeline.toml` table; `values`: values
with rules of their own, as types), loading with errors located at file:line and key (`load`),
durations and cron expressions (`cron`), services' env files (`envfile`).
The bottom of the flow: imports no other folder, only the shared `errors` and `redact`."""
