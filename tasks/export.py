from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from tasks.caching import TASK_OPTIONS
from trtforge.spec import ModelSpec
from trtforge.stages.checkpoint import CheckpointResult
from trtforge.stages.export import ExportResult, export_onnx


@task(name="export", **TASK_OPTIONS)
def export_task(spec: ModelSpec, checkpoint: CheckpointResult, work_dir: Path) -> ExportResult:
    result = export_onnx(spec, checkpoint.path, work_dir)
    get_run_logger().info(
        "export: opset %d, %d nodes, max |onnx - torch| %.2g, %.1f s",
        result.opset,
        result.node_count,
        max(result.max_abs_diff.values()),
        result.seconds,
    )
    return result
