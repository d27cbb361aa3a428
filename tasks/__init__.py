"""Prefect tasks: thin wrappers over trtforge's stage functions (caching, logging, artifacts)."""
