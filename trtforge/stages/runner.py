"""The stages of a run, by name, and the one way every stage is called.

``Stage`` is the single list of stage names: the Prefect tasks, the run summary's timings,
error messages and the report all use it, so "calibration" and "validate-calibration" can no
longer disagree. ``run_stage`` times a stage function and names the stage on any project
error it raises, so a caller can turn that error into the stage's (or the target's) failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar

from trtforge.errors import TrtforgeError

T = TypeVar("T")


class Stage(str, Enum):
    RETRAIN = "retrain"
    EXPORT = "export"
    SIMPLIFY = "simplify"
    CHECK_OPS = "check-ops"
    VALIDATE_CALIBRATION = "validate-calibration"
    REFERENCE = "reference"
    CONVERT_PRECISION = "convert-precision"
    BUILD = "build"
    GATE = "gate"
    TIME = "time"
    SENSITIVITY = "sensitivity"
    PUBLISH = "publish"

    @property
    def per_target(self) -> bool:
        """Stages that run once per target: their failure is that target's, not the run's."""
        return self in (Stage.CONVERT_PRECISION, Stage.BUILD, Stage.GATE, Stage.TIME, Stage.SENSITIVITY)


# The top-level spec fields each cached stage reads, and so its cache key covers: a gate threshold
# or a target's options change no exported graph and no reference output.
SPEC_FIELDS_READ: dict[Stage, frozenset[str]] = {
    Stage.EXPORT: frozenset({"model", "model_kwargs", "inputs", "outputs", "export", "plugins", "allow_pickle_checkpoints"}),
    Stage.SIMPLIFY: frozenset({"inputs", "outputs", "export", "plugins"}),
    Stage.REFERENCE: frozenset({"model", "model_kwargs", "inputs", "outputs", "eval", "allow_pickle_checkpoints"}),
}


@dataclass(frozen=True)
class StageRun(Generic[T]):
    stage: Stage
    result: T
    seconds: float
    # Wall-clock (epoch) seconds: stages that overlap, in threads or before the flow, can be told apart.
    started_at: float


def failed_stage(err: BaseException) -> Stage | None:
    """The stage a project error was raised in, where ``run_stage`` (or a child process) named it."""
    name = getattr(err, "stage", None)
    try:
        return Stage(name) if name is not None else None
    except ValueError:
        return None


def run_stage(stage: Stage, function: Callable[..., T], *args: Any, **kwargs: Any) -> StageRun[T]:
    """Call one stage's library function; a project error leaves it with ``err.stage`` set to this stage."""
    started_at, started = time.time(), time.perf_counter()
    try:
        result = function(*args, **kwargs)
    except TrtforgeError as err:
        if getattr(err, "stage", None) is None:
            err.stage = stage.value
        raise
    return StageRun(stage=stage, result=result, seconds=time.perf_counter() - started, started_at=started_at)
