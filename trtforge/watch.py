"""Finding the newest checkpoint in a watched location (a folder or an S3 prefix) and bringing it here.

A checkpoint counts once it is complete under its final name: writers put it in place with a
rename (a folder) or a single upload (S3), and names with a segment starting with ``.`` (the
usual temporary files) are never picked up. "Newest" is the latest modification time, ties
broken by name.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from pydantic import BaseModel

from trtforge.errors import CheckpointError, SpecError, TrtforgeError
from trtforge.modelload import import_callable
from trtforge.safeio import atomic_output, durable_replace
from trtforge.spec import ModelSpec, WatchSpec

S3_SCHEME = "s3://"


class FoundCheckpoint(BaseModel):
    uri: str
    name: str
    size: int
    modified: datetime


class RetrainResult(BaseModel):
    checkpoint: FoundCheckpoint
    train_metrics: dict[str, float] = {}
    seconds: float


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over ``/``-separated names: ``*`` and ``?`` stay within a segment, ``**/`` spans any number of them."""
    out, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**/", index):
            out.append("(?:[^/]+/)*")
            index += 3
            continue
        if pattern.startswith("**", index):
            out.append(".*")
            index += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[" and (close := pattern.find("]", index + 2)) != -1:
            body = pattern[index + 1 : close]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            index = close + 1
            continue
        else:
            out.append(re.escape(char))
        index += 1
    return re.compile("".join(out))


def _visible(name: str) -> bool:
    return not any(part.startswith(".") for part in name.split("/"))


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/name`` -> (``s3://bucket/a/b``, ``name``)."""
    folder, _, name = uri.rstrip("/").rpartition("/")
    if not name or folder in ("s3:", "s3:/"):
        raise CheckpointError(f"checkpoint {uri!r} names no object: use s3://BUCKET/PATH/TO/CHECKPOINT")
    return folder, name


def _open_s3(uri: str):
    from trtforge.registry.storage import open_store

    return open_store(uri.rstrip("/"))


def newest_checkpoint(watch: WatchSpec) -> FoundCheckpoint:
    """The newest file under ``watch.location`` whose path relative to it matches ``watch.pattern``."""
    matcher = glob_regex(watch.pattern)
    if watch.location.startswith(S3_SCHEME):
        store = _open_s3(watch.location)
        found = [
            FoundCheckpoint(uri=f"{store.uri}/{info.key}", name=info.key, size=info.size, modified=info.last_modified)
            for info in store.list("")
            if _visible(info.key) and matcher.fullmatch(info.key)
        ]
    else:
        root = Path(watch.location)
        if not root.is_dir():
            raise CheckpointError(
                f"watch.location {root} is not a folder: create it, or point watch.location in the spec at the folder checkpoints are written to"
            )
        found = []
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = [name for name in subfolders if not name.startswith(".")]
            for file in files:
                path = Path(folder) / file
                name = path.relative_to(root).as_posix()
                if _visible(name) and matcher.fullmatch(name) and path.is_file():
                    stat = path.stat()
                    found.append(
                        FoundCheckpoint(uri=str(path), name=name, size=stat.st_size, modified=datetime.fromtimestamp(stat.st_mtime, UTC))
                    )
    if not found:
        raise CheckpointError(
            f"no checkpoint matching {watch.pattern!r} in {watch.location}: write one there, or fix watch.location / watch.pattern in the spec"
        )
    return max(found, key=lambda checkpoint: (checkpoint.modified, checkpoint.name))


def local_checkpoint(uri: str, cache_dir: Path) -> Path:
    """A local file with the checkpoint's bytes: the path itself, or an S3 object downloaded once into ``cache_dir``."""
    if not uri.startswith(S3_SCHEME):
        path = Path(uri.removeprefix("file://"))
        if not path.is_file():
            raise CheckpointError(f"checkpoint {uri} does not exist or is not a file: pass an existing path or s3://BUCKET/KEY")
        return path
    folder, name = _split_s3(uri)
    store = _open_s3(folder)
    info = store.head(name)
    if info is None:
        raise CheckpointError(f"checkpoint {uri} does not exist: check the key, and that AWS_ENDPOINT_URL names the right store")
    # The object's key, size and time identify this upload: a new upload under the same key is fetched again.
    identity = hashlib.sha256(f"{uri}\0{info.size}\0{info.last_modified.isoformat()}".encode()).hexdigest()[:16]
    dest = cache_dir / identity / PurePosixPath(name).name
    if dest.is_file() and dest.stat().st_size == info.size:
        return dest
    with atomic_output(dest) as partial:
        store.download_file(name, partial)
        if partial.stat().st_size != info.size:
            raise CheckpointError(f"checkpoint {uri}: downloaded {partial.stat().st_size} bytes, the store lists {info.size}; run again")
    return dest


def retrain_into(spec: ModelSpec, work_dir: Path) -> RetrainResult:
    """Call the spec's train entry point and put the new checkpoint into the watch location under a timestamped name."""
    watch = spec.watch
    if watch is None or spec.train is None:
        raise SpecError("retraining into the watch location needs both a 'watch' section and a 'train' entry point in the spec")
    started = time.perf_counter()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    name = f"{spec.name}-{stamp}{spec.checkpoint.suffix or '.safetensors'}"
    if not glob_regex(watch.pattern).fullmatch(name):
        raise SpecError(
            f"watch.pattern {watch.pattern!r} does not match {name!r}, the name a retrained checkpoint gets: "
            f"use a pattern such as '*{spec.checkpoint.suffix or '.safetensors'}'"
        )
    train = import_callable(spec.train, spec.source, "train")
    if watch.location.startswith(S3_SCHEME):
        work_dir.mkdir(parents=True, exist_ok=True)
        written = work_dir / name
    else:
        Path(watch.location).mkdir(parents=True, exist_ok=True)
        # Hidden until complete, so a watcher looking meanwhile never takes a half-written file.
        written = Path(watch.location) / f".{name}"
    try:
        metrics = train(written) or {}
    except TrtforgeError:
        written.unlink(missing_ok=True)
        raise
    except Exception as err:
        written.unlink(missing_ok=True)
        raise CheckpointError(f"train entry point {spec.train!r} failed: {type(err).__name__}: {err}") from None
    if not written.is_file():
        raise SpecError(f"train entry point {spec.train!r} returned without writing the checkpoint {written}")
    if watch.location.startswith(S3_SCHEME):
        store = _open_s3(watch.location)
        stored = store.upload_file(name, written)
        written.unlink()
        info = store.head(name)
        found = FoundCheckpoint(uri=f"{store.uri}/{name}", name=name, size=stored.size, modified=info.last_modified)
    else:
        final = Path(watch.location) / name
        durable_replace(written, final)
        stat = final.stat()
        found = FoundCheckpoint(uri=str(final), name=name, size=stat.st_size, modified=datetime.fromtimestamp(stat.st_mtime, UTC))
    return RetrainResult(
        checkpoint=found, train_metrics={k: float(v) for k, v in dict(metrics).items()}, seconds=time.perf_counter() - started
    )
