"""The watcher and `trtforge ci` against a real Prefect server with a real process worker.

One server (`prefect server start`, its own PREFECT_HOME in a temp folder, a free loopback
port) and one `prefect worker start` on a process pool serve the whole module. The deployment
`retrain-to-engine-scheduled` is deployed with `prefect deploy` from a copy of
infra/prefect.yaml that overrides its pool, schedule (a short interval, paused), parameters and
working directory. Both processes are stopped by process group at the end, failed tests or not.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml
from trtforge.flows.temporary_api import api_healthy

from tests.conftest import DIGITS_DIR, DIGITS_SPEC, REPO
from tests.waiting import wait_until
from trtforge.hashing import sha256_file
from trtforge.registry import open_registry

POOL = "trtforge-test-cpu"
DEPLOYMENT = "watch-checkpoints/retrain-to-engine-scheduled"
SCHEDULE_SECONDS = 10
BIN = Path(sys.executable).parent
_PR_SET_PDEATHSIG = 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: its own process group (stopped as one), and killed if the test run dies outright."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as output:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)


def _stop(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM to the process group, SIGKILL once ``grace`` runs out."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def write_spec(folder: Path, incoming: Path) -> Path:
    """The digits example with only its fp32 onnxruntime target, watching ``incoming``."""
    data = yaml.safe_load(DIGITS_SPEC.read_text())
    data.update(
        model=str(DIGITS_DIR / "digits_model.py") + ":build_model",
        train=str(DIGITS_DIR / "digits_train.py") + ":train",
        checkpoint=str(folder / "unused.safetensors"),
        targets=[t for t in data["targets"] if t["backend"] == "onnxruntime" and t["precision"] == "fp32"],
        watch={"location": str(incoming), "pattern": "*.safetensors"},
    )
    data["eval"]["data"] = str(DIGITS_DIR / "eval.npz")
    data["calibration"]["data"] = str((DIGITS_DIR / data["calibration"]["data"]).resolve())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Stack:
    """What the module's tests share: the server, the deployed spec and its watch folder and registry."""

    def __init__(self, root: Path, api: str, env: dict[str, str]):
        self.root = root
        self.api = api
        self.env = env
        self.incoming = root / "incoming"
        self.spec = write_spec(root / "spec", self.incoming)
        self.registry = f"file://{root / 'registry'}"
        self.artifacts = root / "artifacts"

    def fresh_registry(self) -> str:
        return f"file://{self.root / ('registry-' + uuid.uuid4().hex[:8])}"


