"""Pulling: which engine of a version fits this host, and getting its files here intact.

Choosing: a tag names one target outright; otherwise backend and precision filter, and an
architecture (``sm_90``, or ``auto`` for this host's GPU read through NVML) keeps the engines
that run on it, an exact compute-capability match before a hardware-compatible one. Where
TensorRT is installed, engines it cannot deserialize (built by another TensorRT version and
not version-compatible) are refused by name.

Fetching: a file missing from the local cache (keyed by SHA-256) is downloaded in one pass into
a temp file beside its destination, hashed as it is written and checked against the manifest;
the proven file then becomes the cache's blob too, by a hard link where the cache shares its
filesystem (else a copy), so a cache-missing pull writes the engine once. One found in the cache
is copied (a reflink where the filesystem has them, else an in-kernel copy) and the copy hashed:
deploy folders never share a file with each other. Only once every file of the target is proven does
each take its name by a rename (``trtforge.safeio``), so neither a corrupted object nor a
damaged cache blob ever reaches the destination, and a repeated pull downloads nothing.

A cache hit is found without re-hashing the blob while its (inode, size, mtime, ctime) are those
recorded when its SHA-256 last matched; any change to the blob, even one that keeps its size,
makes the next pull hash it again and download it anew if it no longer matches. A redeploy into
the same folder writes nothing while the placed file keeps the stat recorded when it was placed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel

from trtforge import speed
from trtforge.errors import IntegrityError, NotFoundError, RegistryError
from trtforge.gpu import arch_from_capability, capability_from_arch, detect_gpus
from trtforge.hashing import sha256_file
from trtforge.registry.manifest import FileEntry, Manifest, TargetEntry
from trtforge.registry.storage import ObjectStore
from trtforge.safeio import atomic_output

CACHE_ENV = "TRTFORGE_CACHE_DIR"
_ARCH_INPUT = re.compile(r"^(?:sm_?)?(\d+)\.?(\d)$")
_EXACT, _HARDWARE_COMPATIBLE = 0, 1


def normalize_arch(value: str) -> str:
    """``sm_90``, ``sm90``, ``90`` or ``9.0`` -> ``sm_90``."""
    match = _ARCH_INPUT.match(value.strip().lower())
    if match is None:
        raise RegistryError(f"invalid GPU architecture {value!r}: use a compute capability like sm_90 or 8.6, or 'auto'")
    return arch_from_capability(int(match.group(1)), int(match.group(2)))


def _arch_or_none(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return normalize_arch(value)
    except RegistryError:
        return None


@dataclass(frozen=True)
class EngineFacts:
    """What pulling needs from a target's free-form build record, whichever backend wrote it."""

    backend: str | None
    precision: str | None
    device: str | None
    arch: str | None
    runtime_version: str | None
    hardware_compatibility: str
    version_compatible: bool
    exclude_lean_runtime: bool = False

    @classmethod
    def of(cls, record: dict[str, Any]) -> EngineFacts:
        settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
        # The GPU the engine was built on wins over the arch the target asked for.
        arch = next(
            (a for a in map(_arch_or_none, (record.get("compute_capability"), record.get("target_arch"), record.get("arch"))) if a),
            None,
        )
        runtime = record.get("runtime_version") or record.get("tensorrt_version")
        return cls(
            backend=record.get("backend"),
            precision=record.get("precision"),
            device=record.get("device") or ("gpu" if arch else None),
            arch=arch,
            runtime_version=str(runtime) if runtime else None,
            hardware_compatibility=str(record.get("hardware_compatibility") or settings.get("hardware_compatibility_level") or "none"),
            version_compatible=bool(record.get("version_compatible", settings.get("version_compatible", False))),
            exclude_lean_runtime=bool(record.get("exclude_lean_runtime", settings.get("exclude_lean_runtime", False))),
        )

    @property
    def place(self) -> str:
        """Where the engine runs and its gate timed it: its GPU architecture (sm_90), else ``cpu``."""
        return self.arch or "cpu"

    def describe(self) -> str:
        parts = [p for p in (self.backend, self.runtime_version, self.arch or self.device, self.precision) if p]
        if self.hardware_compatibility not in ("none", ""):
            parts.append(f"hardware-compatible {self.hardware_compatibility}")
        if self.version_compatible:
            parts.append("version-compatible, lean runtime excluded" if self.exclude_lean_runtime else "version-compatible")
        return " ".join(parts)

    def summary(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "device": self.device,
            "arch": self.arch,
            "runtime_version": self.runtime_version,
            "hardware_compatibility": self.hardware_compatibility,
            "version_compatible": self.version_compatible,
            "exclude_lean_runtime": self.exclude_lean_runtime,
        }


