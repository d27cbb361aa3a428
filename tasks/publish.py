from __future__ import annotations

from typing import Any

from trtforge.tasks.stage import stage_task

from trtforge.spec import ModelSpec
from trtforge.stages.publish import publish_release
from trtforge.stages.runner import Stage
from trtforge.summary import TargetOutcome


@stage_task(Stage.PUBLISH, describe=lambda version: f"version {version}")
def publish_task(spec: ModelSpec, uri: str, outcomes: list[TargetOutcome], lineage: dict[str, Any], extra: dict[str, Any]) -> int:
    return publish_release(spec, uri, outcomes, lineage, extra)
