"""`pipeline serve`: the long-running daemon (`daemon`) that turns triggers into queued
events, the one worker that runs them (`worker`), the HTTP server for webhooks and the API
(`server`, `api`) and Prometheus metrics (`metrics`). Imports `deploy/` and below; only `cli/`
imports it."""
