"""The engine registry: immutable numbered versions per model, movable aliases, pull by GPU.

Layout under the store's root::

    <model>/versions/<N>/lock.json          claims number N (conditional create)
    <model>/versions/<N>/<tag>/<file>       engine, build.json, gate.json, ...
    <model>/versions/<N>/signature.sig      model-signing signature of the manifest and every file (when signing is on)
    <model>/versions/<N>/manifest.json      written last and conditionally: the version exists from here on
    <model>/aliases/<alias>.json            moved by compare-and-swap on its ETag
    <model>/staging/<run>/...               files handed between a run and its build workers
    timing-caches/<key>.cache               TensorRT timing caches shared per TensorRT version and GPU

A reader sees a version only once its manifest exists, so a publisher that dies at any point
leaves either a complete version or nothing visible; ``gc`` removes what it left behind.

``gc`` claims an unfinished version by creating its ``manifest.json`` empty, with the same
conditional create the publisher uses for the real one: exactly one of them wins, so a
publisher that outlived gc's age can never complete a version gc is deleting, and the number
is never handed out again. Readers treat an empty manifest as no version at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from trtforge.errors import IntegrityError, NotFoundError, RegistryError
from trtforge.hashing import sha256_file
from trtforge.registry import crashpoints
from trtforge.registry.manifest import AliasRecord, FileEntry, Lineage, Manifest, TargetEntry, read_manifest, read_stored
from trtforge.registry.names import check_alias, check_cache_key, check_file_name, check_model, check_tag, check_version
from trtforge.registry.pull import (
    BlobCache,
    EngineFacts,
    PulledFile,
    PullResult,
    choose_target,
    default_cache_dir,
    local_arch,
    local_tensorrt_version,
    normalize_arch,
    place,
)
from trtforge.registry.signing import (
    SignatureError,
    Signer,
    Trust,
    VersionSigner,
    VersionVerifier,
    signature_required_by_env,
    signer_from_env,
    trust_from_env,
)
from trtforge.registry.storage import ObjectInfo, ObjectStore, PreconditionFailed, RegistryUnreachable, TransferSettings, open_store
from trtforge.spec import DEFAULT_REGISTRY

REGISTRY_ENV = "TRTFORGE_REGISTRY"
MANIFEST = "manifest.json"
LOCK = "lock.json"
SIGNATURE = "signature.sig"
# Objects of a version folder that are not part of what is signed.
UNSIGNED = (LOCK, SIGNATURE)
STAGING = "staging"
# publish(signer=...) default: sign as $TRTFORGE_SIGNING_KEY / $TRTFORGE_SIGNING_SIGSTORE say.
FROM_ENVIRONMENT = "environment"
TIMING_CACHES = "timing-caches"
DEFAULT_GC_AGE = timedelta(hours=24)
_ALIAS_ATTEMPTS = 64
_ALLOCATION_ATTEMPTS = 1000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetArtifacts:
    """One passing target to publish: its tag, its build record, and its files by name (``engine`` first of all)."""

    tag: str
    record: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


class TargetSummary(BaseModel):
    tag: str
    backend: str | None
    precision: str | None
    arch: str | None
    runtime_version: str | None
    gate: dict[str, Any] | None


class VersionSummary(BaseModel):
    version: int
    created_at: datetime
    aliases: list[str]
    signed: bool
    targets: list[TargetSummary]


class ModelListing(BaseModel):
    """Body of ``trtforge ls``."""

    registry: str
    model: str
    aliases: dict[str, int]
    versions: list[VersionSummary]


class CollectedVersion(BaseModel):
    model: str
    version: int
    objects: int
    bytes: int


class CollectedStaging(BaseModel):
    model: str
    run: str
    objects: int
    bytes: int


class AbortedUpload(BaseModel):
    key: str
    initiated: datetime


class GcReport(BaseModel):
    """Body of ``trtforge gc``: what was (or, with ``dry_run``, would be) removed."""

    registry: str
    dry_run: bool
    older_than_hours: float
    versions: list[CollectedVersion]
    staging: list[CollectedStaging]
    uploads: list[AbortedUpload]


class FileCheck(BaseModel):
    name: str
    status: Literal["ok", "modified", "missing"]
    size: int | None
    sha256: str | None
    expected_sha256: str


class VerifyReport(BaseModel):
    """Body of ``trtforge verify``: every file's checksum and the signature of one version, checked in place."""

    registry: str
    model: str
    version: int
    verified: bool
    files: list[FileCheck]
    unexpected: list[str]
    signature: Literal["valid", "invalid", "missing", "not checked"]
    signature_detail: str
    problems: list[str]


