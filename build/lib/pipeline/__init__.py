"""pipeline: a GitOps deployment service for Docker hosts."""

__version__ = "0.1.0"
