"""One target, built and gated on a worker that has its GPU (or backend): the ``build-target`` deployment.

Everything arrives and leaves through the registry's staging area, so the worker needs only
the repository checkout (for the spec and its eval set) and registry access.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow, get_run_logger
from trtforge.tasks.build import build_and_gate_task

from trtforge.registry import open_registry
from trtforge.spec import load_spec
from trtforge.stages.gate import PreviousRelease
from trtforge.stages.reference import ReferenceResult
from trtforge.staging import Staging, target_slot


@flow(name="build-target")
def build_target(
    spec_path: str,
    target_index: int,
    registry: str,
    run_id: str,
    onnx_name: str,
    onnx_sha256: str,
    reference_sha256: str,
    previous: dict | None = None,
) -> str:
    """Build ``spec.targets[target_index]`` from the staged ONNX; stages the outcome and returns its tag."""
    spec = load_spec(spec_path)
    target = spec.targets[target_index]
    staging = Staging(open_registry(registry), spec.name, run_id)
    with tempfile.TemporaryDirectory(prefix="trtforge-build-") as tmp:
        work = Path(tmp)
        onnx_path = staging.get(onnx_name, work / "model.onnx", onnx_sha256)
        reference_path = staging.get("reference.npz", work / "reference.npz", reference_sha256)
        reference = ReferenceResult(path=reference_path, key=reference_sha256, cached=True)
        outcome = build_and_gate_task(
            spec,
            target,
            onnx_path,
            reference,
            work / "target",
            PreviousRelease.model_validate(previous) if previous else None,
            registry,
        )
        staging.put_outcome(target_slot(target_index), outcome)
    get_run_logger().info("build-target %s: %s, outcome staged", outcome.tag, outcome.status.value)
    return outcome.tag
