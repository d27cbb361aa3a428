"""The versioned engine registry: a reader (resolve, manifest, pull), a publisher and maintenance (verify, gc).

Importable with the core install only (boto3, pydantic, nvidia-ml-py): no torch, onnx or Prefect.
"""

from trtforge.registry.maintenance import GcReport, Maintenance, VerifyReport
from trtforge.registry.manifest import AliasRecord, FileEntry, Lineage, Manifest, TargetEntry
from trtforge.registry.publisher import Publisher, TargetArtifacts
from trtforge.registry.pull import PulledFile, PullResult, choose_target
from trtforge.registry.reader import ModelListing, RegistryReader
from trtforge.registry.registry import REGISTRY_ENV, Registry, open_registry, open_registry_store, registry_uri_from_env
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
    "Maintenance",
    "Manifest",
    "ModelListing",
    "ObjectStore",
    "Publisher",
    "PullResult",
    "PulledFile",
    "Registry",
    "RegistryReader",
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
    "open_registry_store",
    "registry_uri_from_env",
]
