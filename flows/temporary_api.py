"""Prefect's temporary API server for a run in this process, started before this process imports Prefect.

Without PREFECT_API_URL, Prefect's client starts a temporary server itself (``SubprocessASGIServer``):
it imports Prefect's server module in the client's process (about 5 s on a 2-core machine) and only
then starts the server's subprocess, which imports that module again before it answers. Here the
subprocess is this module's ``main``, started first: it reads Prefect's settings (environment,
profile, ``prefect.toml``) exactly as the client would, and says on its first line whether a server
is needed. Where one is, the caller sets PREFECT_API_URL to it before importing Prefect, so every
part of Prefect in this process (client, events, heartbeats) uses that server, while its start
overlaps the flow's own imports. Where an API is configured, or temporary servers are turned off,
the child exits and Prefect's client does what it always does.

This module imports nothing of Prefect at the top: the caller imports it before Prefect.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from trtforge.errors import TrtforgeError

SERVER_NEEDED = "trtforge-temporary-api: starting"
NO_SERVER_NEEDED = "trtforge-temporary-api: not needed"
# What Prefect's own temporary server runs with: no UI, and only the services an ephemeral server needs.
SERVER_ENVIRONMENT = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
STOP_TIMEOUT_S = 30
DRAIN_TIMEOUT_S = 10
HEALTH_POLL_S = 0.1
PARENT_POLL_S = 1.0


class TemporaryApi:
    """A temporary API server in a child process, with PREFECT_API_URL pointing at it until ``stop``."""

    def __init__(self, process: subprocess.Popen, address: str, log: Path):
        self.process, self.address, self.log = process, address, log
        self.url = f"{address}/api"

    @classmethod
    def start(cls, while_deciding: Callable[[], object] = lambda: None) -> TemporaryApi | None:
        """The server, started; None where the run needs none of its own (an API is configured, temporary servers
        are turned off, or Prefect is already imported here, as under ``prefect_test_harness``).

        ``while_deciding`` runs while the child reads Prefect's settings: work that imports no Prefect.
        """
        if "PREFECT_API_URL" in os.environ or "prefect" in sys.modules:
            return None
        port = free_loopback_port()
        log = Path(tempfile.mkstemp(prefix="trtforge-prefect-api-", suffix=".log")[1])
        with open(log, "w") as errors:
            process = subprocess.Popen(
                [sys.executable, "-m", "trtforge.flows.temporary_api", str(port)],
                env={**os.environ, **SERVER_ENVIRONMENT},
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
        try:
            while_deciding()
        except BaseException:
            process.kill()
            process.wait()
            log.unlink(missing_ok=True)
            raise
        decision = process.stdout.readline().strip()
        process.stdout.close()
        if decision != SERVER_NEEDED:
            # Not needed, or the child failed before deciding (Prefect not installed): Prefect's own start reports that.
            process.wait()
            log.unlink(missing_ok=True)
            return None
        api = cls(process, f"http://127.0.0.1:{port}", log)
        os.environ["PREFECT_API_URL"] = api.url
        return api

    def wait_ready(self) -> None:
        """Return once the server answers its health check, within Prefect's startup timeout (as Prefect's own
        temporary server); a server that exits or stays silent is a ``TrtforgeError``."""
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        timeout_s = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        deadline = time.monotonic() + timeout_s
        while not api_healthy(self.url):
            if self.process.poll() is not None:
                raise TrtforgeError(
                    f"Prefect's temporary API server exited with code {self.process.returncode} before it answered: "
                    f"{self._log_tail()}; set PREFECT_API_URL to a running server (prefect server start)"
                )
            if time.monotonic() > deadline:
                raise TrtforgeError(
                    f"Prefect's temporary API server did not answer within {timeout_s:g} s "
                    "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); set PREFECT_API_URL to a running server "
                    "or retry when the machine is less busy"
                )
            time.sleep(HEALTH_POLL_S)

    def stop(self) -> None:
        drain_prefect_workers()
        os.environ.pop("PREFECT_API_URL", None)
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.unlink(missing_ok=True)

    def _log_tail(self, lines: int = 2) -> str:
        """The last lines the server printed that say something: an exception's own line, not its traceback."""
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        said = [line for line in text.splitlines() if line.strip() and not line[0].isspace() and not line.startswith(("Traceback", "("))]
        return " | ".join(said[-lines:]) or "it printed nothing"


def drain_prefect_workers() -> None:
    """Prefect sends logs and events from background workers that drain at exit: here they go to the server before
    it stops (else they retry against a closed port for a minute), or before the CLI exits without Python's shutdown."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    EventsWorker.drain_all(timeout=DRAIN_TIMEOUT_S)


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def api_healthy(url: str) -> bool:
    """True once the Prefect API at ``url`` (``http://host:port/api``) answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _exit_with_parent(parent: int) -> None:
    """A parent killed outright (SIGKILL, a CI job's timeout) cannot stop its server: the server then stops itself."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(0)


def main(port: int) -> None:
    """The child: decide as Prefect's client would, say so, then serve the API until terminated."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        print(NO_SERVER_NEEDED, flush=True)
        return
    print(SERVER_NEEDED, flush=True)
    # Anything the server prints goes to the log the parent reads on failure, not into the closed pipe.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    import uvicorn

    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=port, log_level="error", lifespan="on")


if __name__ == "__main__":
    main(int(sys.argv[1]))
