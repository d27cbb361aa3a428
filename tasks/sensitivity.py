from __future__ import annotations

from pathlib import Path

from trtforge.tasks.stage import stage_task

from trtforge.calibration import load_calibration
from trtforge.spec import ModelSpec, Precision
from trtforge.stages.runner import Stage
from trtforge.stages.sensitivity import SensitivityResult, rank_quantized_nodes


def _describe(result: SensitivityResult) -> str:
    worst = result.nodes[0]
    return f"{result.precision.value}: {len(result.nodes)} quantized nodes ranked on {result.samples} samples, worst {worst.name} ({worst.added_error:+.3f})"


@stage_task(Stage.SENSITIVITY, describe=_describe, task_run_name="sensitivity-{precision.value}")
def sensitivity_task(spec: ModelSpec, reference_onnx: Path, quantized_onnx: Path, precision: Precision) -> SensitivityResult:
    calibration = load_calibration(spec)
    return rank_quantized_nodes(
        reference_onnx, quantized_onnx, precision, calibration.arrays, spec=spec, timeout_s=spec.isolation.timeout_s
    )
