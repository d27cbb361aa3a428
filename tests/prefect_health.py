"""Whether a Prefect server answers: for the tests and benchmarks that start one and wait for it."""

from __future__ import annotations

import urllib.request


def prefect_api_healthy(api: str) -> bool:
    """True once ``api`` (``http://host:port/api``) answers its health check."""
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
