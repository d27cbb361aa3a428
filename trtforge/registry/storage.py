"""The object store under the registry: one small interface, a directory and an S3 implementation.

Both implementations give the same guarantees, which is all the registry relies on:

* an object becomes visible whole or not at all;
* ``put_if_absent`` creates an object only if the key is free, even under contention;
* ``put_if_match`` replaces an object only if it still has the ETag the caller read
  (compare-and-swap), and is refused for a missing key;
* ``upload_file`` and ``download_file`` hash the bytes in the same pass that moves them and
  report that SHA-256; ``upload_file`` also checks what the server stored (its size, and the
  SHA-256 checksums the server verified for every part where it supports them) before it
  reports success.

Keys are ``/``-separated paths relative to the store's root; segments are never empty,
``.`` or ``..``, and never start with ``.`` (the directory store keeps its temporary and
lock files under such names).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Protocol

from trtforge.errors import RegistryError

MiB = 1024 * 1024


class PreconditionFailed(Exception):
    """A conditional write lost: the key exists (create) or changed or vanished (compare-and-swap)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


class RegistryUnreachable(RegistryError):
    """The storage could not be reached at all (after retries); nothing was changed by the failed call."""


@dataclass(frozen=True)
class TransferSettings:
    """How large files move: part size and parallel parts for S3 multipart transfers, and a bandwidth cap for both stores."""

    part_size: int = 16 * MiB
    max_concurrency: int = 8
    max_bandwidth: int | None = None  # bytes per second; None for no cap

    def __post_init__(self) -> None:
        if self.part_size < 5 * MiB:
            raise RegistryError(f"transfer part size {self.part_size} is below S3's minimum of 5 MiB")
        if self.max_concurrency < 1:
            raise RegistryError(f"transfer concurrency {self.max_concurrency} must be at least 1")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime


@dataclass(frozen=True)
class StoredObject:
    data: bytes
    etag: str


@dataclass(frozen=True)
class PendingUpload:
    """An upload that started and never finished (a multipart upload, or a directory store temp file)."""

    key: str
    upload_id: str
    initiated: datetime


@dataclass(frozen=True)
class TransferredFile:
    """The SHA-256 and size of the bytes a transfer moved, hashed in the same pass that moved them."""

    sha256: str
    size: int


class Writable(Protocol):
    def write(self, data: bytes) -> int: ...


class HashingWriter:
    """A file to download into that hashes the bytes it writes, in the order they are written; use it as a
    context manager and take ``result()`` inside the block.

    It says it cannot seek, so boto3's transfer manager hands it the parts of a parallel
    ranged download in file order (``download_fileobj`` buffers those that arrive early).
    The SHA-256 runs in a thread of its own (hashlib lets go of the GIL), so the one thread
    that writes a download's bytes does not also hash them: on a 2-core machine that was
    the 0.5 s per GiB a pull took over a plain download.
    """

    _QUEUED_CHUNKS = 4

    def __init__(self, handle: BinaryIO | Writable):
        self._handle = handle
        self._digest = hashlib.sha256()
        self._size = 0
        # Bounded, so a hash that falls behind slows the download rather than filling memory.
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=self._QUEUED_CHUNKS)
        self._hasher = threading.Thread(target=self._hash, name="trtforge-sha256", daemon=True)

    def __enter__(self) -> HashingWriter:
        self._hasher.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._finish()

    def _hash(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._digest.update(chunk)

    def _finish(self) -> None:
        if self._hasher.is_alive():
            self._chunks.put(None)
            self._hasher.join()

    def write(self, data: bytes) -> int:
        self._handle.write(data)
        # A copy only where the caller may reuse its buffer once write returns.
        self._chunks.put(data if isinstance(data, bytes) else bytes(data))
        self._size += len(data)
        return len(data)

    def seekable(self) -> bool:
        return False

    def result(self) -> TransferredFile:
        self._finish()
        return TransferredFile(self._digest.hexdigest(), self._size)


class ObjectStore(Protocol):
    uri: str

    def put_if_absent(self, key: str, data: bytes) -> str:
        """Create ``key``; returns its ETag. Raises PreconditionFailed if it exists."""

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        """Replace ``key`` if its ETag is still ``etag``; returns the new ETag. Raises PreconditionFailed otherwise."""

    def put(self, key: str, data: bytes) -> str:
        """Create or replace ``key`` unconditionally; returns its ETag."""

    def get(self, key: str) -> StoredObject | None: ...

    def head(self, key: str) -> ObjectInfo | None: ...

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key."""

    def children(self, prefix: str) -> list[str]:
        """Names of the immediate sub-folders of ``prefix`` (which ends with ``/`` or is empty)."""

    def delete(self, key: str) -> None: ...

    def upload_file(self, key: str, path: Path) -> TransferredFile:
        """Create ``key`` from a local file (multipart where large), read once, and verify what was stored."""

    def download_file(self, key: str, dest: Path) -> TransferredFile:
        """Write the object's bytes to ``dest``; returns their SHA-256 and size, for the caller to check."""

    def download_into(self, key: str, handle: BinaryIO) -> TransferredFile:
        """Write the object's bytes in order to ``handle`` (anything with ``write``); returns their SHA-256 and size."""

    def pending_uploads(self, prefix: str) -> list[PendingUpload]: ...

    def abort_upload(self, upload: PendingUpload) -> None: ...

    def check_conditional_writes(self) -> None:
        """Raise RegistryError if the storage does not enforce put_if_absent / put_if_match."""


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or any(not part or part in (".", "..") or part.startswith(".") for part in parts):
        raise RegistryError(f"invalid object key {key!r}: segments must be non-empty and not start with '.'")
    return key


def check_store_uri(uri: str) -> None:
    """RegistryError unless ``uri`` is a store URI ``open_store`` takes; connects to nothing, so a run checks it
    before any of its work."""
    if uri.startswith("file://"):
        if not uri.removeprefix("file://"):
            raise RegistryError("registry URI 'file://' names no folder: use file://PATH, e.g. file://artifacts/registry")
        return
    if uri.startswith("s3://"):
        from trtforge.registry.s3 import parse_s3_uri

        parse_s3_uri(uri)
        return
    hint = f" (for a folder: file://{uri})" if "://" not in uri else ""
    raise RegistryError(f"registry URI {uri!r} is not file://PATH or s3://BUCKET/PREFIX{hint}")


def open_store(uri: str, transfer: TransferSettings | None = None) -> ObjectStore:
    """``file://PATH`` (relative to the working directory) or ``s3://BUCKET[/PREFIX]``."""
    check_store_uri(uri)
    transfer = transfer or TransferSettings()
    if uri.startswith("file://"):
        from trtforge.registry.directory import DirectoryStore

        return DirectoryStore(Path(os.path.abspath(uri.removeprefix("file://"))), transfer)
    from trtforge.registry.s3 import S3Store, parse_s3_uri

    bucket, prefix = parse_s3_uri(uri)
    return S3Store(bucket, prefix, transfer)
