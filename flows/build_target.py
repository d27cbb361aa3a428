"""One target, built and gated on a worker that has its GPU (or backend): the ``build-target`` deployment.

Everything arrives and leaves through the registry's staging area, so the worker needs only
the repository checkout (for the spec and its eval set) and registry access.
"""

# No ``from __future__ import annotations``: Prefect builds the flow's parameter model from the
# annotations as objects, and cannot resolve a string naming BuildRequest.
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger
from trtforge.tasks.build import build_and_gate_task

from trtforge.registry import open_registry
from trtforge.spec import load_spec
from trtforge.stages.build import BuildRequest
from trtforge.staging import Staging, target_slot


@flow(name="build-target")
def build_target(request: BuildRequest, run_id: str) -> str:
    """Build the requested target from its staged ONNX and reference outputs; stages the outcome and returns its tag."""
    spec = load_spec(request.spec_path)
    staging = Staging(open_registry(request.registry), spec.name, run_id)
    with tempfile.TemporaryDirectory(prefix="trtforge-build-") as tmp:
        work = Path(tmp)
        staging.get_external_data(request.onnx_path.name, request.onnx_external, work)
        local = request.model_copy(
            update={
                "onnx_path": staging.get(request.onnx_path.name, work / "model.onnx", request.onnx_sha256),
                "reference": request.reference.model_copy(
                    update={"path": staging.get(request.reference.path.name, work / "reference.npz", request.reference_sha256)}
                ),
                "work_dir": work / "target",
            }
        )
        outcome = build_and_gate_task(local)
        staging.put_outcome(target_slot(request.target_index), outcome)
    get_run_logger().info("build-target %s: %s, outcome staged", outcome.tag, outcome.status.value)
    return outcome.tag
