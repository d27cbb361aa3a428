"""Looking after the registry: checking a published version in place, and collecting what crashes left.

``gc`` claims an unfinished version by creating its ``manifest.json`` empty, with the same
conditional create the publisher uses for the real one: exactly one of them wins, so a
publisher that outlived gc's age can never complete a version gc is deleting, and the number
is never handed out again. Readers treat an empty manifest as no version at all.
"""

from __future__ import annotations

import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from trtforge.registry.common import (
    MANIFEST,
    SIGNATURE,
    STAGING,
    VERSIONS,
    is_published,
    now,
    signature_problem,
    unexpected_objects,
    version_key,
    where,
)
from trtforge.registry.names import check_model, check_version
from trtforge.registry.reader import RegistryReader
from trtforge.registry.signing import Trust, VersionVerifier, signature_required_by_env, trust_from_env
from trtforge.registry.storage import ObjectInfo, ObjectStore, PreconditionFailed

DEFAULT_GC_AGE = timedelta(hours=24)


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


class Maintenance:
    def __init__(self, store: ObjectStore):
        self.store = store
        self.uri = store.uri
        # verify reads the manifest as a pull would, with the same errors for a missing version.
        self._reader = RegistryReader(store)

    def verify(self, model: str, version: int, *, trust: Trust | None = None, require_signature: bool | None = None) -> VerifyReport:
        """Check a published version in place: every file against the manifest, no added objects, and the signature.

        The signature is checked with ``trust`` (default: $TRTFORGE_TRUSTED_KEY); without one it is
        reported as not checked, which fails the version only when a signature is required.
        """
        check_model(model)
        check_version(version)
        manifest, payload = self._reader.manifest_with_payload(model, version)
        if require_signature is None:
            require_signature = trust is not None or signature_required_by_env()
        trust = trust or trust_from_env()
        problems = []
        files = []
        with tempfile.TemporaryDirectory(prefix="trtforge-verify-") as folder:
            for entry in manifest.targets.values():
                for name, expected in entry.files.items():
                    path = f"{entry.tag}/{name}"
                    key = version_key(model, version, path)
                    local = Path(folder) / "file"
                    if self.store.head(key) is None:
                        files.append(FileCheck(name=path, status="missing", size=None, sha256=None, expected_sha256=expected.sha256))
                        problems.append(f"{where(self.store, key)} is missing")
                        continue
                    received = self.store.download_file(key, local)
                    size, digest = received.size, received.sha256
                    local.unlink()
                    status = "ok" if (size, digest) == (expected.size, expected.sha256) else "modified"
                    files.append(FileCheck(name=path, status=status, size=size, sha256=digest, expected_sha256=expected.sha256))
                    if status != "ok":
                        problems.append(
                            f"{where(self.store, key)} has {size} bytes with SHA-256 {digest}; the manifest records "
                            f"{expected.size} bytes with SHA-256 {expected.sha256}"
                        )
        unexpected = unexpected_objects(self.store, model, version, manifest)
        problems.extend(f"{where(self.store, version_key(model, version, name))} is not listed in the manifest" for name in unexpected)

        signature_key = version_key(model, version, SIGNATURE)
        if trust is not None:
            verifier = VersionVerifier(trust)
            detail = signature_problem(self.store, model, version, manifest, payload, verifier)
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

    def gc(self, older_than: timedelta = DEFAULT_GC_AGE, dry_run: bool = False) -> GcReport:
        """Remove what crashed publishes and runs left, once older than ``older_than``: versions that never got
        a manifest, staging folders (``<model>/staging/<run>/``) and unfinished uploads.

        Never touches a version with a manifest. An unfinished version is first claimed with an
        empty manifest (a conditional create that a late publisher's manifest would lose to), so
        gc and a publisher never both win. The age guards runs still at work: keep it above the
        longest publish and the longest run.
        """
        cutoff = now() - older_than
        versions: dict[tuple[str, int], list[ObjectInfo]] = {}
        staging: dict[tuple[str, str], list[ObjectInfo]] = {}
        for info in self.store.list(""):
            parts = info.key.split("/")
            if len(parts) >= 4 and parts[1] == VERSIONS and parts[2].isdigit():
                versions.setdefault((parts[0], int(parts[2])), []).append(info)
            elif len(parts) >= 4 and parts[1] == STAGING:
                staging.setdefault((parts[0], parts[2]), []).append(info)

        collected = []
        for (model, version), objects in sorted(versions.items()):
            manifest_key = version_key(model, version, MANIFEST)
            claim = next((o for o in objects if o.key == manifest_key), None)
            if is_published(claim):
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
        key = version_key(model, version, MANIFEST)
        try:
            self.store.put_if_absent(key, b"")
        except PreconditionFailed:
            return not is_published(self.store.head(key))
        return True
