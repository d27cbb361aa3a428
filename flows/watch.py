"""The checkpoint watcher: scheduled retrain-to-engine runs, and the way CI jobs start a run on a Prefect server.

``watch`` looks at the spec's watch location (or takes the checkpoint it is given), and runs
``retrain_to_engine`` on the newest checkpoint only when no version in the registry was built
from that checkpoint and spec; otherwise it logs ``up to date: version N`` and builds nothing.
Runs for one model hold a Prefect global concurrency limit named after it (one slot) from the
look to the publish, so a second run for the same checkpoint waits, then finds the first one's
version and is up to date.

``run_on_deployment`` is what ``trtforge ci --deployment`` calls: it starts ``watch`` on a
deployment, waits for it, and reads the run's summary back from the registry, which the CI
machine and the worker share (Prefect's result storage usually is not shared).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL
from trtforge.flows.retrain_to_engine import retrain_to_engine
from trtforge.tasks.remote_build import deployment_problem
from trtforge.tasks.watch import local_checkpoint_task, newest_checkpoint_task, retrain_into_task

from trtforge.ci import read_run_report, write_run_report
from trtforge.errors import RunFailed, SpecError, TrtforgeError
from trtforge.lineage import published_version, run_inputs
from trtforge.registry import open_registry
from trtforge.spec import ModelSpec, load_spec
from trtforge.stages.publish import registry_uri
from trtforge.summary import RunSummary

WATCH_FLOW = "watch-checkpoints"
SCHEDULED_DEPLOYMENT = "retrain-to-engine-scheduled"
# Builds of a model that outlive a lapsed lease only cost duplicate work: the registry's version lock
# keeps publishing safe, so a failed lease renewal must not kill a long GPU build.
_LEASE_SECONDS = 300


def build_lock_name(model: str) -> str:
    return f"trtforge-build-{model}"


def _ensure_build_lock(name: str) -> None:
    """Global concurrency limits must exist before use: the first run of a model creates its one-slot limit."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass


def _build_if_new(spec: ModelSpec, spec_path: str, checkpoint: str | None, uri: str, artifacts: Path) -> RunSummary:
    logger = get_run_logger()
    if checkpoint is None:
        if spec.watch.retrain_first:
            retrain_into_task(spec, artifacts / "retrained" / spec.name)
        checkpoint = newest_checkpoint_task(spec).uri
    local = local_checkpoint_task(checkpoint, artifacts / "checkpoints" / spec.name)
    inputs = run_inputs(spec, local)
    existing = published_version(open_registry(uri), spec, inputs)
    checkpoint_sha256 = inputs.checkpoint_sha256
    if existing is not None:
        logger.info("up to date: version %d (checkpoint %s, sha256 %s)", existing, checkpoint, checkpoint_sha256[:12])
        return RunSummary(
            model=spec.name, registry=uri, version=existing, up_to_date=True, passed=True, message=f"up to date: version {existing}"
        )
    logger.info("new checkpoint %s (sha256 %s): building", checkpoint, checkpoint_sha256[:12])
    return retrain_to_engine(spec_path=spec_path, checkpoint=str(local), registry=uri, artifacts_dir=str(artifacts), inputs=inputs)


@flow(name=WATCH_FLOW, result_serializer="json")
def watch(
    spec_path: str,
    checkpoint: str | None = None,
    registry: str | None = None,
    artifacts_dir: str = "artifacts",
    report_id: str | None = None,
) -> RunSummary:
    """Build the newest checkpoint of the spec's watch location (or ``checkpoint``: a path or s3:// URI) unless already built.

    With ``report_id``, the run's summary is also written to the registry for ``trtforge ci --deployment``.
    Raises RunFailed, carrying the summary, when the run does not end published or up to date.
    """
    spec = load_spec(spec_path)
    if checkpoint is None and spec.watch is None:
        raise SpecError(
            f"spec {spec_path} has no 'watch' section: add watch: {{location: FOLDER or s3://BUCKET/PREFIX}} to it, "
            "or pass the checkpoint to build"
        )
    uri = registry_uri(spec, registry)
    lock = build_lock_name(spec.name)
    _ensure_build_lock(lock)
    failure: RunFailed | None = None
    with concurrency(lock, occupy=1, lease_duration=_LEASE_SECONDS, strict=True, raise_on_lease_renewal_failure=False):
        try:
            summary = _build_if_new(spec, spec_path, checkpoint, uri, Path(artifacts_dir).resolve())
        except RunFailed as err:
            summary, failure = err.summary, err
        except TrtforgeError as err:
            summary = err.summary or RunSummary(model=spec.name, registry=uri, message=str(err))
            failure = RunFailed(str(err), summary)
    if report_id is not None:
        write_run_report(open_registry(uri), summary, report_id)
    if failure is not None:
        raise failure
    return summary


def _api_url() -> str:
    url = PREFECT_API_URL.value()
    if not url:
        raise TrtforgeError("--deployment needs a Prefect server: set PREFECT_API_URL, e.g. http://prefect.internal:4200/api")
    return url


def _check_deployment(name: str, api: str) -> None:
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
            flow_name = client.read_flow(deployment.flow_id).name
        except ObjectNotFound:
            raise TrtforgeError(
                f"no deployment {name} on the Prefect server at {api}: deploy it with prefect deploy --prefect-file infra/prefect.yaml --all"
            ) from None
        except httpx.HTTPError as err:
            raise TrtforgeError(f"cannot reach the Prefect server at {api} ({type(err).__name__}): check PREFECT_API_URL") from None
    if flow_name != WATCH_FLOW:
        raise TrtforgeError(
            f"deployment {name} runs flow {flow_name!r}; --deployment takes a deployment of {WATCH_FLOW!r}, "
            f"e.g. {WATCH_FLOW}/{SCHEDULED_DEPLOYMENT}"
        )
    problem = deployment_problem(name)
    if problem is not None:
        raise TrtforgeError(f"deployment {name}: {problem}")


def run_on_deployment(
    deployment: str,
    spec_path: str,
    model: str,
    checkpoint: str,
    registry: str,
    poll_seconds: float = 5.0,
    on_started: Callable[[str], None] | None = None,
) -> RunSummary:
    """Run ``watch`` on ``deployment`` (``flow/deployment``, or a deployment name of the watch flow) and wait for it.

    ``spec_path`` and ``checkpoint`` must name what the worker can read: paths in its checkout or
    on shared storage, or s3:// URIs; ``registry`` must be one both sides reach.
    """
    api = _api_url()
    name = deployment if "/" in deployment else f"{WATCH_FLOW}/{deployment}"
    _check_deployment(name, api)
    report_id = uuid.uuid4().hex
    parameters = {"spec_path": spec_path, "checkpoint": checkpoint, "registry": registry, "report_id": report_id}
    flow_run = run_deployment(name, parameters=parameters, timeout=0, as_subflow=False)
    if on_started is not None:
        on_started(f"started {name} run {flow_run.name} ({flow_run.id}) on {api}")
    with get_client(sync_client=True) as client:
        while not (flow_run.state and flow_run.state.is_final()):
            time.sleep(poll_seconds)
            flow_run = client.read_flow_run(flow_run.id)
    summary = read_run_report(open_registry(registry), model, report_id)
    if summary is not None:
        return summary
    state = flow_run.state
    return RunSummary(
        model=model,
        registry=registry,
        message=f"deployment run {flow_run.name} ended {state.name} without a report: {state.message or 'no message'}; see its logs on {api}",
    )
