"""The engine registry: immutable numbered versions per model, movable aliases, pull by GPU.

Layout under the store's root::

    <model>/versions/<N>/lock.json          claims number N (conditional create)
    <model>/versions/<N>/<tag>/<file>       engine, build.json, gate.json, ...
    <model>/versions/<N>/manifest.json      written last and conditionally: the version exists from here on
    <model>/aliases/<alias>.json            moved by compare-and-swap on its ETag
    timing-caches/<key>.cache               TensorRT timing caches shared per TensorRT version and GPU

A reader sees a version only once its manifest exists, so a publisher that dies at any point
leaves either a complete version or nothing visible; ``gc`` removes what it left behind.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from trtforge.errors import IntegrityError, NotFoundError, RegistryError
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
from trtforge.registry.storage import ObjectStore, PreconditionFailed, RegistryUnreachable, TransferSettings, open_store
from trtforge.spec import DEFAULT_REGISTRY

REGISTRY_ENV = "TRTFORGE_REGISTRY"
MANIFEST = "manifest.json"
LOCK = "lock.json"
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


class AbortedUpload(BaseModel):
    key: str
    initiated: datetime


class GcReport(BaseModel):
    """Body of ``trtforge gc``: what was (or, with ``dry_run``, would be) removed."""

    registry: str
    dry_run: bool
    older_than_hours: float
    versions: list[CollectedVersion]
    uploads: list[AbortedUpload]


def _now() -> datetime:
    return datetime.now(timezone.utc)


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
            if rest == MANIFEST and number.isdigit():
                found.add(int(number))
        return sorted(found)

    def _where(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def manifest(self, model: str, version: int) -> Manifest:
        key = _version_key(check_model(model), check_version(version), MANIFEST)
        stored = self.store.get(key)
        if stored is None:
            raise self._missing_version(model, version)
        return read_manifest(stored.data, self._where(key), model, version)

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
            if self.store.head(_version_key(model, version, MANIFEST)) is None:
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
        if self.store.head(_version_key(model, target, MANIFEST)) is None:
            raise IntegrityError(f"alias {alias!r} of {model} points at version {target}, which has no manifest: promote a complete version")
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
            summaries.append(VersionSummary(version=number, created_at=manifest.created_at, aliases=by_version.get(number, []), targets=targets))
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
    ) -> Manifest:
        """Publish ``targets`` as the next version of ``model`` and move ``aliases`` forward to it."""
        check_model(model)
        aliases = [check_alias(a) for a in dict.fromkeys(aliases)]
        self._check_artifacts(model, targets)
        _check_json(f"environment of {model}", environment)
        _check_json(f"extra data of {model}", extra or {})
        try:
            lineage_model = Lineage.model_validate(lineage)
        except ValidationError as err:
            raise RegistryError(f"lineage of {model} is invalid: {err.errors()[0]['msg']}") from None
        self.store.check_conditional_writes()

        version = self._allocate_version(model)
        try:
            entries = {target.tag: self._upload_target(model, version, target) for target in targets}
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
            # gc removes a version's lock first: a publisher that outlived its gc age must not complete it.
            if self.store.head(_version_key(model, version, LOCK)) is None:
                raise RegistryError(
                    f"version {version} of {model} was removed by 'trtforge gc' while it was being published "
                    "(the publish took longer than gc's --older-than): publish again"
                )
        except RegistryUnreachable:
            raise
        except BaseException:
            self._discard_unfinished(model, version)
            raise
        try:
            self.store.put_if_absent(_version_key(model, version, MANIFEST), payload)
        except PreconditionFailed:
            raise RegistryError(f"version {version} of {model} already has a manifest: another publisher broke the version lock") from None
        log.info("published %s version %d to %s", model, version, self.uri)
        for alias in aliases:
            self._move_alias(model, alias, version, forward_only=True)
        return manifest

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
        """Remove what a failed publish uploaded (lock last); any failure here is left to gc."""
        prefix = f"{_versions_prefix(model)}{version}/"
        try:
            keys = [info.key for info in self.store.list(prefix)]
            lock = _version_key(model, version, LOCK)
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
        raise RegistryError(f"could not move alias {alias!r} of {model} to version {version}: {_ALIAS_ATTEMPTS} concurrent moves won first; retry")

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
    ) -> PullResult:
        """Write the files of the target that fits into ``dest``, verified; ``arch="auto"`` asks NVML."""
        number = self.resolve(model, version=version, alias=alias)
        manifest = self.manifest(model, number)
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
        )

    # --- garbage collection ----------------------------------------------------------------------

    def gc(self, older_than: timedelta = DEFAULT_GC_AGE, dry_run: bool = False) -> GcReport:
        """Remove versions that never got a manifest and unfinished uploads, once older than ``older_than``.

        Never touches a version with a manifest. The age guards publishers still at work: keep it
        above the longest publish.
        """
        cutoff = _now() - older_than
        unfinished: dict[tuple[str, int], list] = {}
        complete = set()
        for info in self.store.list(""):
            parts = info.key.split("/")
            if len(parts) < 4 or parts[1] != "versions" or not parts[2].isdigit():
                continue
            where = (parts[0], int(parts[2]))
            if parts[3] == MANIFEST and len(parts) == 4:
                complete.add(where)
            unfinished.setdefault(where, []).append(info)
        collected = []
        for (model, version), objects in sorted(unfinished.items()):
            if (model, version) in complete or max(o.last_modified for o in objects) > cutoff:
                continue
            collected.append(CollectedVersion(model=model, version=version, objects=len(objects), bytes=sum(o.size for o in objects)))
            if not dry_run:
                lock = _version_key(model, version, LOCK)
                for info in sorted(objects, key=lambda o: o.key != lock):
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
            uploads=uploads,
        )


def registry_uri_from_env(uri: str | None = None) -> str:
    return uri or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY


def open_registry(uri: str | None = None, *, transfer: TransferSettings | None = None) -> Registry:
    """The registry at ``uri``; None means $TRTFORGE_REGISTRY, then ``file://artifacts/registry``."""
    return Registry(open_store(registry_uri_from_env(uri), transfer))
