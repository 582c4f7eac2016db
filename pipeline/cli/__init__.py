"""The command line: the click group (`app.app`, its commands imported when they run) and one
module per command group (`deploy`: plan, run, deploy, rollback, status, history; `serve`: the
service; `hooks`: git push to deploy; `lab`; shell completion in `completion`). Commands are
thin: they load the config, call `deploy/`, `service/` or `lab/`, and print. May import every
other folder; nothing imports `cli/`."""
