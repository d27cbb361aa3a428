"""The flow tests' harness: a Prefect API for the modules that run flows, a served build-target
deployment, and the digits spec copied with changes. Registered in tests/conftest.py; modules
that run flows use it with ``pytestmark = pytest.mark.usefixtures("prefect_api")``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import DIGITS_DIR, DIGITS_SPEC


@pytest.fixture(scope="session")
def prefect_server_url(tmp_path_factory) -> str:
    """One Prefect server per test process (each xdist worker has its own), on a database of its own.

    prefect_test_harness starts a server on a fresh database, whose migrations make each start
    cost ~25 s: paid once per module, that was a tenth of the suite. The server lives for the
    session; only the modules that ask for ``prefect_api`` point Prefect at it."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings
    from trtforge.flows.temporary_api import drain_prefect_workers, free_loopback_port

    database = tmp_path_factory.mktemp("prefect-server") / "prefect.db"
    # A port taken meanwhile makes the server exit with code 3, and start() then tries another.
    server = SubprocessASGIServer(port=free_loopback_port())
    with temporary_settings(updates={PREFECT_SERVER_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{database}"}):
        server.start(timeout=120)
    try:
        yield server.api_url
    finally:
        drain_prefect_workers()
        server.stop()


@pytest.fixture(scope="module")
def prefect_api(prefect_server_url):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server_url}):
        yield


def write_spec(folder: Path, checkpoint: Path, **changes) -> Path:
    """A copy of the digits spec living in ``folder``, pointing back at the example's code and data."""
    data = yaml.safe_load(DIGITS_SPEC.read_text())
    data.update(
        model=str(DIGITS_DIR / "digits_model.py") + ":build_model",
        train=str(DIGITS_DIR / "digits_train.py") + ":train",
        checkpoint=str(checkpoint),
    )
    data["eval"]["data"] = str(DIGITS_DIR / "eval.npz")
    data["calibration"]["data"] = str((DIGITS_DIR / data["calibration"]["data"]).resolve())
    data["targets"] = [t for t in data["targets"] if t["precision"] == "fp32"]
    data.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_flow(spec: Path, tmp_path: Path, **kwargs):
    from trtforge.flows.retrain_to_engine import retrain_to_engine

    return retrain_to_engine(
        spec_path=str(spec), registry=f"file://{tmp_path / 'registry'}", artifacts_dir=str(tmp_path / "artifacts"), **kwargs
    )


@pytest.fixture()
def served_build_target(tmp_path):
    """flows/build_target.py served as deployment build-target/test-builders by a real `serve` process."""
    import os
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    from tests.conftest import REPO
    from tests.waiting import wait_until

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-c", "from trtforge.flows.build_target import build_target; build_target.serve(name='test-builders')"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def deployment_ready() -> bool:
            with get_client(sync_client=True) as client:
                try:
                    deployment = client.read_deployment_by_name("build-target/test-builders")
                except ObjectNotFound:
                    return False
            return getattr(deployment.status, "value", deployment.status) == "READY"

        wait_until(deployment_ready, timeout=120, what="serve's deployment ready", interval=1, process=process, log=tmp_path / "serve.log")
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
