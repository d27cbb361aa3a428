from __future__ import annotations

from pathlib import Path

from trtforge.tasks.stage import stage_task

from trtforge.registry import open_registry
from trtforge.spec import ModelSpec, Target
from trtforge.stages.build import build_with_shared_timing_cache
from trtforge.stages.gate import PreviousRelease
from trtforge.stages.reference import ReferenceResult
from trtforge.stages.runner import Stage
from trtforge.summary import TargetOutcome, TargetStatus


def describe_outcome(outcome: TargetOutcome) -> str:
    seconds = outcome.record.get("build_seconds", 0.0)
    if outcome.status is TargetStatus.PASSED:
        return f"{outcome.tag} built in {seconds:.2f} s, gate passed { ({k: round(v, 4) for k, v in outcome.metrics.items()}) }"
    return f"{outcome.tag} gate FAILED: {outcome.reason}"


@stage_task(Stage.BUILD, describe=describe_outcome, task_run_name="build-and-gate-{target.backend}-{target.precision.value}")
def build_and_gate_task(
    spec: ModelSpec,
    target: Target,
    onnx_path: Path,
    reference: ReferenceResult,
    work_dir: Path,
    previous: PreviousRelease | None = None,
    registry: str | None = None,
) -> TargetOutcome:
    store = open_registry(registry) if registry else None
    return build_with_shared_timing_cache(store, spec, target, onnx_path, reference, work_dir, previous)