def arch_rank(facts: EngineFacts, arch: str) -> int | None:
    """0 for an engine built for exactly this compute capability, 1 for one built to run on it too, else None."""
    if facts.arch is None:
        return None
    if facts.arch == arch:
        return _EXACT
    if facts.hardware_compatibility == "ampere_plus" and capability_from_arch(arch)[0] >= 8 and capability_from_arch(facts.arch)[0] >= 8:
        return _HARDWARE_COMPATIBLE
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


# NVIDIA's support matrix: a runtime of major version M also loads the version-compatible engines
# of the major release before it (TensorRT 9 was no general release, so 10 follows 8).
PREVIOUS_MAJOR = {10: 8, 11: 10}


def runtime_fits(facts: EngineFacts, local_tensorrt: str) -> bool:
    """Whether this host's TensorRT can load the engine; the one place that rule lives.

    A plain engine runs only on the TensorRT version that built it. A version-compatible one runs on
    that version or any later one of its major version, and on the runtime of the next major release
    (10.x engines on 11.x, 8.6+ on 10.x). One built with ``exclude_lean_runtime`` carries no lean
    runtime, so it needs a lean runtime of exactly the building version: exact, like a plain engine.
    Engines of other backends, or with no recorded version, pass."""
    if facts.backend != "tensorrt" or not facts.runtime_version:
        return True
    built, local = _version_tuple(facts.runtime_version), _version_tuple(local_tensorrt)
    if not facts.version_compatible or facts.exclude_lean_runtime:
        return local == built
    same_or_next_major = local[0] == built[0] or PREVIOUS_MAJOR.get(local[0]) == built[0]
    return same_or_next_major and local >= built


def _listing(entries: list[TargetEntry]) -> str:
    return ", ".join(f"{e.tag} ({EngineFacts.of(e.record).describe()})" for e in entries) or "none"


