from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task

from trtforge.backends.base import get_backend
from trtforge.spec import ModelSpec, Target
from trtforge.stages.gate import GateResult, PreviousRelease, gate_target
from trtforge.evalset import load_eval_set
from trtforge.stages.reference import ReferenceResult, load_reference
from trtforge.summary import TargetOutcome, TargetStatus


@task(name="build-and-gate", task_run_name="build-and-gate-{tag}")
def build_and_gate_task(
    spec: ModelSpec,
    target: Target,
    tag: str,
    onnx_path: Path,
    reference: ReferenceResult,
    work_dir: Path,
    previous: PreviousRelease | None = None,
) -> TargetOutcome:
    """Build one target's engine and gate it; the engine runs on the machine that built it."""
    logger = get_run_logger()
    backend = get_backend(target.backend.value)
    built = backend.build(onnx_path, target, spec, work_dir)
    logger.info("build %s: %s (%d bytes, %.2f s)", built.tag, built.engine_path, built.record.get("engine_bytes", 0), built.record.get("build_seconds", 0.0))
    result: GateResult = gate_target(
        spec, target, built.tag, backend.load_runner(built.engine_path), load_eval_set(spec), load_reference(reference), previous
    )
    gate_json = work_dir / "gate.json"
    gate_json.write_text(json.dumps(result.model_dump(mode="json"), indent=2))
    if result.passed:
        logger.info("gate %s: passed %s", built.tag, {k: round(v, 4) for k, v in result.metrics.items()})
    else:
        logger.warning("gate %s: FAILED: %s", built.tag, "; ".join(result.failures))
    return TargetOutcome(
        tag=built.tag,
        backend=target.backend.value,
        precision=target.precision.value,
        required=target.required,
        status=TargetStatus.PASSED if result.passed else TargetStatus.FAILED,
        reason="; ".join(result.failures),
        metrics=result.metrics,
        thresholds=result.thresholds,
        failures=result.failures,
        notes=result.notes,
        record=built.record,
        files={"engine": built.engine_path, **built.extra_files, "gate.json": gate_json},
    )
