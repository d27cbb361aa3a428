"""The directory store: the registry layout as plain files, safe for several processes at once.

Every write goes through ``trtforge.safeio``'s atomic writer: a hidden, synced temporary file
in the destination folder first. A conditional create then hard-links it into place, which
fails if the name exists (the same O_EXCL guarantee S3's ``If-None-Match: *`` gives); a
compare-and-swap takes an exclusive ``flock`` on a hidden lock file beside the object,
compares the SHA-256 of the current content with the ETag the caller read, and renames over
it. ETags are that SHA-256, so they depend only on the content.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO

from trtforge.errors import NotFoundError, RegistryError
from trtforge.registry import crashpoints
from trtforge.registry.storage import (
    HashingWriter,
    ObjectInfo,
    PendingUpload,
    PreconditionFailed,
    StoredObject,
    TransferredFile,
    TransferSettings,
    Writable,
    check_key,
)
from trtforge.safeio import atomic_write_bytes, atomic_writer, is_temporary, temporary_target

_COPY_BLOCK = 8 * 1024 * 1024


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _mtime(stat: os.stat_result) -> datetime:
    return datetime.fromtimestamp(stat.st_mtime, tz=UTC)


class DirectoryStore:
    def __init__(self, root: Path, transfer: TransferSettings | None = None):
        self.root = root
        self.uri = f"file://{root}"
        # A cap keeps a big publish from saturating a shared disk or network filesystem.
        self._max_bandwidth = transfer.max_bandwidth if transfer else None

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    @contextlib.contextmanager
    def _writing(self, key: str, failure: str) -> Iterator[None]:
        """Registry errors for one write of ``key``: a conditional create that lost, or a folder that refuses it."""
        try:
            yield
        except FileExistsError:
            raise PreconditionFailed(key) from None
        except OSError as err:
            raise RegistryError(
                f"{failure}: {err.strerror}; check the registry folder's permissions: the directory registry needs "
                "a local filesystem with hard links (use an s3:// registry on other storage)"
            ) from None

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def put_if_absent(self, key: str, data: bytes) -> str:
        with self._writing(key, f"cannot create {self.uri}/{key}"):
            atomic_write_bytes(self._path(key), data, exclusive=True)
        return _etag(data)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        path = self._path(key)
        with self._locked(path):
            current = self._read(path)
            if current is None or _etag(current) != etag:
                raise PreconditionFailed(key)
            self._replace(path, key, data)
        return _etag(data)

    def put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        with self._locked(path):
            self._replace(path, key, data)
        return _etag(data)

    def _replace(self, path: Path, key: str, data: bytes) -> None:
        with self._writing(key, f"cannot write {self.uri}/{key}"):
            atomic_write_bytes(path, data)

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def get(self, key: str) -> StoredObject | None:
        data = self._read(self._path(key))
        return None if data is None else StoredObject(data, _etag(data))

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            stat = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjectInfo(key, stat.st_size, _mtime(stat)) if S_ISREG(stat.st_mode) else None

    def _walk(self, prefix: str) -> Iterator[tuple[Path, list[str]]]:
        """Folders under the deepest folder that ``prefix`` names, with their file names (hidden ones included)."""
        folder = self.root.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self.root
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            yield Path(dirpath), filenames

    def list(self, prefix: str) -> list[ObjectInfo]:
        found = []
        for folder, names in self._walk(prefix):
            for name in names:
                if name.startswith("."):
                    continue
                path = folder / name
                key = self._key(path)
                if not key.startswith(prefix):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    stat = path.stat()
                    found.append(ObjectInfo(key, stat.st_size, _mtime(stat)))
        return sorted(found, key=lambda info: info.key)

    def children(self, prefix: str) -> list[str]:
        folder = self.root.joinpath(*prefix.rstrip("/").split("/")) if prefix else self.root
        try:
            return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        self._prune(path.parent)

    def _prune(self, folder: Path) -> None:
        """Remove folders left empty, up to the root, so collected versions leave nothing behind."""
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def upload_file(self, key: str, path: Path) -> TransferredFile:
        target = self._path(key)
        digest = hashlib.sha256()
        size = 0
        block_size = min(_COPY_BLOCK, max(self._max_bandwidth // 4, 64 * 1024)) if self._max_bandwidth else _COPY_BLOCK
        started = time.monotonic()
        with self._writing(key, f"cannot copy {path} to {self.uri}/{key}"):
            with open(path, "rb") as source, atomic_writer(target, exclusive=True) as handle:
                # Hash the bytes as they are written, so what is stored is exactly what is reported.
                while block := source.read(block_size):
                    handle.write(block)
                    digest.update(block)
                    size += len(block)
                    crashpoints.reached("mid-upload")
                    if self._max_bandwidth:
                        time.sleep(max(0.0, size / self._max_bandwidth - (time.monotonic() - started)))
                # Published files are immutable: read-only guards them against an accidental edit in place.
                os.fchmod(handle.fileno(), 0o444)
        return TransferredFile(digest.hexdigest(), size)

    def download_file(self, key: str, dest: Path) -> TransferredFile:
        with self._open(key) as source, open(dest, "wb") as handle:
            return self._copy_out(source, handle)

    def download_into(self, key: str, handle: BinaryIO | Writable) -> TransferredFile:
        with self._open(key) as source:
            return self._copy_out(source, handle)

    def _open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"{self.uri}/{key} is missing from the registry") from None

    @staticmethod
    def _copy_out(source: BinaryIO, handle: BinaryIO | Writable) -> TransferredFile:
        with HashingWriter(handle) as written:
            shutil.copyfileobj(source, written, _COPY_BLOCK)
            return written.result()

    def pending_uploads(self, prefix: str) -> list[PendingUpload]:
        pending = []
        for folder, names in self._walk(prefix):
            for name in names:
                if not is_temporary(name):
                    continue
                key = self._key(folder / temporary_target(name))
                if not key.startswith(prefix):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    started = _mtime((folder / name).stat())
                    pending.append(PendingUpload(key, name, started))
        return sorted(pending, key=lambda upload: (upload.key, upload.upload_id))

    def abort_upload(self, upload: PendingUpload) -> None:
        folder = self._path(upload.key).parent
        (folder / upload.upload_id).unlink(missing_ok=True)
        self._prune(folder)

    def check_conditional_writes(self) -> None:
        """Hard links and flock are checked on the first write that uses them."""
