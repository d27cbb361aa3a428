"""Tasks of the scheduled watcher: retrain into the watch location, find the newest checkpoint, bring it here."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from trtforge.spec import ModelSpec
from trtforge.watch import FoundCheckpoint, RetrainResult, local_checkpoint, newest_checkpoint, retrain_into


@task(name="retrain-into-watch-location")
def retrain_into_task(spec: ModelSpec, work_dir: Path) -> RetrainResult:
    result = retrain_into(spec, work_dir)
    get_run_logger().info("retrain: wrote %s in %.1f s %s", result.checkpoint.uri, result.seconds, result.train_metrics)
    return result


@task(name="find-checkpoint")
def newest_checkpoint_task(spec: ModelSpec) -> FoundCheckpoint:
    found = newest_checkpoint(spec.watch)
    get_run_logger().info("newest checkpoint: %s (%d bytes, modified %s)", found.uri, found.size, found.modified.isoformat())
    return found


@task(name="fetch-checkpoint")
def local_checkpoint_task(uri: str, cache_dir: Path) -> Path:
    return local_checkpoint(uri, cache_dir)
