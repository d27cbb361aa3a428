"""Stage 'publish': the passing targets of a run become one immutable registry version."""

from __future__ import annotations

import os
from typing import Any

from trtforge.environment import environment
from trtforge.registry import REGISTRY_ENV, registry_uri_from_env
from trtforge.spec import ModelSpec
from trtforge.summary import TargetOutcome, TargetStatus


def registry_uri(spec: ModelSpec | None, override: str | None = None) -> str:
    """``--registry``, then $TRTFORGE_REGISTRY, then the spec's ``registry``, then the embedded default."""
    return registry_uri_from_env(override or os.environ.get(REGISTRY_ENV) or (spec.registry if spec else None))


def publish_release(
    spec: ModelSpec,
    uri: str,
    outcomes: list[TargetOutcome],
    lineage: dict[str, str | None],
    extra: dict[str, Any],
) -> int:
    """Publish every passed target; returns the new version number."""
    from trtforge.registry import Publisher, TargetArtifacts, open_registry_store

    artifacts = [
        TargetArtifacts(
            tag=o.tag,
            record={
                **o.record,
                "required": o.required,
                "gate": {"metrics": o.metrics, "thresholds": o.thresholds, "notes": o.notes},
            },
            files=o.files,
        )
        for o in outcomes
        if o.status is TargetStatus.PASSED
    ]
    manifest = Publisher(open_registry_store(uri)).publish(
        spec.name,
        artifacts,
        lineage=lineage,
        environment=environment(),
        extra=extra,
        aliases=["latest", *spec.aliases],
    )
    return manifest.version
