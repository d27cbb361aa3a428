from __future__ import annotations

from pathlib import Path

from trtforge.tasks.stage import stage_task

from trtforge.spec import ModelSpec
from trtforge.stages.checkpoint import CheckpointResult, ensure_checkpoint
from trtforge.stages.runner import Stage


def _describe(result: CheckpointResult) -> str:
    if result.trained:
        return f"trained {result.path.name} {result.train_metrics}"
    return f"checkpoint {result.path.name} (sha256 {result.sha256[:12]})"


@stage_task(Stage.RETRAIN, describe=_describe)
def ensure_checkpoint_task(spec: ModelSpec, checkpoint: Path | None = None) -> CheckpointResult:
    return ensure_checkpoint(spec, checkpoint)