def choose_target(
    manifest: Manifest,
    *,
    tag: str | None = None,
    arch: str | None = None,
    precision: str | None = None,
    backend: str | None = None,
    local_tensorrt: str | None = None,
) -> TargetEntry:
    """The one target of ``manifest`` that fits the request and this host; RegistryError naming the choices otherwise."""
    label = f"{manifest.model} version {manifest.version}"
    everything = list(manifest.targets.values())
    if tag is not None:
        if tag not in manifest.targets:
            raise NotFoundError(f"{label} has no target {tag!r}; its targets: {_listing(everything)}")
        candidates = [manifest.targets[tag]]
    else:
        candidates = everything
    wanted = {"backend": backend, "precision": precision}
    for field, value in wanted.items():
        if value is not None:
            candidates = [e for e in candidates if getattr(EngineFacts.of(e.record), field) == value]
    if not candidates:
        asked = ", ".join(f"{k} {v}" for k, v in wanted.items() if v is not None)
        raise NotFoundError(f"{label} has no target with {asked}; its targets: {_listing(everything)}")

    if arch is not None:
        ranked = [(rank, e) for e in candidates if (rank := arch_rank(EngineFacts.of(e.record), arch)) is not None]
        if not ranked:
            raise NotFoundError(f"no engine of {label} runs on {arch}; its targets: {_listing(candidates)}")
    else:
        ranked = [(_EXACT, e) for e in candidates]

    if local_tensorrt is not None:
        fitting = [(rank, e) for rank, e in ranked if runtime_fits(EngineFacts.of(e.record), local_tensorrt)]
        if not fitting:
            refused = ", ".join(f"{e.tag} (built with TensorRT {EngineFacts.of(e.record).runtime_version})" for _, e in ranked)
            would_fit = [
                e
                for e in everything
                if runtime_fits(EngineFacts.of(e.record), local_tensorrt)
                and (arch is None or arch_rank(EngineFacts.of(e.record), arch) is not None)
            ]
            raise RegistryError(
                f"this host has TensorRT {local_tensorrt}, which cannot load {refused} of {label}: an engine runs only on "
                f"the TensorRT version that built it unless it was built version-compatible (then also on later versions "
                f"of its major version and on the next major version, unless built with exclude_lean_runtime); engines that would fit: "
                f"{_listing(would_fit)}. Install the TensorRT version named, or pull a version built with {local_tensorrt}"
            )
        ranked = fitting

    best = min(rank for rank, _ in ranked)
    top = [e for rank, e in ranked if rank == best]
    if len(top) > 1:
        raise RegistryError(
            f"{label} has {len(top)} targets that fit{f' {arch}' if arch else ''}: {_listing(top)}; "
            "choose one with --precision, --backend or --tag"
        )
    return top[0]


def local_arch() -> str:
    """This host's GPU architecture, for ``--arch auto``."""
    gpus = detect_gpus()
    if not gpus.available:
        raise RegistryError(f"--arch auto: {gpus.reason}; pass --arch sm_XX to pick the engine for a given GPU")
    archs = sorted({gpu.compute_capability for gpu in gpus.gpus})
    if len(archs) > 1:
        raise RegistryError(f"--arch auto: this host has GPUs of several architectures ({', '.join(archs)}); pass --arch with one of them")
    return archs[0]


def local_tensorrt_version() -> str | None:
    """The TensorRT runtime importable here (full, lean or dispatch), or None."""
    for module in ("tensorrt", "tensorrt_lean", "tensorrt_dispatch"):
        if importlib.util.find_spec(module) is None:
            continue
        try:
            return str(importlib.import_module(module).__version__)
        except (ImportError, OSError, AttributeError):
            continue
    return None


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trtforge"


