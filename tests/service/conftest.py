"""Fixtures of the service's lab tests: a project on the lab and the `pipeline serve` processes
started for it (`serve_fixtures`, shared with the dashboard's tests)."""

from serve_fixtures import serve, sp

__all__ = ["serve", "sp"]
