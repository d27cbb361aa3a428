"""The versioned engine registry: publish, resolve, promote, pull, gc.

Importable with the core install only (boto3, pydantic, nvidia-ml-py): no torch, onnx or Prefect.
"""

from trtforge.registry.manifest import AliasRecord, FileEntry, Lineage, Manifest, TargetEntry
from trtforge.registry.pull import PulledFile, PullResult, choose_target
from trtforge.registry.registry import (
    REGISTRY_ENV,
    GcReport,
    ModelListing,
    Registry,
    TargetArtifacts,
    open_registry,
    registry_uri_from_env,
)
from trtforge.registry.storage import ObjectStore, TransferSettings

__all__ = [
    "REGISTRY_ENV",
    "AliasRecord",
    "FileEntry",
    "GcReport",
    "Lineage",
    "Manifest",
    "ModelListing",
    "ObjectStore",
    "PullResult",
    "PulledFile",
    "Registry",
    "TargetArtifacts",
    "TargetEntry",
    "TransferSettings",
    "choose_target",
    "open_registry",
    "registry_uri_from_env",
]