class BlobCache:
    """Verified files by SHA-256, written only after their checksum matched a manifest: read-only copies, or a hard
    link to the file a cache-missing pull placed (see ``_keep``).

    Beside each blob, ``<sha256>.verified`` records the blob's stat at the moment its SHA-256
    was last checked; a lookup that finds the same stat skips re-hashing, any other stat (the
    blob was edited, replaced, truncated or touched) hashes it again. Every copy made from a
    blob is hashed too, which also catches a blob that a crash damaged behind its record.
    """

    def __init__(self, root: Path):
        self.root = root / "blobs" / "sha256"
        self.placements = root / "placed"

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def record_path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.verified"

    def lookup(self, entry: FileEntry) -> Path | None:
        """The cached blob of ``entry`` if it still holds the manifest's bytes, else None (download it)."""
        path = self.path(entry.sha256)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        if stat.st_size != entry.size:
            return None
        if self._recorded(entry.sha256) == _stat_record(stat):
            return path
        if sha256_file(path) != entry.sha256:
            return None
        self._record(entry.sha256, path)
        return path

    def placed(self, dest: Path, entry: FileEntry) -> bool:
        """Whether ``dest`` is, unchanged, the copy of ``entry`` an earlier pull placed there (a redeploy then writes
        nothing); a pulled file edited since no longer has the recorded stat, and is replaced."""
        try:
            return _read_json(self._placement_path(dest)) == {"sha256": entry.sha256, **_stat_record(dest.stat())}
        except OSError:
            return False

    def record_placement(self, dest: Path, entry: FileEntry) -> None:
        """Record ``dest``'s stat as placed; where it is the cache's own blob (see ``_keep``), record the blob too,
        after the rename into place, which changed the inode's ctime."""
        placed = dest.stat()
        self._write_record(self._placement_path(dest), {"sha256": entry.sha256, **_stat_record(placed)})
        blob = self.path(entry.sha256)
        with contextlib.suppress(OSError):
            if os.path.samestat(placed, blob.stat()):
                self._write_record(self.record_path(entry.sha256), _stat_record(placed))

    def fetch(self, store: ObjectStore, key: str, entry: FileEntry, partial: Path) -> None:
        """Download ``key`` in one pass into ``partial`` (a destination's temp file), hashed as it is written;
        IntegrityError, with nothing kept, unless it holds the manifest's bytes. The proven file then becomes the
        cache's blob as well (see ``_keep``)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RegistryError(
                f"cannot write to the pull cache {self.root}: {err.strerror}; pass --cache-dir or set {CACHE_ENV}"
            ) from None
        with open(partial, "wb") as placed, ThreadPoolExecutor(max_workers=1) as flusher:
            received = store.download_into(key, _FlushingWriter(placed, flusher))
        if received.sha256 != entry.sha256 or {received.size, os.stat(partial).st_size} != {entry.size}:
            raise IntegrityError(
                f"{store.uri}/{key} is corrupted: it has {received.size} bytes with SHA-256 {received.sha256}, but the manifest "
                f"records {entry.size} bytes with SHA-256 {entry.sha256}; nothing was written. Re-publish the model, or pull "
                "another version"
            )
        self._keep(partial, entry)

    def _keep(self, partial: Path, entry: FileEntry) -> None:
        """Make the downloaded, proven ``partial`` the cache's blob of ``entry``: a hard link where the cache is on the
        destination's filesystem, so a pull that misses the cache writes the engine once; else a copy.

        The linked blob shares the first placed file's inode, so an in-place edit of that file changes the blob too.
        Its stat record (taken in ``record_placement``, once the file has its name) then no longer matches, and the
        next lookup hashes the blob and downloads the file again. Pulls into other folders get copies, never links,
        so deploy folders never share a file with each other."""
        blob = self.path(entry.sha256)
        # Not synced: every later use of the blob hashes the copy it makes (see copy), so a blob a crash damaged is
        # caught there and downloaded again.
        try:
            blob.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(blob, durable=False) as incoming:
                incoming.unlink()
                try:
                    os.link(partial, incoming)
                    linked = True
                except OSError:
                    # Another filesystem, or one without hard links.
                    _kernel_copy(partial, incoming)
                    incoming.chmod(0o444)
                    linked = False
        except OSError:
            # A cache that cannot take the file costs the next pull a download, not this one its result.
            return
        if not linked:
            self._record(entry.sha256, blob)

    def copy(self, blob: Path, partial: Path, entry: FileEntry) -> bool:
        """Copy a cached blob into ``partial``: a reflink where the filesystem has them, else an in-kernel copy; never a
        hard link, so an edit of the pulled file cannot edit the cache. True once the copy is proven to hash to the
        manifest's SHA-256; otherwise the blob was damaged behind a stat record that still matches, and is evicted."""
        if not _reflink(blob, partial):
            _kernel_copy(blob, partial)
        with open(partial, "rb") as copy, ThreadPoolExecutor(max_workers=1) as disk:
            # The copy's pages are still in memory: hash them while the disk writes them out.
            flushed = disk.submit(os.fsync, copy.fileno())
            digest = hashlib.file_digest(copy, "sha256").hexdigest()
            flushed.result()
        if digest == entry.sha256:
            return True
        for path in (self.record_path(entry.sha256), blob):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        return False

    def _placement_path(self, dest: Path) -> Path:
        return self.placements / hashlib.sha256(os.fsencode(dest)).hexdigest()

    def _recorded(self, sha256: str) -> dict[str, Any] | None:
        return _read_json(self.record_path(sha256))

    def _record(self, sha256: str, blob: Path) -> None:
        # Taken after the rename into place: a rename can change the blob's ctime.
        self._write_record(self.record_path(sha256), _stat_record(blob.stat()))

    @staticmethod
    def _write_record(path: Path, record: dict[str, Any]) -> None:
        # Not synced: on ext4 that fsync would wait for the blob's own data to reach the disk. A record lost in a crash
        # costs one re-hash or re-copy; one that outlives its blob's data is caught by the hash of the copy.
        try:
            with atomic_output(path, durable=False) as partial:
                partial.write_text(json.dumps(record) + "\n")
        except OSError:
            # A read-only cache still serves verified blobs: each hit is then hashed, each file copied.
            pass


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _stat_record(stat: os.stat_result) -> dict[str, int]:
    # ctime cannot be set back by a user the way mtime can (touch -d), so an edit that restores
    # the mtime still shows.
    return {"inode": stat.st_ino, "device": stat.st_dev, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


# linux/fs.h: FICLONE = _IOW(0x94, 9, int), share the source's extents (btrfs, XFS, bcachefs).
_FICLONE = 0x40049409
_FLUSH_EVERY = 16 * 1024 * 1024


class _FlushingWriter:
    """A destination's temp file to download into, whose writeback starts as the data arrives, so the fsync that
    makes it durable has little left to wait for."""

    def __init__(self, placed: BinaryIO, flusher: ThreadPoolExecutor):
        self._placed = placed
        self._flusher = flusher
        self._flushing: Future | None = None
        self._unflushed = 0

    def write(self, data: bytes) -> int:
        self._placed.write(data)
        self._unflushed += len(data)
        if self._unflushed >= _FLUSH_EVERY and (self._flushing is None or self._flushing.done()):
            self._placed.flush()
            self._flushing = self._flusher.submit(os.fdatasync, self._placed.fileno())
            self._unflushed = 0
        return len(data)


def _kernel_copy(blob: Path, partial: Path) -> None:
    with open(blob, "rb") as source, open(partial, "wb") as target:
        remaining = os.fstat(source.fileno()).st_size
        try:
            while remaining > 0:
                copied = os.copy_file_range(source.fileno(), target.fileno(), remaining)
                if copied == 0:
                    break
                remaining -= copied
        except OSError:
            # Filesystems or kernels without copy_file_range between these two files.
            source.seek(0)
            target.seek(0)
            target.truncate()
            shutil.copyfileobj(source, target)


def _reflink(blob: Path, partial: Path) -> bool:
    try:
        import fcntl
    except ImportError:
        return False
    with open(blob, "rb") as source, open(partial, "wb") as target:
        try:
            fcntl.ioctl(target.fileno(), _FICLONE, source.fileno())
        except OSError:
            return False
    return True


class PulledFile(BaseModel):
    name: str
    path: str
    sha256: str
    size: int
    cached: bool


class PullResult(BaseModel):
    """What ``pull`` wrote: JSON-serialisable, the body of ``trtforge pull --json``."""

    model: str
    version: int
    tag: str
    path: str
    sha256: str
    cached: bool
    files: list[PulledFile]
    build: dict[str, Any]
    notes: list[str] = []
    signature_verified_with: str | None = None


# --- pull --fastest: the quickest of the engines that fit -----------------------------------------


def fastest_target(
    manifest: Manifest,
    *,
    arch: str | None = None,
    precision: str | None = None,
    backend: str | None = None,
    local_tensorrt: str | None = None,
    best: str = "latency",
) -> TargetEntry:
    """Of the targets ``choose_target`` would take for this request, the fastest by ``best``: ``latency`` (the lowest
    gate ``latency_ms_median``, at the opt shape) or ``throughput`` (the most samples/s at the opt or max batch).
    ``arch="auto"`` is this host's GPU, or its CPU engines where it has no GPU; ``"cpu"`` keeps the CPU engines.
    Only engines of the best architecture match compete: a hardware-compatible engine was timed on another GPU.

    The manifest's ``fastest`` choice for the place is taken where it is among those engines; otherwise (a version
    published before the manifest had the field, a --precision or --backend the choice is not of, an engine this
    host's TensorRT cannot load) the gate metrics of the engines are ranked here, as the publisher ranked them."""
    if best not in speed.BEST_BY:
        raise RegistryError(f"--best {best!r}: rank by one of {', '.join(speed.BEST_BY)}")
    if arch == "auto":
        arch = local_arch() if detect_gpus().available else "cpu"
    elif arch not in (None, "cpu"):
        arch = normalize_arch(arch)
    on_cpu = arch == "cpu"
    gpu_arch = None if on_cpu else arch
    ranked = []
    for entry in manifest.targets.values():
        facts = EngineFacts.of(entry.record)
        if on_cpu and facts.device != "cpu":
            continue
        try:
            choose_target(manifest, tag=entry.tag, arch=gpu_arch, precision=precision, backend=backend, local_tensorrt=local_tensorrt)
        except RegistryError:
            continue
        ranked.append((_EXACT if gpu_arch is None else arch_rank(facts, gpu_arch), entry))
    if not ranked:
        if on_cpu:
            raise NotFoundError(
                f"{manifest.model} version {manifest.version} has no CPU engine that fits; its targets: {_listing(list(manifest.targets.values()))}"
            )
        # Nothing fits: choose_target explains why, naming the targets.
        choose_target(manifest, arch=gpu_arch, precision=precision, backend=backend, local_tensorrt=local_tensorrt)
    nearest = min(rank for rank, _ in ranked)
    top = [entry for rank, entry in ranked if rank == nearest]
    recorded = manifest.fastest.get(arch) if arch is not None and nearest == _EXACT else None
    named = getattr(recorded, best) if recorded is not None else None
    if (chosen := next((entry for entry in top if entry.tag == named), None)) is not None:
        return chosen
    if best == "latency":
        scored = [(latency, entry.tag, entry) for entry in top if (latency := gate_latency(entry)) is not None]
        wanted = "latency_ms_median"
    else:
        scored = [(-found[0], entry.tag, entry) for entry in top if (found := speed.best_throughput(_gate_metrics(entry))) is not None]
        wanted = f"{speed.THROUGHPUT_OPT} or {speed.THROUGHPUT_MAX} (versions gated before throughput was recorded have neither: use --best latency)"
    if not scored:
        raise RegistryError(
            f"--fastest: no engine of {manifest.model} version {manifest.version} that fits records {wanted} in its "
            f"gate metrics: {_listing(top)}; choose one with --precision, --backend or --tag"
        )
    return min(scored, key=lambda item: (item[0], item[1]))[2]


def fastest_per_place(manifest: Manifest) -> dict[str, dict[str, str]]:
    """Per place (GPU architecture, ``cpu``), the tags of the fastest engine by latency and by throughput: the
    manifest's ``fastest`` field, or for a manifest without it, the same ranking over its targets' gate metrics."""
    if manifest.fastest:
        choices = {place: choice.model_dump() for place, choice in manifest.fastest.items()}
    else:
        choices = speed.fastest_per_place(
            (EngineFacts.of(entry.record).place, entry.tag, _gate_metrics(entry)) for entry in manifest.targets.values()
        )
    return {place: {by: choice[by] for by in speed.BEST_BY if choice.get(by)} for place, choice in choices.items()}


def _gate_metrics(entry: TargetEntry) -> dict[str, Any]:
    gate = entry.record.get("gate")
    metrics = gate.get("metrics") if isinstance(gate, dict) else None
    return metrics if isinstance(metrics, dict) else {}


def gate_latency(entry: TargetEntry) -> float | None:
    """The median latency the gate measured for this target, in ms, where its record has one."""
    return speed.latency_ms(_gate_metrics(entry))
