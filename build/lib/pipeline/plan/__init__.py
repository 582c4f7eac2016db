"""The pure planner: from the config, what git says changed and what was last built and
deployed, decide which images to build and which services to roll out, and why (`planner`),
with Docker's `.dockerignore` rules (`dockerignore`). No I/O of any kind; imports only
`config/`."""
