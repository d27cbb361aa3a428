"""Named points of a publish where the crash-safety tests stop the publishing process.

A crash or a stall at a precise step (right after the version number is claimed, in the
middle of an upload, between the signature and the manifest, between two alias moves) cannot
be caused reliably from outside the process, so the publisher announces each step here.

* ``TRTFORGE_CRASH_AT=<point>``: the process sends itself SIGKILL there, which no cleanup code
  can intercept, exactly as the kernel's OOM killer or a lost machine would.
* ``TRTFORGE_PAUSE_AT=<point>``: the process sends itself SIGSTOP there and carries on when it
  gets SIGCONT, like a publisher on a frozen machine that wakes up after ``gc`` ran.

Unset, as they are outside those tests, every point does nothing.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "TRTFORGE_CRASH_AT"
PAUSE_ENV = "TRTFORGE_PAUSE_AT"
POINTS = ("allocated", "mid-upload", "uploaded", "signed", "published", "mid-alias-move")


def reached(point: str) -> None:
    if os.environ.get(CRASH_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(PAUSE_ENV) == point:
        os.kill(os.getpid(), signal.SIGSTOP)
