from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from trtforge.spec import ModelSpec
from trtforge.stages.publish import publish_release
from trtforge.summary import TargetOutcome


@task(name="publish")
def publish_task(spec: ModelSpec, uri: str, outcomes: list[TargetOutcome], lineage: dict[str, Any], extra: dict[str, Any]) -> int:
    version = publish_release(spec, uri, outcomes, lineage, extra)
    get_run_logger().info("publish: %s version %d", spec.name, version)
    return version
