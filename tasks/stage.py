"""The one way a stage becomes a Prefect task: its name, logging, content cache key and result storage.

Every task module declares its task with ``stage_task``: the task is named after its
``Stage``, calls the stage's library function through ``run_stage`` (which names the stage on
any project error), logs one line describing the result, and, where ``cached``, is keyed by
the content of its inputs. The flow runs each through ``run_step``, which records the stage's
timing and description in the run summary.
"""

from __future__ import annotations

import functools
import inspect
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from pydantic import BaseModel

from trtforge import headstart
from trtforge.hashing import sha256_file
from trtforge.lineage import stage_cache_key, stage_spec_sha256
from trtforge.spec import ModelSpec
from trtforge.stages.runner import Stage, run_stage
from trtforge.summary import RunSummary, StageTiming


def _fingerprint(value: Any, stage: Stage) -> str:
    if isinstance(value, ModelSpec):
        return stage_spec_sha256(value, stage)
    if isinstance(value, BaseModel):
        digest = getattr(value, "sha256", None)
        return digest if isinstance(digest, str) else value.model_dump_json()
    if isinstance(value, Path):
        return sha256_file(value) if value.is_file() else str(value)
    return json.dumps(value, sort_keys=True, default=str)


def content_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect ``cache_key_fn``: task name + trtforge's code (library, tasks, flows) + a fingerprint of every parameter."""
    stage = Stage(context.task.name)
    return stage_cache_key(stage, *(f"{name}={_fingerprint(value, stage)}" for name, value in sorted(parameters.items())))


CACHED_OPTIONS: dict[str, Any] = {
    "cache_key_fn": content_cache_key,
    "persist_result": True,
    # JSON, not pickle: a pickle in result storage would be code run on load.
    "result_serializer": "json",
}


def stage_task(stage: Stage, *, describe: Callable[[Any], str], cached: bool = False, **options: Any):
    """Decorate a stage's task body (which calls one library function) into its Prefect task."""

    def decorate(body: Callable[..., Any]):
        signature = inspect.signature(body)

        @functools.wraps(body)
        def run(*args: Any, **kwargs: Any) -> Any:
            arguments = signature.bind(*args, **kwargs)
            arguments.apply_defaults()
            taken = headstart.take(stage, dict(arguments.arguments))
            done = taken or run_stage(stage, body, *args, **kwargs)
            where = ", run while Prefect's API started" if taken else ""
            get_run_logger().info("%s: %s (%.1f s%s)", stage.value, describe(done.result), done.seconds, where)
            return done.result

        prefect_task = task(name=stage.value, **(CACHED_OPTIONS if cached else {}), **options)(run)
        prefect_task.stage, prefect_task.describe, prefect_task.cached = stage, describe, cached
        return prefect_task

    return decorate


def outputs_exist(result: Any) -> bool:
    """A cached result is only usable while the files it points to are still there."""
    if isinstance(result, BaseModel):
        return all(outputs_exist(getattr(result, name)) for name in type(result).model_fields)
    if isinstance(result, Path):
        return result.exists()
    if isinstance(result, dict):
        return all(outputs_exist(v) for v in result.values())
    if isinstance(result, (list, tuple)):
        return all(outputs_exist(v) for v in result)
    return True


def run_step(summary: RunSummary, stage_task: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one stage task (again, if its cached result points at files deleted since) and record its timing: the
    stage's own where the task took it from the head start."""
    started_at, started = time.time(), time.perf_counter()
    state = stage_task(*args, return_state=True, **kwargs)
    result = state.result()
    if stage_task.cached and not outputs_exist(result):
        state = stage_task.with_options(refresh_cache=True)(*args, return_state=True, **kwargs)
        result = state.result()
    # Prefect's cache hits are states named "Cached"; stages with file caches say so in their result.
    cached = state.name == "Cached" or getattr(result, "cached", False) is True
    seconds = time.perf_counter() - started
    head_started = headstart.taken(stage_task.stage)
    if head_started is not None:
        seconds, started_at = head_started.seconds, head_started.started_at
    timing = StageTiming(
        stage=stage_task.stage,
        seconds=seconds,
        started_at=started_at,
        detail=stage_task.describe(result),
        cached=cached,
        head_start=head_started is not None,
    )
    summary.stages.append(timing)
    return result
