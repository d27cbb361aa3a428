"""What the registry's reader, publisher and maintenance share: the key layout, JSON checks and signature checks.

Layout under the store's root::

    <model>/versions/<N>/lock.json          claims number N (conditional create)
    <model>/versions/<N>/<tag>/<file>       engine, build.json, gate.json, ...
    <model>/versions/<N>/signature.sig      model-signing signature of the manifest and every file (when signing is on)
    <model>/versions/<N>/manifest.json      written last and conditionally: the version exists from here on
    <model>/aliases/<alias>.json            moved by compare-and-swap on its ETag
    <model>/staging/<run>/...               files handed between a run and its build workers
    timing-caches/<key>.cache               TensorRT timing caches shared per TensorRT version and GPU

A reader sees a version only once its manifest exists, so a publisher that dies at any point
leaves either a complete version or nothing visible. ``gc`` claims an unfinished version by
creating its manifest empty, so an empty manifest means no version at all.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from trtforge.errors import RegistryError
from trtforge.registry.manifest import Manifest
from trtforge.registry.names import check_cache_key
from trtforge.registry.signing import SignatureError, Trust, VersionVerifier, signature_required_by_env, trust_from_env
from trtforge.registry.storage import ObjectInfo, ObjectStore

VERSIONS = "versions"
MANIFEST = "manifest.json"
LOCK = "lock.json"
SIGNATURE = "signature.sig"
# Objects of a version folder that are not part of what is signed.
UNSIGNED = (LOCK, SIGNATURE)
STAGING = "staging"
TIMING_CACHES = "timing-caches"


def now() -> datetime:
    return datetime.now(UTC)


# --- key layout ------------------------------------------------------------------------------------


def versions_prefix(model: str) -> str:
    return f"{model}/{VERSIONS}/"


def version_folder(model: str, version: int) -> str:
    return f"{versions_prefix(model)}{version}"


def version_prefix(model: str, version: int) -> str:
    return f"{version_folder(model, version)}/"


def version_key(model: str, version: int, name: str) -> str:
    return f"{version_folder(model, version)}/{name}"


def aliases_prefix(model: str) -> str:
    return f"{model}/aliases/"


def alias_key(model: str, alias: str) -> str:
    return f"{model}/aliases/{alias}.json"


def staging_prefix(model: str, run: str) -> str:
    return f"{model}/{STAGING}/{run}"


def timing_cache_key(key: str) -> str:
    return f"{TIMING_CACHES}/{check_cache_key(key)}.cache"


def where(store: ObjectStore, key: str) -> str:
    """Where an object is, as error messages name it."""
    return f"{store.uri}/{key}"


def is_published(info: ObjectInfo | None) -> bool:
    """Whether a manifest object makes its version exist: present and not gc's empty claim."""
    return info is not None and info.size > 0


# --- JSON ------------------------------------------------------------------------------------------


def check_json(what: str, value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise RegistryError(f"{what} cannot be stored as JSON: {err}") from None


def to_json(payload: BaseModel) -> bytes:
    return payload.model_dump_json(indent=2).encode()


# --- signatures ------------------------------------------------------------------------------------


def subject(model: str, version: int) -> str:
    """What a version's signature names as its subject, so a signature copied to another version is recognised."""
    return version_folder(model, version)


def signed_digests(manifest: Manifest, payload: bytes) -> dict[str, str]:
    """Everything a version's signature covers, by name inside the version's folder: the manifest and every file."""
    digests = {MANIFEST: hashlib.sha256(payload).hexdigest()}
    for entry in manifest.targets.values():
        for name, file in entry.files.items():
            digests[f"{entry.tag}/{name}"] = file.sha256
    return digests


def _signature_mismatch(signed: dict[str, str], expected: dict[str, str], manifest_where: str) -> str | None:
    """Why a valid signature does not vouch for this version's content, or None when it does."""
    if signed.get(MANIFEST) != expected[MANIFEST]:
        return (
            f"{manifest_where} has SHA-256 {expected[MANIFEST]}, but the signature vouches for "
            f"{signed.get(MANIFEST) or 'no manifest'}: the manifest was changed after signing, or the signature belongs to other content"
        )
    unsigned = sorted(set(expected) - set(signed))
    if unsigned:
        return f"the manifest lists {', '.join(unsigned)}, which the signature does not cover"
    extra = sorted(set(signed) - set(expected))
    if extra:
        return f"the signature covers {', '.join(extra)}, which the manifest does not list"
    changed = sorted(name for name in expected if signed[name] != expected[name])
    if changed:
        return f"the manifest's SHA-256 of {', '.join(changed)} differs from the signed one"
    return None


def required_verifier(require_signature: bool | None, trust: Trust | None) -> VersionVerifier | None:
    """The verifier a pull must pass, or None when no signature is required (an explicit ``trust`` requires one)."""
    required = require_signature if require_signature is not None else trust is not None or signature_required_by_env()
    if not required:
        return None
    trust = trust or trust_from_env()
    if trust is None:
        raise RegistryError(
            "a signature is required but no key is trusted: pass --trusted-key PUBLIC_KEY.pem or set TRTFORGE_TRUSTED_KEY "
            "(or TRTFORGE_TRUSTED_IDENTITY and TRTFORGE_TRUSTED_OIDC_ISSUER for Sigstore signatures)"
        )
    return VersionVerifier(trust)


def unexpected_objects(store: ObjectStore, model: str, version: int, manifest: Manifest) -> list[str]:
    """Objects in the version's folder that its manifest does not list (added after publishing)."""
    prefix = version_prefix(model, version)
    known = {MANIFEST, *UNSIGNED, *(f"{e.tag}/{name}" for e in manifest.targets.values() for name in e.files)}
    return sorted(name for info in store.list(prefix) if (name := info.key[len(prefix) :]) not in known)


def signature_problem(
    store: ObjectStore, model: str, version: int, manifest: Manifest, payload: bytes, verifier: VersionVerifier
) -> str | None:
    """Why the version's signature does not vouch for its manifest and files, or None when it does."""
    key = version_key(model, version, SIGNATURE)
    stored = store.get(key)
    if stored is None:
        return f"{where(store, key)} is missing: {model} version {version} was published unsigned, or its signature was removed"
    try:
        signed = verifier.verify(stored.data, where(store, key))
    except SignatureError as err:
        return str(err)
    expected_subject = subject(model, version)
    if signed.subject != expected_subject:
        return f"{where(store, key)} was made for {signed.subject}, not {expected_subject}: it was copied from another version"
    return _signature_mismatch(signed.digests, signed_digests(manifest, payload), where(store, version_key(model, version, MANIFEST)))
