"""The temporary Prefect API server the CLI starts before it imports Prefect (trtforge.flows.temporary_api).

Each case runs in a process of its own with no Prefect settings from the test session, as the
CLI does: under pytest Prefect is already imported, and then no temporary server is started.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import urllib.request
from pathlib import Path

from trtforge.flows.temporary_api import api_healthy

from tests.conftest import REPO
from tests.waiting import wait_until

# One Prefect home for the module: its first use migrates the database.
PREFECT_HOME = Path(tempfile.mkdtemp(prefix="trtforge-temporary-api-prefect-"))
DEADLINE_S = 300


def clean_environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TRTFORGE_"))}
    return {**env, "PREFECT_HOME": str(PREFECT_HOME), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(DEADLINE_S), **extra}


def python(code: str, env: dict[str, str], **options) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True, text=True, timeout=DEADLINE_S, **options
    )


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited: only its parent's wait is missing.
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0


def test_the_library_the_cli_imports_while_the_server_decides_imports_no_prefect_and_is_what_the_flows_import():
    flow_sources = [*(REPO / "flows").glob("*.py"), *(REPO / "tasks").glob("*.py")]
    imported = set()
    for source in flow_sources:
        for node in ast.parse(source.read_text()).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trtforge."):
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names if alias.name.startswith("trtforge."))
    library = sorted(m for m in imported if not m.startswith(("trtforge.tasks", "trtforge.flows")))
    done = python(
        f"""
        import sys
        from trtforge.cli import _import_the_flows_library
        _import_the_flows_library()
        print("prefect" in sys.modules)
        print("matplotlib.pyplot" in sys.modules)
        print(" ".join(m for m in {library!r} if m not in sys.modules))
        """,
        clean_environment(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    prefect_imported, pyplot_imported, *missing = done.stdout.splitlines()
    assert prefect_imported == "False"
    assert pyplot_imported == "True"
    assert missing == [""], f"add these to trtforge.flows.LIBRARY_MODULES: {missing}"


def test_a_flow_runs_on_it_and_its_logs_reach_it_before_it_stops():
    done = python(
        """
        import os
        from trtforge.flows.temporary_api import TemporaryApi
        api = TemporaryApi.start()
        assert os.environ["PREFECT_API_URL"] == api.url, os.environ.get("PREFECT_API_URL")
        from prefect import flow, get_run_logger
        api.wait_ready()

        @flow
        def hello():
            get_run_logger().info("hello from the flow")
            return 42

        assert hello() == 42
        api.stop()
        print(api.url, "PREFECT_API_URL" in os.environ, api.process.returncode)
        """,
        clean_environment(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    url, still_set, exit_code = done.stdout.split()
    assert still_set == "False"
    assert exit_code != "None"
    assert not api_healthy(url)
    # Logs drained before the server stopped: no retries against a closed port.
    assert "Error logging to API" not in done.stderr, done.stderr[-3000:]


def test_no_server_where_a_profile_names_an_api():
    home = Path(tempfile.mkdtemp(prefix="trtforge-temporary-api-profile-"))
    (home / "profiles.toml").write_text('active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://prefect.internal:4200/api"\n')
    done = python(
        "from trtforge.flows.temporary_api import TemporaryApi; print(TemporaryApi.start())",
        clean_environment(PREFECT_HOME=str(home)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "None"


def test_no_server_where_temporary_servers_are_turned_off():
    done = python(
        "from trtforge.flows.temporary_api import TemporaryApi; print(TemporaryApi.start())",
        clean_environment(PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="false"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "None"


def test_a_server_that_cannot_start_is_one_error_line_from_the_cli(tmp_path, digits_checkpoint):
    unwritable = tmp_path / "no-such-folder" / "prefect.db"
    env = clean_environment(PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{unwritable}")
    command = ["run", "examples/digits/spec.yaml", "--checkpoint", str(digits_checkpoint), "--artifacts", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-c", "from trtforge.cli import main; main()", *command],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "Prefect's temporary API server exited with code" in errors[0]
    assert "set PREFECT_API_URL to a running server" in errors[0]


def test_the_server_stops_itself_when_its_parent_is_killed():
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import sys
                from trtforge.flows.temporary_api import TemporaryApi
                api = TemporaryApi.start()
                api.wait_ready()
                print(api.process.pid, api.url, flush=True)
                sys.stdin.read()
                """
            ),
        ],
        cwd=REPO,
        env=clean_environment(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        server_pid, url = parent.stdout.readline().split()
        assert api_healthy(url)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    wait_until(
        lambda: not process_exists(int(server_pid)), timeout=DEADLINE_S, what=f"the server (pid {server_pid}) gone with its killed parent"
    )
    assert not api_healthy(url)


def test_the_cli_exit_delivers_a_flows_last_logs_to_a_configured_server(tmp_path):
    from trtforge.flows.temporary_api import SERVER_ENVIRONMENT, SERVER_NEEDED, free_loopback_port

    port = free_loopback_port()
    url = f"http://127.0.0.1:{port}/api"
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "trtforge.flows.temporary_api", str(port)],
            cwd=REPO,
            env={**clean_environment(), **SERVER_ENVIRONMENT},
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    try:
        assert server.stdout.readline().strip() == SERVER_NEEDED
        wait_until(lambda: api_healthy(url), timeout=DEADLINE_S, what="the server answering", process=server, log=tmp_path / "server.log")
        done = python(
            """
            from prefect import flow, get_run_logger
            from trtforge.cli import _leave

            @flow
            def hello():
                get_run_logger().info("the last words of the flow")

            hello()
            _leave(0)
            """,
            clean_environment(PREFECT_API_URL=url),
        )
        assert done.returncode == 0, done.stderr[-3000:]
        request = urllib.request.Request(f"{url}/logs/filter", data=b"{}", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            messages = [entry["message"] for entry in json.load(response)]
        assert "the last words of the flow" in messages, messages
    finally:
        server.terminate()
        server.wait(timeout=60)
