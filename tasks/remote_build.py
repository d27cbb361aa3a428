"""Building a target on another worker: the build-target deployment of the target's work pool."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from trtforge.tasks.build import describe_outcome
from trtforge.tasks.stage import stage_task

from trtforge.errors import StageError
from trtforge.hashing import sha256_file
from trtforge.registry import open_registry
from trtforge.safeio import external_data_files, load_onnx_safely
from trtforge.spec import load_spec
from trtforge.stages.build import BuildRequest
from trtforge.stages.runner import Stage
from trtforge.staging import Staging, external_data_name, input_name, target_slot
from trtforge.summary import TargetOutcome


def deployment_problem(name: str) -> str | None:
    """None when ``name`` is deployed and something polls it (a worker on its pool, or ``serve``), else what is missing."""
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            return "not deployed; deploy it with: prefect deploy --prefect-file infra/prefect.yaml --all"
        status = getattr(deployment.status, "value", deployment.status)
        if status != "READY":
            where = f"pool {deployment.work_pool_name}" if deployment.work_pool_name else "its serve process"
            return f"deployed but not ready: no worker is polling {where}"
    return None


@stage_task(Stage.BUILD, describe=describe_outcome, task_run_name="build-on-worker-{deployment}")
def build_on_worker_task(deployment: str, request: BuildRequest, model: str, run_id: str) -> TargetOutcome:
    """Stage the request's files, run ``deployment`` on the staged request, and fetch the outcome it staged."""
    staging = Staging(open_registry(request.registry), model, run_id)
    onnx_sha256, reference_sha256 = sha256_file(request.onnx_path), sha256_file(request.reference.path)
    onnx_name, reference_name = input_name("onnx", onnx_sha256, ".onnx"), input_name("reference", reference_sha256, ".npz")
    staging.put_input(onnx_name, request.onnx_path)
    # A model over protobuf's 2 GB keeps its weights in files beside it: they travel too, each checked on arrival.
    plugins = load_spec(request.spec_path).plugins
    external = {}
    for location in external_data_files(load_onnx_safely(request.onnx_path, plugins=plugins, load_external_data=False)):
        external[location] = sha256_file(request.onnx_path.parent / location)
        staging.put_input(external_data_name(onnx_name, location, external[location]), request.onnx_path.parent / location)
    staging.put_input(reference_name, request.reference.path)
    staged = request.model_copy(
        update={
            "onnx_path": Path(onnx_name),
            "reference": request.reference.model_copy(update={"path": Path(reference_name)}),
            "onnx_sha256": onnx_sha256,
            "reference_sha256": reference_sha256,
            "onnx_external": external,
        }
    )
    get_run_logger().info("target %d: building on deployment %s", request.target_index, deployment)
    flow_run = run_deployment(
        deployment,
        parameters={"request": staged.model_dump(mode="json"), "run_id": run_id},
        # The client retries a create whose answer it did not get; the key makes the server return the run it made.
        idempotency_key=f"{run_id}/{target_slot(request.target_index)}/{onnx_name}",
        timeout=None,
        as_subflow=True,
    )
    if not flow_run.state or not flow_run.state.is_completed():
        state = flow_run.state
        raise StageError(
            "build",
            f"deployment {deployment} run {flow_run.name} ended {state.name if state else 'without a state'}: {state.message if state else ''}",
        )
    return staging.get_outcome(target_slot(request.target_index), request.work_dir)
