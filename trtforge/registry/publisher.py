"""Writing the registry: publishing a new version, moving aliases, storing timing caches.

A publish claims the next free number with a conditional create of ``lock.json``, uploads the
files, writes the signature, and creates ``manifest.json`` last, conditionally: the version
exists from that write on, whole. Aliases then move forward by compare-and-swap. A publisher
that dies at any step leaves either a complete version or nothing readers see, and
``Maintenance.gc`` removes what it left behind.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from trtforge.errors import RegistryError
from trtforge.registry import crashpoints
from trtforge.registry.common import (
    LOCK,
    MANIFEST,
    SIGNATURE,
    UNSIGNED,
    alias_key,
    check_json,
    is_published,
    now,
    signed_digests,
    subject,
    timing_cache_key,
    to_json,
    version_key,
    version_prefix,
    versions_prefix,
)
from trtforge.registry.manifest import AliasRecord, FastestOnPlace, FileEntry, Lineage, Manifest, TargetEntry, check_fastest
from trtforge.registry.names import check_alias, check_file_name, check_model, check_tag
from trtforge.registry.reader import RegistryReader
from trtforge.registry.signing import Signer, VersionSigner, signer_from_env
from trtforge.registry.storage import ObjectStore, PreconditionFailed, RegistryUnreachable
from trtforge.serving import ServingInfo

# publish(signer=...) default: sign as $TRTFORGE_SIGNING_KEY / $TRTFORGE_SIGNING_SIGSTORE say.
FROM_ENVIRONMENT = "environment"
_ALIAS_ATTEMPTS = 64
_ALLOCATION_ATTEMPTS = 1000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetArtifacts:
    """One passing target to publish: its tag, its build record, and its files by name (``engine`` first of all)."""

    tag: str
    record: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def _checked_fastest(model: str, targets: list[TargetArtifacts], fastest: dict[str, Any]) -> dict[str, FastestOnPlace]:
    """The manifest's ``fastest`` field, checked before a version number is taken: a wrong one leaves nothing behind."""
    try:
        choice = TypeAdapter(dict[str, FastestOnPlace]).validate_python(fastest)
        check_fastest(choice, {t.tag for t in targets})
    except ValidationError as err:
        problem = err.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise RegistryError(f"fastest targets of {model}: {where}: {problem['msg']}") from None
    except ValueError as err:
        raise RegistryError(f"fastest targets of {model}: {err}") from None
    return choice


class Publisher:
    def __init__(self, store: ObjectStore):
        self.store = store
        self.uri = store.uri
        # Alias moves re-read the alias each round, and promote checks its version is complete.
        self._reader = RegistryReader(store)

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
        fastest: dict[str, dict[str, Any]] | None = None,
        serving: ServingInfo | None = None,
    ) -> Manifest:
        """Publish ``targets`` as the next version of ``model`` and move ``aliases`` forward to it.

        ``fastest`` is the manifest's choice per place of the fastest passing targets
        (``trtforge.speed.fastest_per_place``); it must name targets among ``targets``.
        ``serving`` is the engines' serving contract (``trtforge.serving.serving_info``).

        ``signer`` signs the version (its manifest and every file); by default it comes from
        $TRTFORGE_SIGNING_KEY or $TRTFORGE_SIGNING_SIGSTORE, and None publishes unsigned.
        """
        check_model(model)
        aliases = [check_alias(a) for a in dict.fromkeys(aliases)]
        self._check_artifacts(model, targets)
        check_json(f"environment of {model}", environment)
        check_json(f"extra data of {model}", extra or {})
        fastest_choice = _checked_fastest(model, targets, fastest or {})
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
                created_at=now(),
                lineage=lineage_model,
                environment=environment,
                extra=extra or {},
                targets=entries,
                fastest=fastest_choice,
                serving=serving,
            )
            payload = to_json(manifest)
            if version_signer is not None:
                signature = version_signer.sign(subject(model, version), signed_digests(manifest, payload), UNSIGNED)
                # Before the manifest: a version readers can see always has its signature.
                try:
                    self.store.put_if_absent(version_key(model, version, SIGNATURE), signature)
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
            self.store.put_if_absent(version_key(model, version, MANIFEST), payload)
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
        existing = self.store.head(version_key(model, version, MANIFEST))
        if is_published(existing):
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
            check_json(f"build record of target {target.tag} of {model}", target.record)

    def _allocate_version(self, model: str) -> int:
        prefix = versions_prefix(model)
        taken = [int(name) for name in self.store.children(prefix) if name.isdigit()]
        candidate = max(taken, default=0) + 1
        claim = json.dumps({"claimed_at": now().isoformat(), "host": socket.gethostname(), "pid": os.getpid()}).encode()
        for _ in range(_ALLOCATION_ATTEMPTS):
            try:
                self.store.put_if_absent(version_key(model, candidate, LOCK), claim)
                return candidate
            except PreconditionFailed:
                candidate += 1
        raise RegistryError(f"could not claim a version number for {model} after {_ALLOCATION_ATTEMPTS} tries: too many publishers at once")

    def _upload_target(self, model: str, version: int, target: TargetArtifacts) -> TargetEntry:
        files = {}
        for name, path in target.files.items():
            stored = self.store.upload_file(version_key(model, version, f"{target.tag}/{name}"), Path(path))
            files[name] = FileEntry(sha256=stored.sha256, size=stored.size)
        return TargetEntry(tag=target.tag, record=target.record, files=files)

    def _discard_unfinished(self, model: str, version: int) -> None:
        """Remove what a failed publish uploaded, lock last; never the manifest key (gc's claim, if any). Failures are left to gc."""
        manifest = version_key(model, version, MANIFEST)
        lock = version_key(model, version, LOCK)
        try:
            keys = [info.key for info in self.store.list(version_prefix(model, version)) if info.key != manifest]
            for key in sorted(keys, key=lambda k: k == lock):
                self.store.delete(key)
        except RegistryError as err:
            log.warning("could not remove the unfinished version %d of %s (%s); 'trtforge gc' will", version, model, err)

    def promote(self, model: str, version: int, alias: str) -> None:
        """Point ``alias`` at a complete ``version`` (backwards too: this is how a rollback is done)."""
        check_model(model)
        check_alias(alias)
        self._reader.resolve(model, version=version)
        self.store.check_conditional_writes()
        self._move_alias(model, alias, version, forward_only=False)

    def _move_alias(self, model: str, alias: str, version: int, *, forward_only: bool) -> AliasRecord:
        """Compare-and-swap loop: every lost race re-reads the alias and decides again on what it now holds."""
        key = alias_key(model, alias)
        for attempt in range(_ALIAS_ATTEMPTS):
            current = self._reader.alias_with_etag(model, alias)
            moment = now()
            try:
                if current is None:
                    record = AliasRecord(alias=alias, version=version, updated_at=moment)
                    self.store.put_if_absent(key, to_json(record))
                    return record
                record, etag = current
                if record.version == version or (forward_only and record.version > version):
                    return record
                moved = record.moved_to(version, moment)
                self.store.put_if_match(key, to_json(moved), etag)
                return moved
            except PreconditionFailed:
                time.sleep(random.uniform(0, 0.01 * (attempt + 1)))
        raise RegistryError(
            f"could not move alias {alias!r} of {model} to version {version}: {_ALIAS_ATTEMPTS} concurrent moves won first; retry"
        )

    def put_timing_cache(self, key: str, data: bytes) -> None:
        self.store.put(timing_cache_key(key), data)
