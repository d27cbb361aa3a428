from __future__ import annotations

from pathlib import Path

from trtforge.tasks.stage import stage_task

from trtforge.calibration import load_calibration
from trtforge.spec import ModelSpec, Precision
from trtforge.stages.convert_precision import ConversionResult, Quantizer, convert_precision
from trtforge.stages.runner import Stage


def _describe(result: ConversionResult) -> str:
    return f"{result.precision.value}: {result.method}, {result.qdq_node_count} Q/DQ nodes" + (" (cached)" if result.cached else "")


@stage_task(Stage.CONVERT_PRECISION, describe=_describe, task_run_name="convert-precision-{precision.value}")
def convert_precision_task(
    spec: ModelSpec,
    onnx_path: Path,
    precision: Precision,
    cache_dir: Path,
    excluded_node_patterns: list[str] | None = None,
    quantizer: Quantizer = Quantizer.MODELOPT,
) -> ConversionResult:
    """The precision conversion (ModelOpt, or onnxruntime's quantizer for int8 where ``quantizer`` says so); the
    stage caches by content itself, so a re-run does not recalibrate.

    ``excluded_node_patterns`` are kept out of quantization on top of the spec's own (the precision ladder's steps).
    """
    calibration = load_calibration(spec) if spec.calibration is not None and precision is not Precision.FP32 else None
    options = spec.precision
    if excluded_node_patterns:
        options = options.model_copy(update={"exclude_nodes": [*options.exclude_nodes, *excluded_node_patterns]})
    return convert_precision(
        onnx_path,
        precision,
        calibration.arrays if calibration else None,
        options,
        spec=spec,
        cache_dir=cache_dir,
        calibration_sha256=calibration.sha256 if calibration else None,
        timeout_s=spec.isolation.timeout_s,
        quantizer=quantizer,
    )
