from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from trtforge.registry import open_registry
from trtforge.spec import ModelSpec, Target
from trtforge.stages.build import build_with_shared_timing_cache
from trtforge.stages.gate import PreviousRelease
from trtforge.stages.reference import ReferenceResult
from trtforge.summary import TargetOutcome, TargetStatus


@task(name="build-and-gate", task_run_name="build-and-gate-{target.backend.value}-{target.precision.value}")
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
    outcome = build_with_shared_timing_cache(store, spec, target, onnx_path, reference, work_dir, previous)
    logger = get_run_logger()
    seconds = outcome.record.get("build_seconds", 0.0)
    if outcome.status is TargetStatus.PASSED:
        logger.info("gate %s: passed (built in %.2f s) %s", outcome.tag, seconds, {k: round(v, 4) for k, v in outcome.metrics.items()})
    else:
        logger.warning("gate %s: FAILED: %s", outcome.tag, outcome.reason)
    return outcome
