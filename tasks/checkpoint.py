from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from trtforge.spec import ModelSpec
from trtforge.stages.checkpoint import CheckpointResult, ensure_checkpoint


@task(name="retrain")
def ensure_checkpoint_task(spec: ModelSpec, checkpoint: Path | None = None) -> CheckpointResult:
    result = ensure_checkpoint(spec, checkpoint)
    logger = get_run_logger()
    if result.trained:
        logger.info("retrain: trained %s in %.1f s %s", result.path, result.seconds, result.train_metrics)
    else:
        logger.info("retrain: using checkpoint %s (sha256 %s)", result.path, result.sha256[:12])
    return result
