"""The proxy's routes as data and the Caddy config made from them (pure: no I/O)."""
