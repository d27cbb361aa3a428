"""Prefect's temporary API server, started early: the CLI starts it before it imports a flow."""

from __future__ import annotations

import threading

from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL


def start_in_background() -> threading.Thread | None:
    """Start the temporary server on a thread (its subprocess boots on another core), or None where an API is
    configured. The flow's client then finds it running: Prefect keeps one per port and shares the default. A
    failed start is left to the client's own start, which reports it."""
    # As Prefect's client decides: a temporary server wherever no API is configured.
    if PREFECT_API_URL.value():
        return None

    def start() -> None:
        try:
            SubprocessASGIServer().start()
        except Exception:  # the client's own start raises it again, where the user sees it
            return

    thread = threading.Thread(target=start, name="prefect-api-start", daemon=True)
    thread.start()
    return thread
