"""How tests wait: on a state they can observe, with a deadline, never on a fixed delay.

A loaded CI machine makes every delay a guess; a condition polled until a deadline is right on a quiet machine and a
busy one alike, and fails with what it waited for.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
    process: subprocess.Popen | None = None,
    log: Path | None = None,
) -> T:
    """``condition()``'s first truthy result. Raises AssertionError after ``timeout`` seconds, or as soon as
    ``process`` (the one that should bring the state about) has exited; ``log``'s tail is added to the message."""
    deadline = time.monotonic() + timeout
    between_polls = threading.Event()
    while True:
        result = condition()
        if result:
            return result
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {process.returncode}{_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s{_tail(log)}")
        # The pause only spares the machine from busy polling: the outcome rests on the condition and the deadline.
        between_polls.wait(interval)


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    return "\n" + log.read_text(errors="replace")[-3000:]
