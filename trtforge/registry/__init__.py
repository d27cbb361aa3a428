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
    VerifyReport,
    open_registry,
    registry_uri_from_env,
)
from trtforge.registry.signing import (
    KeySigner,
    SignatureError,
    SigstoreSigner,
    TrustedIdentity,
    TrustedKey,
)
from trtforge.registry.storage import ObjectStore, TransferSettings

__all__ = [
    "REGISTRY_ENV",
    "AliasRecord",
    "FileEntry",
    "GcReport",
    "KeySigner",
    "Lineage",
    "Manifest",
    "ModelListing",
    "ObjectStore",
    "PullResult",
    "PulledFile",
    "Registry",
    "SignatureError",
    "SigstoreSigner",
    "TargetArtifacts",
    "TargetEntry",
    "TransferSettings",
    "TrustedIdentity",
    "TrustedKey",
    "VerifyReport",
    "choose_target",
    "open_registry",
    "registry_uri_from_env",
]
