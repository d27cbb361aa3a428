"""Stage 'retrain': make sure a checkpoint exists, training one with the spec's entry point if not."""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel

from trtforge.errors import CheckpointError, SpecError
from trtforge.hashing import sha256_file
from trtforge.modelload import import_callable
from trtforge.spec import ModelSpec


class CheckpointResult(BaseModel):
    path: Path
    sha256: str
    trained: bool
    train_metrics: dict[str, float] = {}
    seconds: float = 0.0


def ensure_checkpoint(spec: ModelSpec, checkpoint: Path | None = None) -> CheckpointResult:
    """Use ``checkpoint`` if given, else the spec's; train with the spec's ``train`` entry point if it is missing."""
    started = time.perf_counter()
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise CheckpointError(f"checkpoint {checkpoint} (from --checkpoint) does not exist")
        return CheckpointResult(path=checkpoint, sha256=sha256_file(checkpoint), trained=False)
    path = spec.checkpoint
    if path.is_file():
        return CheckpointResult(path=path, sha256=sha256_file(path), trained=False)
    if spec.train is None:
        raise CheckpointError(
            f"checkpoint {path} does not exist and the spec has no 'train' entry point: "
            "pass --checkpoint PATH or add train: 'file.py:function' to the spec"
        )
    train = import_callable(spec.train, spec.source, "train")
    try:
        metrics = train(path) or {}
    except Exception as err:
        raise CheckpointError(f"train entry point {spec.train!r} failed: {type(err).__name__}: {err}") from None
    if not path.is_file():
        raise SpecError(f"train entry point {spec.train!r} returned without writing the checkpoint {path}")
    return CheckpointResult(
        path=path,
        sha256=sha256_file(path),
        trained=True,
        train_metrics={k: float(v) for k, v in dict(metrics).items()},
        seconds=time.perf_counter() - started,
    )
