"""The command line: the typer app (`app`) and one module per command group (`deploy`: plan,
run, deploy, rollback, status, history; `serve`: the service; `hooks`: git push to deploy;
`lab`). Commands are thin: they load the config, call `deploy/`, `service/` or `lab/`, and
print. May import every other folder; nothing imports `cli/`."""
