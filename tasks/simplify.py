from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from tasks.caching import TASK_OPTIONS
from trtforge.spec import ModelSpec
from trtforge.stages.export import ExportResult
from trtforge.stages.simplify import SimplifyResult, simplify_onnx


@task(name="simplify", **TASK_OPTIONS)
def simplify_task(spec: ModelSpec, exported: ExportResult, work_dir: Path) -> SimplifyResult:
    result = simplify_onnx(spec, exported.onnx_path, work_dir)
    get_run_logger().info(
        "simplify: %d -> %d nodes, max |simplified - exported| %.2g, %.1f s",
        result.nodes_before,
        result.nodes_after,
        max(result.max_abs_diff.values()),
        result.seconds,
    )
    return result
