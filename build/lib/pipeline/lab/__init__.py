"""A lab of real Docker hosts on this machine for the demo, tests and benchmarks: hosts as
network namespaces with their own dockerd (`manage`, `net`), a TLS registry (`registry`), the
sample app (`sample_app`), a bare repo with a working clone (`workrepo`) and `pipeline demo`
(`demo`). May import `deploy/` and below; imports docker and pyroute2 directly (it builds
hosts, it does not deploy to them)."""