def _deploy_override(stack: Stack) -> Path:
    """infra/prefect.yaml with this test's pool, a paused short-interval schedule, parameters and checkout."""
    project = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    (deployment,) = [d for d in project["deployments"] if d["name"] == "retrain-to-engine-scheduled"]
    deployment["work_pool"] = {"name": POOL, "work_queue_name": "default"}
    deployment["schedules"] = [{"interval": SCHEDULE_SECONDS, "active": False}]
    deployment["parameters"] = {"spec_path": str(stack.spec), "registry": stack.registry, "artifacts_dir": str(stack.artifacts)}
    project["deployments"] = [deployment]
    project["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    project.pop("definitions", None)
    path = stack.root / "prefect.yaml"
    path.write_text(yaml.safe_dump(project, sort_keys=False))
    return path


class Server:
    def __init__(self, root: Path):
        self.root = root
        self.api = f"http://127.0.0.1:{_free_port()}/api"
        self.log = root / "server.log"
        home = root / "prefect-home"
        home.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TRTFORGE_", "AWS_"))}
        self.env.update(
            PREFECT_HOME=str(home),
            PREFECT_API_URL=self.api,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_UI_ENABLED="false",
            PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1",
            # Services these tests do not use, off to spare the CPU.
            PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
            PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED="false",
            PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED="false",
            PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED="false",
            # A run waiting for another's build slot asks again this often (default 30 s).
            PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS="2",
            PREFECT_WORKER_QUERY_SECONDS="1",
            PREFECT_WORKER_PREFETCH_SECONDS="0",
            PREFECT_LOGGING_TO_API_BATCH_INTERVAL="0.5",
            # Several processes share two cores here: OpenMP threads spinning against each other make
            # torch in the flow runs many times slower than one thread each.
            OMP_NUM_THREADS="1",
        )
        host, port = self.api.removeprefix("http://").removesuffix("/api").split(":")
        self.process = _start([str(BIN / "prefect"), "server", "start", "--host", host, "--port", port], self.env, self.log)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start`, not yet waited for: it boots while the next fixtures do their work."""
    server = Server(tmp_path_factory.mktemp("prefect-server"))
    try:
        yield server
    finally:
        _stop(server.process)


@pytest.fixture(scope="module")
def stack(prefect_server, digits_checkpoint):
    """The server ready, a process worker polling the test pool, and the scheduled deployment deployed there."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.workers.process import ProcessWorker

    root, api, env = prefect_server.root, prefect_server.api, prefect_server.env
    wait_until(lambda: api_healthy(api), timeout=240, what="prefect server", process=prefect_server.process, log=prefect_server.log)
    worker_log = root / "worker.log"
    worker = None
    try:
        with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(root / "client-storage")}):
            with get_client(sync_client=True) as client:
                client.create_work_pool(
                    WorkPoolCreate(name=POOL, type="process", base_job_template=ProcessWorker.get_default_base_job_template())
                )
            worker = _start([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"], env, worker_log)
            built = Stack(root, api, env)
            built.incoming.mkdir()
            deploy = subprocess.run(
                [
                    str(BIN / "prefect"),
                    "--no-prompt",
                    "deploy",
                    "--prefect-file",
                    str(_deploy_override(built)),
                    "--name",
                    "retrain-to-engine-scheduled",
                ],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=240,
            )
            assert deploy.returncode == 0, deploy.stdout + deploy.stderr

            def deployment_ready() -> bool:
                with get_client(sync_client=True) as client:
                    status = client.read_deployment_by_name(DEPLOYMENT).status
                return getattr(status, "value", status) == "READY"

            wait_until(deployment_ready, timeout=180, what="worker polling the deployment", interval=1, process=worker, log=worker_log)
            try:
                yield built
            finally:
                # Flows run in this process log to the API in the background: send it all while the server is up.
                APILogHandler().flush()
    finally:
        if worker is not None:
            _stop(worker)


def trigger(wait: bool = True, **parameters):
    """A manual run of the deployment (its own parameters unless overridden), with the id its summary is stored under."""
    from prefect.deployments import run_deployment

    report_id = uuid.uuid4().hex
    flow_run = run_deployment(DEPLOYMENT, parameters={**parameters, "report_id": report_id}, timeout=0, as_subflow=False)
    return (finish(flow_run.id) if wait else flow_run), report_id


def run_summary(registry: str, report_id: str):
    """What the run returned, as it stored it in the registry: data to assert on, never its log lines."""
    from trtforge.ci import read_run_report

    summary = read_run_report(open_registry(registry), "digits-cnn", report_id)
    assert summary is not None, f"the run left no summary under {report_id}"
    return summary


def finish(flow_run_id, timeout: float = 300):
    from prefect.client.orchestration import get_client

    def final():
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(flow_run_id)
        return flow_run if flow_run.state is not None and flow_run.state.is_final() else None

    return wait_until(final, timeout=timeout, what=f"flow run {flow_run_id} in a final state", interval=1)


def run_log(flow_run_id) -> str:
    """Everything the run has logged to the API so far (its own lines and its tasks')."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    return "\n".join(log.message for log in logs)


def wait_for_log(flow_run_id, text: str, timeout: float = 120) -> None:
    """Log lines reach the server in batches after the run ends: poll for ``text`` up to a deadline."""
    try:
        wait_until(lambda: text in run_log(flow_run_id), timeout=timeout, what=f"{text!r} logged by flow run {flow_run_id}", interval=1)
    except AssertionError as err:
        raise AssertionError(f"{err}; it logged:\n{run_log(flow_run_id)}") from None


def trtforge_ci(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "trtforge"), "ci", *args], cwd=stack.root, env=stack.env, capture_output=True, text=True, timeout=400)


def junit_cases(path: Path) -> dict[str, ElementTree.Element]:
    return {case.get("name"): case for case in ElementTree.parse(path).getroot().iter("testcase")}


def test_triggered_deployment_builds_a_new_checkpoint_then_is_up_to_date(stack, digits_checkpoint):
    checkpoint = stack.incoming / "digits-1.safetensors"
    shutil.copy(digits_checkpoint, checkpoint)

    first, first_report = trigger()
    assert first.state.is_completed(), f"{first.state.name}: {first.state.message}\n{run_log(first.id)}"
    registry = open_registry(stack.registry)
    assert registry.versions("digits-cnn") == [1]
    assert registry.manifest("digits-cnn", 1).lineage.checkpoint_sha256 == sha256_file(checkpoint)
    built = run_summary(stack.registry, first_report)
    assert built.published and built.version == 1 and not built.up_to_date
    wait_for_log(first.id, "digits-1.safetensors")

    second, second_report = trigger()
    assert second.state.is_completed(), second.state.message
    again = run_summary(stack.registry, second_report)
    assert again.up_to_date and again.version == 1 and not again.published
    assert again.message == "up to date: version 1"
    assert registry.versions("digits-cnn") == [1]


def test_interval_schedule_fires_a_run(stack):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        (schedule,) = deployment.schedules
        assert not schedule.active, "the test override deploys the schedule paused"
        client.update_deployment_schedule(deployment.id, schedule.id, active=True)
    try:

        def scheduled_run():
            from prefect.client.schemas.filters import (
                DeploymentFilter,
                DeploymentFilterId,
                FlowRunFilter,
                FlowRunFilterState,
                FlowRunFilterStateType,
            )

            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=["SCHEDULED"]))),
                )
            return next((run for run in runs if run.auto_scheduled), None)

        fired = wait_until(scheduled_run, timeout=60, what=f"a run of the every-{SCHEDULE_SECONDS}-s schedule", interval=1)
    finally:
        with get_client(sync_client=True) as client:
            client.update_deployment_schedule(deployment.id, schedule.id, active=False)
    done = finish(fired.id)
    assert done.state.is_completed(), f"{done.state.name}: {done.state.message}"
    assert done.auto_scheduled
    wait_for_log(done.id, "newest checkpoint")


def test_ci_on_the_deployment_publishes_the_digits_example(stack, digits_checkpoint):
    registry = stack.fresh_registry()
    summary, junit = stack.root / "ci-pass" / "summary.md", stack.root / "ci-pass" / "junit.xml"
    result = trtforge_ci(
        stack,
        "--spec",
        str(stack.spec),
        "--checkpoint",
        str(digits_checkpoint),
        "--deployment",
        "retrain-to-engine-scheduled",
        "--registry",
        registry,
        "--summary",
        str(summary),
        "--junit",
        str(junit),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "published version 1" in result.stdout
    cases = junit_cases(junit)
    (gate_tag,) = [name for name in cases if name != "publish"]
    assert gate_tag.startswith("ort") and "-fp32-" in gate_tag
    assert cases[gate_tag].find("failure") is None and cases["publish"].find("failure") is None
    text = summary.read_text()
    assert text.startswith("# trtforge ci: digits-cnn: passed") and "published version 1" in text
    manifest = open_registry(registry).manifest("digits-cnn", 1)
    assert manifest.lineage.checkpoint_sha256 == sha256_file(digits_checkpoint)
    assert set(manifest.targets) == {gate_tag}


def degrade(checkpoint: Path, dest: Path) -> Path:
    """The same network with its output classes rotated by one: confidently wrong on almost every digit."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(checkpoint))
    for name in ("classifier.3.weight", "classifier.3.bias"):
        weights[name] = weights[name].roll(1, dims=0).contiguous()
    save_file(weights, str(dest))
    return dest


def test_ci_on_the_deployment_with_a_degraded_checkpoint_fails_and_publishes_nothing(stack, digits_checkpoint):
    registry = stack.fresh_registry()
    degraded = degrade(digits_checkpoint, stack.root / "degraded.safetensors")
    summary, junit = stack.root / "ci-fail" / "summary.md", stack.root / "ci-fail" / "junit.xml"
    result = trtforge_ci(
        stack,
        "--spec",
        str(stack.spec),
        "--checkpoint",
        str(degraded),
        "--deployment",
        "retrain-to-engine-scheduled",
        "--registry",
        registry,
        "--summary",
        str(summary),
        "--junit",
        str(junit),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    cases = junit_cases(junit)
    (gate_tag,) = [name for name in cases if name != "publish"]
    failure = cases[gate_tag].find("failure")
    assert failure is not None and failure.get("type") == "gate"
    accuracy = float(failure.get("message").split("top-1 accuracy ")[1].split(" ")[0])
    assert accuracy < 0.5, failure.get("message")
    assert "< threshold 0.9500" in failure.get("message")
    assert cases["publish"].find("failure") is not None
    assert summary.read_text().startswith("# trtforge ci: digits-cnn: FAILED")
    assert open_registry(registry).versions("digits-cnn") == []


def test_two_triggers_for_one_checkpoint_at_once_publish_one_version(stack):
    registry = stack.fresh_registry()
    runs = [trigger(wait=False, registry=registry) for _ in range(2)]
    done = [finish(run.id) for run, _ in runs]
    assert all(run.state.is_completed() for run in done), [run.state.message for run in done]
    assert max(run.start_time for run in done) < min(run.end_time for run in done), "the two runs did not overlap"
    assert open_registry(registry).versions("digits-cnn") == [1]
    summaries = [run_summary(registry, report_id) for _, report_id in runs]
    assert sorted((s.published, s.up_to_date, s.version) for s in summaries) == [(False, True, 1), (True, False, 1)]


def test_ci_in_process_uses_the_server_and_reports_up_to_date_or_a_missing_checkpoint(stack):
    """Without --deployment the flow runs in this process (against the server in PREFECT_API_URL)."""
    from typer.testing import CliRunner

    from trtforge.cli import app
    from trtforge.errors import TrtforgeError

    junit = stack.root / "ci-local" / "junit.xml"
    args = ["ci", "--spec", str(stack.spec), "--registry", stack.registry, "--artifacts", str(stack.artifacts), "--junit", str(junit)]
    up_to_date = CliRunner().invoke(app, [*args, "--checkpoint", str(stack.incoming / "digits-1.safetensors")])
    assert up_to_date.exit_code == 0, up_to_date.output
    assert "up to date: version 1" in up_to_date.output
    assert junit_cases(junit)["publish"].find("failure") is None

    missing = CliRunner().invoke(app, [*args, "--checkpoint", str(stack.root / "no-such.safetensors")])
    assert missing.exit_code == 1
    failure = junit_cases(junit)["publish"].find("failure")
    assert failure is not None and "no-such.safetensors does not exist" in failure.get("message")

    undeployed = CliRunner().invoke(app, [*args, "--checkpoint", str(stack.incoming / "digits-1.safetensors"), "--deployment", "no-such"])
    assert isinstance(undeployed.exception, TrtforgeError)
    assert str(undeployed.exception).startswith(f"no deployment watch-checkpoints/no-such on the Prefect server at {stack.api}")
