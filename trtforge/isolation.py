"""Running native-library work (onnxsim, ModelOpt, engine builds) in a child process.

onnxsim, protobuf parsers and engine builders can segfault or abort on unusual models. In a
child process that kills only the stage: the parent reports which stage, the exit signal
and the child's last log lines, and the flow and worker survive. Storage credentials are
removed from the child's environment because none of this work needs them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from trtforge.errors import StageError, TrtforgeError

T = TypeVar("T")
CREDENTIAL_PREFIXES = ("AWS_", "TRTFORGE_SIGNING_", "PREFECT_API_KEY")
LOG_TAIL_LINES = 20


def _child_main(conn, function, args, kwargs, memory_mb, log_path):
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    for name in list(os.environ):
        if name.startswith(CREDENTIAL_PREFIXES):
            del os.environ[name]
    if memory_mb:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        conn.send(("ok", function(*args, **kwargs)))
    except TrtforgeError as err:
        conn.send(("user-error", type(err).__module__, type(err).__qualname__, str(err)))
    except BaseException as err:  # report anything, including MemoryError, to the parent
        conn.send(("error", f"{type(err).__name__}: {err}", traceback.format_exc(limit=-3)))
    finally:
        conn.close()


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-LOG_TAIL_LINES:])


def run_isolated(
    stage: str,
    function: Callable[..., T],
    *args: Any,
    timeout_s: float | None = None,
    memory_mb: int | None = None,
    **kwargs: Any,
) -> T:
    """Call ``function(*args, **kwargs)`` in a fresh child process and return its result.

    ``function`` must be importable at module level (the child is spawned, not forked, so it
    starts clean of the parent's threads and CUDA state).
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    with tempfile.TemporaryDirectory(prefix=f"trtforge-{stage}-") as tmp:
        log_path = Path(tmp) / "child.log"
        log_path.touch()
        # Not a daemon, so that isolated work can isolate work of its own (an engine build probing the engine);
        # the finally below ends the child on every way out instead.
        process = context.Process(target=_child_main, args=(sender, function, args, kwargs, memory_mb, str(log_path)), daemon=False)
        process.start()
        sender.close()
        answered = False
        try:
            if not _wait_for_answer(receiver, timeout_s):
                process.kill()
                process.join()
                raise StageError(stage, f"timed out after {timeout_s:.0f} s; last output:\n{_tail(log_path)}")
            try:
                message = receiver.recv()
                answered = True
            except EOFError:
                process.join()
                raise StageError(stage, _describe_death(process.exitcode, log_path)) from None
        finally:
            receiver.close()
            if not answered:
                process.kill()
                process.join()
        process.join()
        status, *payload = message
        if status == "ok":
            return payload[0]
        if status == "user-error":
            raise _user_error(stage, *payload)
        detail, child_traceback = payload
        raise StageError(stage, f"failed in the child process: {detail}\n{child_traceback.strip()}")


# How long a wait for the child blocks in C at a time: a KeyboardInterrupt raised in a waiting thread other than the
# main one (see trtforge.headstart) takes effect only between two waits.
_WAIT_SLICE_S = 0.1


def _wait_for_answer(receiver, timeout_s: float | None) -> bool:
    """Whether the child answered (or died) within ``timeout_s`` (None: no limit)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        left = _WAIT_SLICE_S if deadline is None else min(_WAIT_SLICE_S, deadline - time.monotonic())
        if receiver.poll(max(left, 0.0)):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


def _user_error(stage: str, module: str, qualname: str, message: str) -> TrtforgeError:
    """The child's user error as the same class (every TrtforgeError takes its message alone), naming the stage."""
    if not message.startswith(f"{stage}: "):
        message = f"{stage}: {message}"
    error_class = getattr(sys.modules.get(module), qualname, None)
    if isinstance(error_class, type) and issubclass(error_class, TrtforgeError):
        return error_class(message)
    return StageError(message)


def _describe_death(exitcode: int | None, log_path: Path) -> str:
    if exitcode is not None and exitcode < 0:
        how = f"crashed with signal {signal.Signals(-exitcode).name}"
    else:
        how = f"exited with code {exitcode} without a result"
    tail = _tail(log_path)
    return f"the child process {how}" + (f"; last output:\n{tail}" if tail else "")
