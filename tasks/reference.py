from __future__ import annotations

from pathlib import Path

from trtforge.tasks.stage import stage_task

from trtforge.spec import ModelSpec
from trtforge.stages.checkpoint import CheckpointResult
from trtforge.stages.reference import ReferenceResult, reference_outputs
from trtforge.stages.runner import Stage


def _describe(result: ReferenceResult) -> str:
    return "PyTorch FP32 outputs on the eval set " + ("(cached)" if result.cached else "computed")


@stage_task(Stage.REFERENCE, describe=_describe)
def reference_task(spec: ModelSpec, checkpoint: CheckpointResult, cache_dir: Path) -> ReferenceResult:
    return reference_outputs(spec, checkpoint.path, cache_dir)
