"""Validation of every name that becomes part of a registry key.

Model names, aliases, target tags, file names and timing-cache keys end up inside object
keys and local paths, so each is checked before anything is read or written: no ``/``, no
``..``, nothing that could leave the model's prefix or the destination folder of a pull.
"""

from __future__ import annotations

import re

from trtforge.errors import RegistryError
from trtforge.spec import SAFE_NAME

FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Top-level prefixes the registry uses for itself; a model of that name would collide with them.
RESERVED_MODEL_NAMES = frozenset({"timing-caches"})

_SAFE_RULE = "1-100 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit, without '..'"


def _check(kind: str, value: object, pattern: re.Pattern[str], rule: str) -> str:
    if not isinstance(value, str) or not pattern.match(value) or ".." in value:
        raise RegistryError(f"invalid {kind} {value!r}: use {rule}")
    return value


def check_model(name: object) -> str:
    model = _check("model name", name, SAFE_NAME, _SAFE_RULE)
    if model in RESERVED_MODEL_NAMES:
        raise RegistryError(f"invalid model name {model!r}: the registry keeps its own data under that name; rename the model")
    return model


def check_alias(name: object) -> str:
    return _check("alias", name, SAFE_NAME, _SAFE_RULE)


def check_tag(tag: object) -> str:
    return _check("target tag", tag, SAFE_NAME, _SAFE_RULE)


def check_file_name(name: object) -> str:
    return _check(
        "file name", name, FILE_NAME, "1-128 characters of A-Z, a-z, 0-9, '.', '_' or '-', starting with a letter or digit, without '..'"
    )


def check_cache_key(key: object) -> str:
    return _check("timing-cache key", key, SAFE_NAME, _SAFE_RULE)


def check_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RegistryError(f"invalid version {version!r}: versions are whole numbers starting at 1")
    return version
