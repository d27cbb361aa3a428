from __future__ import annotations

from pathlib import Path

from trtforge.tasks.stage import stage_task

from trtforge.spec import ModelSpec
from trtforge.stages.checkpoint import CheckpointResult
from trtforge.stages.export import ExportResult, export_onnx
from trtforge.stages.runner import Stage


def _describe(result: ExportResult) -> str:
    return f"opset {result.opset}, {result.node_count} nodes, max |onnx - torch| {max(result.max_abs_diff.values()):.2g}"


@stage_task(Stage.EXPORT, describe=_describe, cached=True)
def export_task(spec: ModelSpec, checkpoint: CheckpointResult, work_dir: Path) -> ExportResult:
    return export_onnx(spec, checkpoint.path, work_dir)
