from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from trtforge.calibration import load_calibration
from trtforge.spec import ModelSpec, Precision
from trtforge.stages.convert_precision import ConversionResult, convert_precision


@task(name="convert-precision", task_run_name="convert-precision-{precision.value}")
def convert_precision_task(spec: ModelSpec, onnx_path: Path, precision: Precision, cache_dir: Path) -> ConversionResult:
    """ModelOpt conversion; the stage caches by content itself, so a re-run does not recalibrate."""
    calibration = load_calibration(spec) if spec.calibration is not None and precision is not Precision.FP32 else None
    result = convert_precision(
        onnx_path,
        precision,
        calibration.arrays if calibration else None,
        spec.precision,
        spec=spec,
        cache_dir=cache_dir,
        calibration_sha256=calibration.sha256 if calibration else None,
    )
    get_run_logger().info(
        "convert-precision %s: %s, %d Q/DQ nodes, %.1f s%s",
        precision.value,
        result.method,
        result.qdq_node_count,
        result.seconds,
        " (cached)" if result.cached else "",
    )
    return result