def _now() -> datetime:
    return datetime.now(UTC)


def _versions_prefix(model: str) -> str:
    return f"{model}/versions/"


def _version_key(model: str, version: int, name: str) -> str:
    return f"{model}/versions/{version}/{name}"


def _alias_key(model: str, alias: str) -> str:
    return f"{model}/aliases/{alias}.json"


def _check_json(what: str, value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise RegistryError(f"{what} cannot be stored as JSON: {err}") from None


def _json(payload: BaseModel) -> bytes:
    return payload.model_dump_json(indent=2).encode()


def _is_published(info: ObjectInfo | None) -> bool:
    """Whether a manifest object makes its version exist: present and not gc's empty claim."""
    return info is not None and info.size > 0


def _subject(model: str, version: int) -> str:
    """What a version's signature names as its subject, so a signature copied to another version is recognised."""
    return f"{model}/versions/{version}"


def _signed_digests(manifest: Manifest, payload: bytes) -> dict[str, str]:
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


class Registry:
    def __init__(self, store: ObjectStore):
        self.store = store
        self.uri = store.uri

    # --- reading -------------------------------------------------------------------------------

    def models(self) -> list[str]:
        return [name for name in self.store.children("") if name != TIMING_CACHES and not name.startswith("_")]

    def versions(self, model: str) -> list[int]:
        """Complete versions (manifest present), ascending."""
        prefix = _versions_prefix(check_model(model))
        found = set()
        for info in self.store.list(prefix):
            number, _, rest = info.key[len(prefix) :].partition("/")
            if rest == MANIFEST and number.isdigit() and _is_published(info):
                found.add(int(number))
        return sorted(found)

    def _where(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def manifest(self, model: str, version: int) -> Manifest:
        return self._read_manifest(model, version)[0]

    def _read_manifest(self, model: str, version: int) -> tuple[Manifest, bytes]:
        """The manifest and the exact bytes it was read from (what the signature covers)."""
        key = _version_key(check_model(model), check_version(version), MANIFEST)
        stored = self.store.get(key)
        if stored is None or not stored.data:
            raise self._missing_version(model, version)
        return read_manifest(stored.data, self._where(key), model, version), stored.data

    def _missing_version(self, model: str, version: int) -> NotFoundError:
        existing = self.versions(model)
        if not existing:
            return self._missing_model(model)
        return NotFoundError(f"{model} has no version {version} in {self.uri}; its versions: {', '.join(map(str, existing))}")

    def _missing_model(self, model: str) -> NotFoundError:
        models = self.models()
        known = f"models here: {', '.join(models)}" if models else "it holds no models yet"
        return NotFoundError(f"no model {model!r} in registry {self.uri}; {known}")

    def _alias_record(self, model: str, alias: str) -> tuple[AliasRecord, str] | None:
        key = _alias_key(model, alias)
        stored = self.store.get(key)
        if stored is None:
            return None
        record = read_stored(AliasRecord, stored.data, self._where(key))
        if record.alias != alias:
            raise IntegrityError(f"{self._where(key)} names alias {record.alias!r}: it was copied by hand; restore the original")
        return record, stored.etag

    def aliases(self, model: str) -> dict[str, int]:
        prefix = f"{check_model(model)}/aliases/"
        names = [info.key[len(prefix) : -len(".json")] for info in self.store.list(prefix) if info.key.endswith(".json")]
        found = {}
        for name in names:
            current = self._alias_record(model, check_alias(name))
            if current is not None:
                found[name] = current[0].version
        return dict(sorted(found.items()))

    def alias_history(self, model: str, alias: str) -> AliasRecord | None:
        """The alias object itself: where it points and where it pointed before."""
        current = self._alias_record(check_model(model), check_alias(alias))
        return None if current is None else current[0]

    def resolve(self, model: str, version: int | None = None, alias: str | None = None) -> int:
        """A complete version number from a version or an alias (default ``latest``)."""
        check_model(model)
        if version is not None and alias is not None:
            raise RegistryError("give a version or an alias, not both")
        if version is not None:
            check_version(version)
            if not _is_published(self.store.head(_version_key(model, version, MANIFEST))):
                raise self._missing_version(model, version)
            return version
        alias = check_alias(alias or "latest")
        current = self._alias_record(model, alias)
        if current is None:
            if not self.versions(model):
                raise self._missing_model(model)
            known = ", ".join(self.aliases(model)) or "none"
            raise NotFoundError(f"{model} has no alias {alias!r} in {self.uri}; its aliases: {known}")
        target = current[0].version
        if not _is_published(self.store.head(_version_key(model, target, MANIFEST))):
            raise IntegrityError(
                f"alias {alias!r} of {model} points at version {target}, which has no manifest: promote a complete version"
            )
        return target

    def find_by_lineage(self, model: str, checkpoint_sha256: str, spec_sha256: str) -> int | None:
        """The newest complete version built from this checkpoint and spec, or None."""
        for version in reversed(self.versions(model)):
            lineage = self.manifest(model, version).lineage
            if lineage.checkpoint_sha256 == checkpoint_sha256 and lineage.spec_sha256 == spec_sha256:
                return version
        return None

    def describe(self, model: str) -> ModelListing:
        aliases = self.aliases(model)
        versions = self.versions(model)
        if not versions and not aliases:
            raise self._missing_model(model)
        by_version: dict[int, list[str]] = {}
        for name, number in aliases.items():
            by_version.setdefault(number, []).append(name)
        prefix = _versions_prefix(model)
        signed = {
            number for info in self.store.list(prefix) for number, _, name in [info.key[len(prefix) :].partition("/")] if name == SIGNATURE
        }
        summaries = []
        for number in versions:
            manifest = self.manifest(model, number)
            targets = []
            for entry in manifest.targets.values():
                facts = EngineFacts.of(entry.record)
                gate = entry.record.get("gate")
                targets.append(
                    TargetSummary(
                        tag=entry.tag,
                        backend=facts.backend,
                        precision=facts.precision,
                        arch=facts.arch,
                        runtime_version=facts.runtime_version,
                        gate=gate if isinstance(gate, dict) else None,
                    )
                )
            summaries.append(
                VersionSummary(
                    version=number,
                    created_at=manifest.created_at,
                    aliases=by_version.get(number, []),
                    signed=str(number) in signed,
                    targets=targets,
                )
            )
        return ModelListing(registry=self.uri, model=model, aliases=aliases, versions=summaries)

    # --- publishing ----------------------------------------------------------------------------

    def publish(
        self,
        model: str,
        targets: list[TargetArtifacts],
        *,
        lineage: dict[str, Any],
        environment: dict[str, Any],
        extra: dict[str, Any] | None = None,
        aliases: list[str] | tuple[str, ...] = ("latest",),
        signer: Signer | Literal["environment"] | None = FROM_ENVIRONMENT,
    ) -> Manifest:
        """Publish ``targets`` as the next version of ``model`` and move ``aliases`` forward to it.

        ``signer`` signs the version (its manifest and every file); by default it comes from
        $TRTFORGE_SIGNING_KEY or $TRTFORGE_SIGNING_SIGSTORE, and None publishes unsigned.
        """
        check_model(model)
        aliases = [check_alias(a) for a in dict.fromkeys(aliases)]
        self._check_artifacts(model, targets)
        _check_json(f"environment of {model}", environment)
        _check_json(f"extra data of {model}", extra or {})
        try:
            lineage_model = Lineage.model_validate(lineage)
        except ValidationError as err:
            raise RegistryError(f"lineage of {model} is invalid: {err.errors()[0]['msg']}") from None
        if signer == FROM_ENVIRONMENT:
            signer = signer_from_env()
        version_signer = None if signer is None else VersionSigner(signer)
        self.store.check_conditional_writes()

        version = self._allocate_version(model)
        crashpoints.reached("allocated")
        try:
            entries = {target.tag: self._upload_target(model, version, target) for target in targets}
            crashpoints.reached("uploaded")
            manifest = Manifest(
                model=model,
                version=version,
                created_at=_now(),
                lineage=lineage_model,
                environment=environment,
                extra=extra or {},
                targets=entries,
            )
            payload = _json(manifest)
            if version_signer is not None:
                signature = version_signer.sign(_subject(model, version), _signed_digests(manifest, payload), UNSIGNED)
                # Before the manifest: a version readers can see always has its signature.
                try:
                    self.store.put_if_absent(_version_key(model, version, SIGNATURE), signature)
                except PreconditionFailed:
                    raise RegistryError(
                        f"version {version} of {model} already has a signature: another publisher broke the version lock"
                    ) from None
                crashpoints.reached("signed")
        except RegistryUnreachable:
            raise
        except BaseException:
            self._discard_unfinished(model, version)
            raise
        try:
            self.store.put_if_absent(_version_key(model, version, MANIFEST), payload)
        except PreconditionFailed:
            raise self._lost_version(model, version) from None
        log.info("published %s version %d to %s%s", model, version, self.uri, " (signed)" if version_signer else "")
        crashpoints.reached("published")
        for moved, alias in enumerate(aliases, start=1):
            self._move_alias(model, alias, version, forward_only=True)
            if moved < len(aliases):
                crashpoints.reached("mid-alias-move")
        return manifest

    def _lost_version(self, model: str, version: int) -> RegistryError:
        """The manifest could not be created: gc claimed the version (an empty manifest), or the lock was broken."""
        existing = self.store.head(_version_key(model, version, MANIFEST))
        if _is_published(existing):
            return RegistryError(f"version {version} of {model} already has a manifest: another publisher broke the version lock")
        self._discard_unfinished(model, version)
        return RegistryError(
            f"version {version} of {model} was removed by 'trtforge gc' while it was being published "
            "(the publish took longer than gc's --older-than): publish again"
        )

    def _check_artifacts(self, model: str, targets: list[TargetArtifacts]) -> None:
        if not targets:
            raise RegistryError(f"nothing to publish for {model}: no target passed its gate")
        tags = [check_tag(t.tag) for t in targets]
        repeated = sorted({t for t in tags if tags.count(t) > 1})
        if repeated:
            raise RegistryError(f"targets of {model} repeat the tags {repeated}: every target needs its own tag")
        for target in targets:
            if not target.files:
                raise RegistryError(f"target {target.tag} of {model} has no files to publish")
            for name, path in target.files.items():
                check_file_name(name)
                if not Path(path).is_file():
                    raise RegistryError(f"target {target.tag} of {model}: file {name!r} at {path} does not exist or is not a file")
            _check_json(f"build record of target {target.tag} of {model}", target.record)

    def _allocate_version(self, model: str) -> int:
        prefix = _versions_prefix(model)
        taken = [int(name) for name in self.store.children(prefix) if name.isdigit()]
        candidate = max(taken, default=0) + 1
        claim = json.dumps({"claimed_at": _now().isoformat(), "host": socket.gethostname(), "pid": os.getpid()}).encode()
        for _ in range(_ALLOCATION_ATTEMPTS):
            try:
                self.store.put_if_absent(_version_key(model, candidate, LOCK), claim)
                return candidate
            except PreconditionFailed:
                candidate += 1
        raise RegistryError(f"could not claim a version number for {model} after {_ALLOCATION_ATTEMPTS} tries: too many publishers at once")

    def _upload_target(self, model: str, version: int, target: TargetArtifacts) -> TargetEntry:
        files = {}
        for name, path in target.files.items():
            stored = self.store.upload_file(_version_key(model, version, f"{target.tag}/{name}"), Path(path))
            files[name] = FileEntry(sha256=stored.sha256, size=stored.size)
        return TargetEntry(tag=target.tag, record=target.record, files=files)

    def _discard_unfinished(self, model: str, version: int) -> None:
        """Remove what a failed publish uploaded, lock last; never the manifest key (gc's claim, if any). Failures are left to gc."""
        prefix = f"{_versions_prefix(model)}{version}/"
        manifest = _version_key(model, version, MANIFEST)
        lock = _version_key(model, version, LOCK)
        try:
            keys = [info.key for info in self.store.list(prefix) if info.key != manifest]
            for key in sorted(keys, key=lambda k: k == lock):
                self.store.delete(key)
        except RegistryError as err:
            log.warning("could not remove the unfinished version %d of %s (%s); 'trtforge gc' will", version, model, err)

    # --- aliases -------------------------------------------------------------------------------

    def promote(self, model: str, version: int, alias: str) -> None:
        """Point ``alias`` at a complete ``version`` (backwards too: this is how a rollback is done)."""
        check_model(model)
        check_alias(alias)
        self.resolve(model, version=version)
        self.store.check_conditional_writes()
        self._move_alias(model, alias, version, forward_only=False)

    def _move_alias(self, model: str, alias: str, version: int, *, forward_only: bool) -> AliasRecord:
        """Compare-and-swap loop: every lost race re-reads the alias and decides again on what it now holds."""
        key = _alias_key(model, alias)
        for attempt in range(_ALIAS_ATTEMPTS):
            current = self._alias_record(model, alias)
            now = _now()
            try:
                if current is None:
                    record = AliasRecord(alias=alias, version=version, updated_at=now)
                    self.store.put_if_absent(key, _json(record))
                    return record
                record, etag = current
                if record.version == version or (forward_only and record.version > version):
                    return record
                moved = record.moved_to(version, now)
                self.store.put_if_match(key, _json(moved), etag)
                return moved
            except PreconditionFailed:
                time.sleep(random.uniform(0, 0.01 * (attempt + 1)))
        raise RegistryError(
            f"could not move alias {alias!r} of {model} to version {version}: {_ALIAS_ATTEMPTS} concurrent moves won first; retry"
        )

    # --- timing caches -------------------------------------------------------------------------

    def get_timing_cache(self, key: str) -> bytes | None:
        stored = self.store.get(f"{TIMING_CACHES}/{check_cache_key(key)}.cache")
        return None if stored is None else stored.data

    def put_timing_cache(self, key: str, data: bytes) -> None:
        self.store.put(f"{TIMING_CACHES}/{check_cache_key(key)}.cache", data)

    # --- pulling -------------------------------------------------------------------------------

    def pull(
        self,
        model: str,
        dest: Path,
        *,
        version: int | None = None,
        alias: str | None = None,
        tag: str | None = None,
        arch: str | None = None,
        precision: str | None = None,
        backend: str | None = None,
        cache_dir: Path | None = None,
        require_signature: bool | None = None,
        trust: Trust | None = None,
    ) -> PullResult:
        """Write the files of the target that fits into ``dest``, verified; ``arch="auto"`` asks NVML.

        With ``require_signature`` (default: $TRTFORGE_REQUIRE_SIGNATURE) the version's signature
        must verify with ``trust`` (default: $TRTFORGE_TRUSTED_KEY) and cover exactly what the
        version holds, before anything is downloaded or written.
        """
        verifier = self._verifier(require_signature, trust)
        number = self.resolve(model, version=version, alias=alias)
        manifest, payload = self._read_manifest(model, number)
        if verifier is not None:
            self._check_signature(model, number, manifest, payload, verifier)
        wanted_arch = None if arch is None else local_arch() if arch == "auto" else normalize_arch(arch)
        trt_engines = any(EngineFacts.of(t.record).backend == "tensorrt" for t in manifest.targets.values())
        local_trt = local_tensorrt_version() if trt_engines else None
        entry = choose_target(
            manifest,
            tag=None if tag is None else check_tag(tag),
            arch=wanted_arch,
            precision=precision,
            backend=backend,
            local_tensorrt=local_trt,
        )
        facts = EngineFacts.of(entry.record)
        notes = []
        if facts.backend == "tensorrt" and local_trt is None:
            notes.append(f"TensorRT is not installed here, so its version was not checked against {facts.runtime_version}")

        dest = Path(dest).absolute()
        if dest.exists() and not dest.is_dir():
            raise RegistryError(f"pull destination {dest} is a file: give a folder")
        cache = BlobCache(Path(cache_dir) if cache_dir else default_cache_dir())
        blobs = {}
        for name, file_entry in entry.files.items():
            blob = cache.lookup(file_entry)
            cached = blob is not None
            if blob is None:
                blob = cache.fetch(self.store, _version_key(model, number, f"{entry.tag}/{name}"), file_entry)
            blobs[name] = (blob, cached)
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RegistryError(f"cannot create pull destination {dest}: {err.strerror}") from None
        files = []
        for name, (blob, cached) in blobs.items():
            place(blob, dest / name)
            file_entry = entry.files[name]
            files.append(PulledFile(name=name, path=str(dest / name), sha256=file_entry.sha256, size=file_entry.size, cached=cached))
        primary = entry.files[entry.primary_file]
        gate = entry.record.get("gate")
        return PullResult(
            model=model,
            version=number,
            tag=entry.tag,
            path=str(dest / entry.primary_file),
            sha256=primary.sha256,
            cached=all(f.cached for f in files),
            files=files,
            build={**facts.summary(), "gate": gate if isinstance(gate, dict) else None},
            notes=notes,
            signature_verified_with=None if verifier is None else verifier.description,
        )

    # --- signatures ----------------------------------------------------------------------------

    @staticmethod
    def _verifier(require_signature: bool | None, trust: Trust | None) -> VersionVerifier | None:
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

    def _unexpected_objects(self, model: str, version: int, manifest: Manifest) -> list[str]:
        """Objects in the version's folder that its manifest does not list (added after publishing)."""
        prefix = f"{_versions_prefix(model)}{version}/"
        known = {MANIFEST, *UNSIGNED, *(f"{e.tag}/{name}" for e in manifest.targets.values() for name in e.files)}
        return sorted(name for info in self.store.list(prefix) if (name := info.key[len(prefix) :]) not in known)

    def _signature_problem(self, model: str, version: int, manifest: Manifest, payload: bytes, verifier: VersionVerifier) -> str | None:
        """Why the version's signature does not vouch for its manifest and files, or None when it does."""
        key = _version_key(model, version, SIGNATURE)
        stored = self.store.get(key)
        if stored is None:
            return f"{self._where(key)} is missing: {model} version {version} was published unsigned, or its signature was removed"
        try:
            signed = verifier.verify(stored.data, self._where(key))
        except SignatureError as err:
            return str(err)
        expected_subject = _subject(model, version)
        if signed.subject != expected_subject:
            return f"{self._where(key)} was made for {signed.subject}, not {expected_subject}: it was copied from another version"
        return _signature_mismatch(signed.digests, _signed_digests(manifest, payload), self._where(_version_key(model, version, MANIFEST)))

    def _check_signature(self, model: str, version: int, manifest: Manifest, payload: bytes, verifier: VersionVerifier) -> None:
        problem = self._signature_problem(model, version, manifest, payload, verifier)
        if problem is None:
            unexpected = self._unexpected_objects(model, version, manifest)
            if unexpected:
                problem = (
                    f"{self._where(f'{_versions_prefix(model)}{version}')} holds {', '.join(unexpected)}, which its signed "
                    "manifest does not list: it was added after publishing"
                )
        if problem is not None:
            raise SignatureError(f"refusing to pull {model} version {version}: {problem}; nothing was written")

    def verify(self, model: str, version: int, *, trust: Trust | None = None, require_signature: bool | None = None) -> VerifyReport:
        """Check a published version in place: every file against the manifest, no added objects, and the signature.

        The signature is checked with ``trust`` (default: $TRTFORGE_TRUSTED_KEY); without one it is
        reported as not checked, which fails the version only when a signature is required.
        """
        check_model(model)
        check_version(version)
        manifest, payload = self._read_manifest(model, version)
        if require_signature is None:
            require_signature = trust is not None or signature_required_by_env()
        trust = trust or trust_from_env()
        problems = []
        files = []
        with tempfile.TemporaryDirectory(prefix="trtforge-verify-") as folder:
            for entry in manifest.targets.values():
                for name, expected in entry.files.items():
                    path = f"{entry.tag}/{name}"
                    key = _version_key(model, version, path)
                    local = Path(folder) / "file"
                    if self.store.head(key) is None:
                        files.append(FileCheck(name=path, status="missing", size=None, sha256=None, expected_sha256=expected.sha256))
                        problems.append(f"{self._where(key)} is missing")
                        continue
                    self.store.download_file(key, local)
                    size, digest = local.stat().st_size, sha256_file(local)
                    local.unlink()
                    status = "ok" if (size, digest) == (expected.size, expected.sha256) else "modified"
                    files.append(FileCheck(name=path, status=status, size=size, sha256=digest, expected_sha256=expected.sha256))
                    if status != "ok":
                        problems.append(
                            f"{self._where(key)} has {size} bytes with SHA-256 {digest}; the manifest records "
                            f"{expected.size} bytes with SHA-256 {expected.sha256}"
                        )
        unexpected = self._unexpected_objects(model, version, manifest)
        problems.extend(f"{self._where(_version_key(model, version, name))} is not listed in the manifest" for name in unexpected)

        signature_key = _version_key(model, version, SIGNATURE)
        if trust is not None:
            verifier = VersionVerifier(trust)
            detail = self._signature_problem(model, version, manifest, payload, verifier)
            if detail is None:
                signature, detail = "valid", f"verified with {verifier.description}"
            elif self.store.head(signature_key) is None:
                signature = "missing"
            else:
                signature = "invalid"
        elif self.store.head(signature_key) is None:
            signature, detail = "missing", "the version was published unsigned"
        else:
            signature, detail = "not checked", "no trusted key: pass --trusted-key or set TRTFORGE_TRUSTED_KEY"
        signature_failed = signature == "invalid" or (require_signature and signature != "valid")
        if signature_failed:
            problems.append(f"signature {signature}: {detail}")
        return VerifyReport(
            registry=self.uri,
            model=model,
            version=version,
            verified=not problems,
            files=files,
            unexpected=unexpected,
            signature=signature,
            signature_detail=detail,
            problems=problems,
        )

    # --- garbage collection ----------------------------------------------------------------------

    def gc(self, older_than: timedelta = DEFAULT_GC_AGE, dry_run: bool = False) -> GcReport:
        """Remove what crashed publishes and runs left, once older than ``older_than``: versions that never got
        a manifest, staging folders (``<model>/staging/<run>/``) and unfinished uploads.

        Never touches a version with a manifest. An unfinished version is first claimed with an
        empty manifest (a conditional create that a late publisher's manifest would lose to), so
        gc and a publisher never both win. The age guards runs still at work: keep it above the
        longest publish and the longest run.
        """
        cutoff = _now() - older_than
        versions: dict[tuple[str, int], list[ObjectInfo]] = {}
        staging: dict[tuple[str, str], list[ObjectInfo]] = {}
        for info in self.store.list(""):
            parts = info.key.split("/")
            if len(parts) >= 4 and parts[1] == "versions" and parts[2].isdigit():
                versions.setdefault((parts[0], int(parts[2])), []).append(info)
            elif len(parts) >= 4 and parts[1] == STAGING:
                staging.setdefault((parts[0], parts[2]), []).append(info)

        collected = []
        for (model, version), objects in sorted(versions.items()):
            manifest_key = _version_key(model, version, MANIFEST)
            claim = next((o for o in objects if o.key == manifest_key), None)
            if _is_published(claim):
                continue
            leftovers = [o for o in objects if o.key != manifest_key]
            if not leftovers or max(o.last_modified for o in leftovers) > cutoff:
                continue
            if not dry_run and claim is None and not self._claim_unfinished(model, version):
                continue
            collected.append(CollectedVersion(model=model, version=version, objects=len(leftovers), bytes=sum(o.size for o in leftovers)))
            if not dry_run:
                for info in leftovers:
                    self.store.delete(info.key)

        collected_staging = []
        for (model, run), objects in sorted(staging.items()):
            if max(o.last_modified for o in objects) > cutoff:
                continue
            collected_staging.append(CollectedStaging(model=model, run=run, objects=len(objects), bytes=sum(o.size for o in objects)))
            if not dry_run:
                for info in objects:
                    self.store.delete(info.key)

        uploads = []
        for upload in self.store.pending_uploads(""):
            if upload.initiated > cutoff:
                continue
            uploads.append(AbortedUpload(key=upload.key, initiated=upload.initiated))
            if not dry_run:
                self.store.abort_upload(upload)
        return GcReport(
            registry=self.uri,
            dry_run=dry_run,
            older_than_hours=older_than.total_seconds() / 3600,
            versions=collected,
            staging=collected_staging,
            uploads=uploads,
        )

    def _claim_unfinished(self, model: str, version: int) -> bool:
        """Create the version's manifest empty; False if its publisher got its real manifest in first."""
        self.store.check_conditional_writes()
        key = _version_key(model, version, MANIFEST)
        try:
            self.store.put_if_absent(key, b"")
        except PreconditionFailed:
            return not _is_published(self.store.head(key))
        return True


def registry_uri_from_env(uri: str | None = None) -> str:
    return uri or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY


def open_registry(uri: str | None = None, *, transfer: TransferSettings | None = None) -> Registry:
    """The registry at ``uri``; None means $TRTFORGE_REGISTRY, then ``file://artifacts/registry``."""
    return Registry(open_store(registry_uri_from_env(uri), transfer))
