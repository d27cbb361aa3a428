from __future__ import annotations

from pathlib import Path

from trtforge.tasks.stage import stage_task

from trtforge.spec import ModelSpec
from trtforge.stages.export import ExportResult
from trtforge.stages.runner import Stage
from trtforge.stages.simplify import SimplifyResult, simplify_onnx


def _describe(result: SimplifyResult) -> str:
    return f"{result.nodes_before} -> {result.nodes_after} nodes, max |simplified - exported| {max(result.max_abs_diff.values()):.2g}"


@stage_task(Stage.SIMPLIFY, describe=_describe, cached=True)
def simplify_task(spec: ModelSpec, exported: ExportResult, work_dir: Path) -> SimplifyResult:
    return simplify_onnx(spec, exported.onnx_path, work_dir)
