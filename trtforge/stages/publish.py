"""Stage 'publish': the passing targets of a run become one immutable registry version."""

from __future__ import annotations

import os
from typing import Any

from trtforge.environment import environment
from trtforge.registry import REGISTRY_ENV, registry_uri_from_env
from trtforge.serving import serving_info
from trtforge.spec import ModelSpec
from trtforge.speed import fastest_per_place
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
    """Publish every passed target, with the fastest of them per place in the manifest; returns the new version number."""
    from trtforge.registry import Publisher, TargetArtifacts, open_registry_store
    from trtforge.registry.pull import EngineFacts

    passed = [o for o in outcomes if o.status is TargetStatus.PASSED]
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
        for o in passed
    ]
    manifest = Publisher(open_registry_store(uri)).publish(
        spec.name,
        artifacts,
        lineage=lineage,
        environment=environment(),
        extra=extra,
        aliases=["latest", *spec.aliases],
        fastest=fastest_per_place((EngineFacts.of(o.record).place, o.tag, o.metrics) for o in passed),
        serving=serving_info(spec),
    )
    return manifest.version
