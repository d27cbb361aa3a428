"""Forked test children that end without running the parent test process's exit handlers."""

from __future__ import annotations

import multiprocessing.queues
import os
import sys
import traceback


def run_then_exit(target, *arguments) -> None:
    """Call ``target(*arguments)`` in a forked child, then leave with ``os._exit``.

    A fork inherits every atexit handler of the pytest process (Prefect's API clients and
    servers, torch's thread pools, ...) and those can fail in a child, turning a child that did
    its work into exit code 1. Queues among the arguments are flushed first.
    """
    status = 0
    try:
        target(*arguments)
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        for argument in arguments:
            if isinstance(argument, multiprocessing.queues.Queue):
                argument.close()
                argument.join_thread()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
