"""A run's first stages, started before its flow: while Prefect's API server starts and Prefect imports.

A cold run's first stages, the checkpoint (trained where it is missing) and the ONNX export, need
neither Prefect nor its API. Run by the flow, they would wait for both: about 5 s on a 2-core
machine, most of a small model's orchestration. ``HeadStart`` runs them in a thread of the
process that then runs the flow, as soon as the CLI knows the run is not up to date. The flow's
tasks for those stages take the results (waiting where a stage is still running) instead of
running it again, so the Prefect run still shows every stage, its log line and its outcome, and
a stage's error is raised by its task, as if the task had run it. A result is taken only by a
task called with exactly the arguments the head start used; any other call runs the stage itself.

The export is started only for a work folder that holds no exported graph: where one is there,
the flow's export task is a cache hit, and a head start would export for nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtforge.lineage import export_work_dir
from trtforge.spec import ModelSpec
from trtforge.stages.checkpoint import ensure_checkpoint
from trtforge.stages.export import EXPORTED_GRAPH, export_onnx
from trtforge.stages.runner import Stage, StageRun, run_stage

HEAD_STARTED = (Stage.RETRAIN, Stage.EXPORT)


@dataclass(frozen=True)
class _Started:
    """A stage the head start ran: the task arguments it ran with, and its run (or the error it raised)."""

    arguments: dict[str, Any]
    run: Future[StageRun]


class HeadStart:
    def __init__(self, spec: ModelSpec, checkpoint: Path | None, artifacts: Path):
        self.spec, self.checkpoint, self.artifacts = spec, checkpoint, artifacts.resolve()
        # Each resolves to the stage the head start ran, or None where it ran none.
        self._started: dict[Stage, Future[_Started | None]] = {stage: Future() for stage in HEAD_STARTED}
        self._taken: dict[Stage, StageRun] = {}
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trtforge-head-start", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            checkpoint = self._start(Stage.RETRAIN, {"spec": self.spec, "checkpoint": self.checkpoint}, ensure_checkpoint)
            if checkpoint is None:
                return
            work_dir = export_work_dir(self.artifacts, self.spec, checkpoint.sha256)
            if not self._ended.is_set() and not (work_dir / EXPORTED_GRAPH).is_file():
                arguments = {"spec": self.spec, "checkpoint": checkpoint, "work_dir": work_dir}
                self._start(Stage.EXPORT, arguments, lambda spec, checkpoint, work_dir: export_onnx(spec, checkpoint.path, work_dir))
        finally:
            # A stage not started here is the flow's to run: its task must not wait for it.
            for started in self._started.values():
                if not started.done():
                    started.set_result(None)

    def _start(self, stage: Stage, arguments: dict[str, Any], function) -> Any:
        run: Future[StageRun] = Future()
        self._started[stage].set_result(_Started(arguments, run))
        try:
            done = run_stage(stage, function, **arguments)
        except BaseException as err:
            run.set_exception(err)
            return None
        run.set_result(done)
        return done.result

    def take(self, stage: Stage, arguments: dict[str, Any]) -> StageRun | None:
        """The run of ``stage`` with these task arguments, once it is over (its error raised here); None where the
        head start ran no such stage."""
        if stage not in self._started:
            return None
        started = self._started[stage].result()
        if started is None or started.arguments != arguments:
            return None
        done = started.run.result()
        with self._lock:
            self._taken[stage] = done
        return done

    def taken(self, stage: Stage) -> StageRun | None:
        """The run a task of ``stage`` took last, for the run summary's timing (once)."""
        with self._lock:
            return self._taken.pop(stage, None)

    def finish(self) -> None:
        """Start nothing more, and wait for what is still running (a run that ended before taking its stages: the
        server failed, an earlier stage failed): no export child outlives the run, no checkpoint is half-written."""
        self._ended.set()
        self._thread.join()

    def interrupt(self) -> None:
        """Stop the running stage the way Ctrl-C stops one on the main thread: KeyboardInterrupt, raised in the head
        start's thread at its next Python step (a training loop's next batch; an export's wait for its child, which
        it then kills). ``finish`` then waits only for that stage's cleanup, not for the training to end."""
        self._ended.set()
        if self._thread.ident is not None and self._thread.is_alive():
            # CPython's documented way to raise in another thread; signals reach only the main thread.
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread.ident), ctypes.py_object(KeyboardInterrupt))


_current: HeadStart | None = None


@contextlib.contextmanager
def head_start(spec: ModelSpec, checkpoint: Path | None, artifacts: Path) -> Iterator[HeadStart]:
    """Run the head start for the block: the flow run inside takes its stages."""
    global _current
    started = HeadStart(spec, checkpoint, artifacts)
    started.start()
    _current = started
    try:
        yield started
    except KeyboardInterrupt:
        started.interrupt()
        raise
    finally:
        _current = None
        started.finish()


def take(stage: Stage, arguments: dict[str, Any]) -> StageRun | None:
    """What a stage's task takes instead of running the stage: the running head start's run of it, if any."""
    return _current.take(stage, arguments) if _current is not None else None


def taken(stage: Stage) -> StageRun | None:
    return _current.taken(stage) if _current is not None else None
