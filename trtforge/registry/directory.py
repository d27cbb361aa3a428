"""The directory store: the registry layout as plain files, safe for several processes at once.

Every write goes to a hidden temporary file in the destination folder first. A conditional
create then hard-links it into place, which fails if the name exists (the same O_EXCL
guarantee S3's ``If-None-Match: *`` gives); a compare-and-swap takes an exclusive ``flock``
on a hidden lock file beside the object, compares the SHA-256 of the current content with
the ETag the caller read, and renames over it. ETags are that SHA-256, so they depend only
on the content.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO

from trtforge.errors import NotFoundError, RegistryError
from trtforge.registry import crashpoints
from trtforge.registry.storage import (
    ObjectInfo,
    PendingUpload,
    PreconditionFailed,
    StoredObject,
    TransferSettings,
    UploadedFile,
    check_key,
)

_TEMP_MARK = ".tmp-"
_COPY_BLOCK = 8 * 1024 * 1024


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _mtime(stat: os.stat_result) -> datetime:
    return datetime.fromtimestamp(stat.st_mtime, tz=UTC)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    def _temp_beside(self, path: Path) -> Iterator[tuple[Path, BinaryIO]]:
        """An open hidden temp file in ``path``'s folder; removed unless the caller moved it into place."""
        temp = path.parent / f".{path.name}{_TEMP_MARK}{uuid.uuid4().hex}"
        # gc may prune an emptied folder between our mkdir and open: recreate it and try again.
        for attempt in range(5):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(temp, "xb")
                break
            except FileNotFoundError:
                if attempt == 4:
                    raise
            except OSError as err:
                raise RegistryError(f"cannot write to registry folder {path.parent}: {err.strerror}; check its permissions") from None
        try:
            with handle:
                yield temp, handle
        finally:
            temp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _staged(self, path: Path, data: bytes) -> Iterator[Path]:
        """A synced hidden temp file holding ``data`` beside ``path``, for the caller to link or rename into place."""
        with self._temp_beside(path) as (temp, handle):
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            yield temp

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _link_new(self, temp: Path, path: Path, key: str) -> None:
        try:
            os.link(temp, path)
        except FileExistsError:
            raise PreconditionFailed(key) from None
        except OSError as err:
            raise RegistryError(
                f"cannot create {self.uri}/{key}: {err.strerror}; the directory registry needs a local "
                "filesystem with hard links (use an s3:// registry on other storage)"
            ) from None

    def put_if_absent(self, key: str, data: bytes) -> str:
        path = self._path(key)
        with self._staged(path, data) as temp:
            self._link_new(temp, path, key)
        _fsync_dir(path.parent)
        return _etag(data)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        path = self._path(key)
        with self._locked(path):
            current = self._read(path)
            if current is None or _etag(current) != etag:
                raise PreconditionFailed(key)
            self._replace(path, data)
        return _etag(data)

    def put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        with self._locked(path):
            self._replace(path, data)
        return _etag(data)

    def _replace(self, path: Path, data: bytes) -> None:
        with self._staged(path, data) as temp:
            os.replace(temp, path)
        _fsync_dir(path.parent)

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

    def upload_file(self, key: str, path: Path) -> UploadedFile:
        target = self._path(key)
        digest = hashlib.sha256()
        size = 0
        block_size = min(_COPY_BLOCK, max(self._max_bandwidth // 4, 64 * 1024)) if self._max_bandwidth else _COPY_BLOCK
        started = time.monotonic()
        try:
            with self._temp_beside(target) as (temp, handle), open(path, "rb") as source:
                # Hash the bytes as they are written, so what is stored is exactly what is reported.
                while block := source.read(block_size):
                    handle.write(block)
                    digest.update(block)
                    size += len(block)
                    crashpoints.reached("mid-upload")
                    if self._max_bandwidth:
                        time.sleep(max(0.0, size / self._max_bandwidth - (time.monotonic() - started)))
                handle.flush()
                os.fsync(handle.fileno())
                # Published files are immutable: read-only guards them against an accidental edit in place.
                os.fchmod(handle.fileno(), 0o444)
                self._link_new(temp, target, key)
            _fsync_dir(target.parent)
        except OSError as err:
            raise RegistryError(f"cannot copy {path} to {self.uri}/{key}: {err.strerror}") from None
        return UploadedFile(digest.hexdigest(), size)

    def download_file(self, key: str, dest: Path) -> None:
        try:
            shutil.copyfile(self._path(key), dest)
        except FileNotFoundError:
            raise NotFoundError(f"{self.uri}/{key} is missing from the registry") from None

    def pending_uploads(self, prefix: str) -> list[PendingUpload]:
        pending = []
        for folder, names in self._walk(prefix):
            for name in names:
                if not name.startswith(".") or _TEMP_MARK not in name:
                    continue
                final, _, _ = name[1:].rpartition(_TEMP_MARK)
                key = self._key(folder / final)
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
