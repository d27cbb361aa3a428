"""Reading the registry: models, versions, manifests, aliases, and pulling the engine that fits a host.

All a deployment needs; nothing here writes to the store.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from trtforge.errors import IntegrityError, NotFoundError, RegistryError
from trtforge.registry.common import (
    MANIFEST,
    SIGNATURE,
    TIMING_CACHES,
    alias_key,
    aliases_prefix,
    is_published,
    required_verifier,
    signature_problem,
    timing_cache_key,
    unexpected_objects,
    version_folder,
    version_key,
    versions_prefix,
    where,
)
from trtforge.registry.manifest import AliasRecord, Manifest, read_manifest, read_stored
from trtforge.registry.names import check_alias, check_model, check_tag, check_version
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
)
from trtforge.registry.signing import SignatureError, Trust, VersionVerifier
from trtforge.registry.storage import ObjectStore
from trtforge.safeio import atomic_output


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


class RegistryReader:
    def __init__(self, store: ObjectStore):
        self.store = store
        self.uri = store.uri

    def models(self) -> list[str]:
        return [name for name in self.store.children("") if name != TIMING_CACHES and not name.startswith("_")]

    def versions(self, model: str) -> list[int]:
        """Complete versions (manifest present), ascending."""
        prefix = versions_prefix(check_model(model))
        found = set()
        for info in self.store.list(prefix):
            number, _, rest = info.key[len(prefix) :].partition("/")
            if rest == MANIFEST and number.isdigit() and is_published(info):
                found.add(int(number))
        return sorted(found)

    def manifest(self, model: str, version: int) -> Manifest:
        return self.manifest_with_payload(model, version)[0]

    def manifest_with_payload(self, model: str, version: int) -> tuple[Manifest, bytes]:
        """The manifest and the exact bytes it was read from (what the signature covers)."""
        key = version_key(check_model(model), check_version(version), MANIFEST)
        stored = self.store.get(key)
        if stored is None or not stored.data:
            raise self._missing_version(model, version)
        return read_manifest(stored.data, where(self.store, key), model, version), stored.data

    def _missing_version(self, model: str, version: int) -> NotFoundError:
        existing = self.versions(model)
        if not existing:
            return self._missing_model(model)
        return NotFoundError(f"{model} has no version {version} in {self.uri}; its versions: {', '.join(map(str, existing))}")

    def _missing_model(self, model: str) -> NotFoundError:
        models = self.models()
        known = f"models here: {', '.join(models)}" if models else "it holds no models yet"
        return NotFoundError(f"no model {model!r} in registry {self.uri}; {known}")

    def alias_with_etag(self, model: str, alias: str) -> tuple[AliasRecord, str] | None:
        """The alias object and its ETag (what a compare-and-swap of it must match), or None if there is no such alias."""
        key = alias_key(check_model(model), check_alias(alias))
        stored = self.store.get(key)
        if stored is None:
            return None
        record = read_stored(AliasRecord, stored.data, where(self.store, key))
        if record.alias != alias:
            raise IntegrityError(f"{where(self.store, key)} names alias {record.alias!r}: it was copied by hand; restore the original")
        return record, stored.etag

    def aliases(self, model: str) -> dict[str, int]:
        prefix = aliases_prefix(check_model(model))
        names = [info.key[len(prefix) : -len(".json")] for info in self.store.list(prefix) if info.key.endswith(".json")]
        found = {}
        for name in names:
            current = self.alias_with_etag(model, name)
            if current is not None:
                found[name] = current[0].version
        return dict(sorted(found.items()))

    def alias_history(self, model: str, alias: str) -> AliasRecord | None:
        """The alias object itself: where it points and where it pointed before."""
        current = self.alias_with_etag(model, alias)
        return None if current is None else current[0]

    def resolve(self, model: str, version: int | None = None, alias: str | None = None) -> int:
        """A complete version number from a version or an alias (default ``latest``)."""
        check_model(model)
        if version is not None and alias is not None:
            raise RegistryError("give a version or an alias, not both")
        if version is not None:
            check_version(version)
            if not is_published(self.store.head(version_key(model, version, MANIFEST))):
                raise self._missing_version(model, version)
            return version
        alias = check_alias(alias or "latest")
        current = self.alias_with_etag(model, alias)
        if current is None:
            if not self.versions(model):
                raise self._missing_model(model)
            known = ", ".join(self.aliases(model)) or "none"
            raise NotFoundError(f"{model} has no alias {alias!r} in {self.uri}; its aliases: {known}")
        target = current[0].version
        if not is_published(self.store.head(version_key(model, target, MANIFEST))):
            raise IntegrityError(
                f"alias {alias!r} of {model} points at version {target}, which has no manifest: promote a complete version"
            )
        return target

    def find_by_lineage(self, model: str, inputs_sha256: str) -> int | None:
        """The newest complete version built from exactly these inputs (``trtforge.lineage.RunInputs.digest``), or None."""
        for version in reversed(self.versions(model)):
            if self.manifest(model, version).lineage.inputs_sha256 == inputs_sha256:
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
        prefix = versions_prefix(model)
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

    def get_timing_cache(self, key: str) -> bytes | None:
        stored = self.store.get(timing_cache_key(key))
        return None if stored is None else stored.data

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
        verifier = required_verifier(require_signature, trust)
        number = self.resolve(model, version=version, alias=alias)
        manifest, payload = self.manifest_with_payload(model, number)
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
        created = not dest.exists()
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RegistryError(f"cannot create pull destination {dest}: {err.strerror}") from None
        files = []
        written = []
        try:
            # Every file is verified in its temp file before any takes its name: a bad one leaves the folder as it was.
            with contextlib.ExitStack() as placing:
                for name, file_entry in entry.files.items():
                    target = dest / name
                    blob = cache.lookup(file_entry)
                    cached = blob is not None
                    if not (cached and cache.placed(target, file_entry)):
                        partial = placing.enter_context(atomic_output(target))
                        if not (cached and cache.copy(blob, partial, file_entry)):
                            cached = False
                            cache.fetch(self.store, version_key(model, number, f"{entry.tag}/{name}"), file_entry, partial)
                        written.append(name)
                    files.append(PulledFile(name=name, path=str(target), sha256=file_entry.sha256, size=file_entry.size, cached=cached))
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    dest.rmdir()
            raise
        for name in written:
            cache.record_placement(dest / name, entry.files[name])
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

    def _check_signature(self, model: str, version: int, manifest: Manifest, payload: bytes, verifier: VersionVerifier) -> None:
        problem = signature_problem(self.store, model, version, manifest, payload, verifier)
        if problem is None:
            unexpected = unexpected_objects(self.store, model, version, manifest)
            if unexpected:
                problem = (
                    f"{where(self.store, version_folder(model, version))} holds {', '.join(unexpected)}, which its signed "
                    "manifest does not list: it was added after publishing"
                )
        if problem is not None:
            raise SignatureError(f"refusing to pull {model} version {version}: {problem}; nothing was written")
