"""How many of one run's conversions and builds run at once on this worker."""

from __future__ import annotations

import os

from trtforge.environment import worker_cores
from trtforge.errors import TrtforgeError
from trtforge.spec import ModelSpec

PARALLEL_ENVIRONMENT = "TRTFORGE_PARALLEL"


def parallel_jobs(spec: ModelSpec) -> int:
    """TRTFORGE_PARALLEL where set (the worker's operator knows its machine), else the spec's ``parallel``, else the
    worker's cores: conversion and gating are themselves multi-threaded, so more jobs than cores only adds contention."""
    value = os.environ.get(PARALLEL_ENVIRONMENT)
    if value is None:
        return spec.parallel or worker_cores()
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise TrtforgeError(
            f"{PARALLEL_ENVIRONMENT}={value!r} is not a whole number of at least 1: set it to how many conversions and builds "
            f"run at once, e.g. {worker_cores()} (this worker's cores), or unset it"
        )
    return jobs
