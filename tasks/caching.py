"""Cache keys from content: the same inputs (file sha256s, spec, code version) reuse a stage's result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from trtforge.hashing import code_version, sha256_file, sha256_text
from trtforge.spec import ModelSpec


def _fingerprint(value: Any) -> str:
    if isinstance(value, ModelSpec):
        return value.sha256()
    if isinstance(value, BaseModel):
        digest = getattr(value, "sha256", None)
        return digest if isinstance(digest, str) else value.model_dump_json()
    if isinstance(value, Path):
        return sha256_file(value) if value.is_file() else str(value)
    return json.dumps(value, sort_keys=True, default=str)


def content_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect ``cache_key_fn``: task name + code version + a fingerprint of every parameter."""
    parts = [context.task.name, code_version()]
    parts += [f"{name}={_fingerprint(value)}" for name, value in sorted(parameters.items())]
    return sha256_text(*parts)


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


def run_cached(task, *args: Any, **kwargs: Any) -> Any:
    """Call a cached task; if its cached result points at files deleted since, run it again."""
    result = task(*args, **kwargs)
    if outputs_exist(result):
        return result
    return task.with_options(refresh_cache=True)(*args, **kwargs)


TASK_OPTIONS: dict[str, Any] = {
    "cache_key_fn": content_cache_key,
    "persist_result": True,
    # JSON, not pickle: a pickle in result storage would be code run on load.
    "result_serializer": "json",
}
