"""Proof that an attack left everything outside its folder alone: nothing read, written or added.

``Outside(root)`` puts a secret file in ``root/outside`` and records every file under ``root``
(size, modification time) and every folder's listing. ``assert_untouched()`` then checks that
no file under ``root`` was added, removed or changed, and, where the file system records
access times, that the secret was never read.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

SECRET = b"outside-the-folder-secret\n" * 40
# relatime (the Linux default) updates an access time older than a day on every read.
OLD = time.time() - 3 * 24 * 3600


def _reads_update_access_time(folder: Path) -> bool:
    probe = folder / ".atime-probe"
    probe.write_bytes(b"probe")
    os.utime(probe, (OLD, OLD))
    probe.read_bytes()
    updated = probe.stat().st_atime > OLD + 1
    probe.unlink()
    return updated


class Outside:
    def __init__(self, root: Path):
        self.root = root
        self.folder = root / "outside"
        self.folder.mkdir(exist_ok=True)
        self.secret = self.folder / "secret.bin"
        self.secret.write_bytes(SECRET)
        self.reads_visible = _reads_update_access_time(self.folder)
        self.record()

    def record(self) -> None:
        """Take the state to compare against; call again after setting up links to the secret."""
        os.utime(self.secret, (OLD, OLD))
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, tuple]:
        """Every entry under the root: files by size and modification time, folders by presence."""
        entries: dict[str, tuple] = {}
        for path in sorted(self.root.rglob("*")):
            info = path.lstat()
            name = path.relative_to(self.root).as_posix()
            entries[name] = ("folder",) if path.is_dir() and not path.is_symlink() else (info.st_mode, info.st_size, info.st_mtime_ns)
        return entries

    def assert_untouched(self) -> None:
        after = self.snapshot()
        added = sorted(set(after) - set(self.before))
        removed = sorted(set(self.before) - set(after))
        changed = sorted(name for name in set(after) & set(self.before) if after[name] != self.before[name])
        assert (added, removed, changed) == ([], [], []), f"added {added}, removed {removed}, changed {changed}"
        if self.reads_visible:
            assert self.secret.stat().st_atime <= OLD + 1, "the secret outside the folder was read"
        assert self.secret.read_bytes() == SECRET
