"""The local work and cache folders under a run's artifacts folder, bounded in size.

Each run leaves an export work folder (the exported and simplified ONNX, per-target builds:
0.4-1.3 GB for a ViT-B/16) and cache entries (precision conversions, reference outputs).
Nothing removes them by itself, and one model's ``artifacts/work`` reached 6.2 GB after 17 runs.
``prune`` removes whole entries, least recently used first, until the folders fit a size
cap; entries used within ``keep_recent`` are never touched, so a run never loses what it, or
a run beside it, is using. Stages mark an entry used (its mtime) when they reuse it.

An entry disappears by one rename into a hidden folder before it is deleted, so a reader
sees it whole or not at all; a removed entry is a cache miss, rebuilt the next time.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel

from trtforge.errors import TrtforgeError

# The cap when neither the command line nor TRTFORGE_LOCAL_CACHE_GB sets one.
DEFAULT_CAP_GB = 20.0
CAP_ENVIRONMENT = "TRTFORGE_LOCAL_CACHE_GB"
# An entry this recent may belong to a run still going: the size cap never takes it.
DEFAULT_KEEP_RECENT = timedelta(hours=1)
TRASH_PREFIX = ".trtforge-removing-"


class LocalEntry(BaseModel):
    path: Path
    kind: str
    bytes: int
    last_used: float


class LocalGcReport(BaseModel):
    root: Path
    cap_bytes: int | None
    removed: list[LocalEntry]
    kept: list[LocalEntry]

    @property
    def freed_bytes(self) -> int:
        return sum(e.bytes for e in self.removed)

    @property
    def kept_bytes(self) -> int:
        return sum(e.bytes for e in self.kept)


@dataclass(frozen=True)
class _Layout:
    """Where entries live under the artifacts folder, one glob per kind (see the flow and the stages)."""

    kind: str
    pattern: str


LAYOUT = (
    _Layout("work", "work/*/*"),
    _Layout("precision", "cache/*/precision/*"),
    _Layout("reference", "cache/*/reference-*.npz"),
)


def mark_used(path: Path) -> None:
    """Tell ``prune`` that ``path`` (an entry) was just used: it goes last."""
    try:
        os.utime(path)
    except FileNotFoundError:
        pass


def cap_bytes_from_environment() -> int:
    value = os.environ.get(CAP_ENVIRONMENT)
    if value is None:
        return int(DEFAULT_CAP_GB * 1024**3)
    try:
        gigabytes = float(value)
    except ValueError:
        raise TrtforgeError(f"{CAP_ENVIRONMENT}={value!r} is not a number: set it to the cap in GiB, e.g. {DEFAULT_CAP_GB:g}") from None
    if gigabytes < 0:
        raise TrtforgeError(f"{CAP_ENVIRONMENT}={value!r} is negative: set it to the cap in GiB, e.g. {DEFAULT_CAP_GB:g}")
    return int(gigabytes * 1024**3)


def local_entries(root: Path) -> list[LocalEntry]:
    entries = []
    for layout in LAYOUT:
        for path in root.glob(layout.pattern):
            if path.name.startswith("."):
                continue  # an entry being written (atomic_directory's temp) or removed
            entries.append(LocalEntry(path=path, kind=layout.kind, bytes=_size(path), last_used=path.stat().st_mtime))
    return sorted(entries, key=lambda e: (e.last_used, str(e.path)))


def prune(
    root: Path,
    *,
    cap_bytes: int | None,
    older_than: timedelta | None = None,
    keep_recent: timedelta = DEFAULT_KEEP_RECENT,
    dry_run: bool = False,
) -> LocalGcReport:
    """Remove entries unused for ``older_than`` (all of them when None and no cap), then the least recently used
    until the rest fit ``cap_bytes``; entries used within ``keep_recent`` stay."""
    root = Path(root)
    if not root.is_dir():
        raise TrtforgeError(f"artifacts folder {root} does not exist: pass the folder your runs wrote to with --artifacts")
    now = time.time()
    entries = local_entries(root)
    removable = [e for e in entries if now - e.last_used >= keep_recent.total_seconds()]
    chosen: list[LocalEntry] = []
    if older_than is not None:
        chosen = [e for e in removable if now - e.last_used >= older_than.total_seconds()]
    elif cap_bytes is None:
        chosen = list(removable)
    if cap_bytes is not None:
        total = sum(e.bytes for e in entries) - sum(e.bytes for e in chosen)
        for entry in removable:
            if total <= cap_bytes:
                break
            if entry not in chosen:
                chosen.append(entry)
                total -= entry.bytes
    if not dry_run:
        for entry in chosen:
            _remove(entry.path)
    kept = [e for e in entries if e not in chosen]
    return LocalGcReport(root=root, cap_bytes=cap_bytes, removed=chosen, kept=kept)


def _remove(path: Path) -> None:
    trash = path.with_name(f"{TRASH_PREFIX}{uuid.uuid4().hex}")
    try:
        path.rename(trash)
    except OSError:
        return  # another prune took it first, or it cannot be moved: it stays, and counts next time
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
