"""TensorRT's ONNX operator tables shipped in ``trtforge/data``, and which one answers for a TensorRT version.

A table describes one TensorRT release (``tensorrt_onnx_ops_<major>.<minor>.json``, written by
tools/tensorrt_ops_table.py from onnx-tensorrt's ``docs/operators.md`` of that release). A
TensorRT version is checked against the newest table of its major version: minor releases add
operators and lift restrictions, while a new major version changes what the parser takes (TensorRT
11 removed the precision builder flags and builds every network strongly typed), so a table of
another major version never stands in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtforge.errors import StageError
from trtforge.stages.check_ops.report import STAGE

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
TABLE_PREFIX = "tensorrt_onnx_ops_"


@dataclass(frozen=True)
class OperatorTable:
    """TensorRT's ONNX operator support for one release, as written by tools/tensorrt_ops_table.py."""

    path: Path
    tensorrt_version: str
    opset_min: int
    opset_max: int
    data_types: tuple[str, ...]
    quantized_types: tuple[str, ...]
    io_only_types: tuple[str, ...]
    limited_types: tuple[str, ...]
    operators: dict[str, dict[str, Any]]


def version_key(version: str) -> tuple[int, ...]:
    """``"10.1.0.27"`` -> ``(10, 1)``: tables are per major.minor release."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def available_tables() -> dict[str, Path]:
    """TensorRT version (major.minor) -> operator data file shipped with trtforge."""
    return {path.stem.removeprefix(TABLE_PREFIX): path for path in sorted(DATA_DIR.glob(f"{TABLE_PREFIX}*.json"))}


def table_version_for(tensorrt_version: str | None, versions: Iterable[str]) -> tuple[str, str | None]:
    """Which of ``versions`` (table versions, major.minor) answers for ``tensorrt_version``, and a note when not its own.

    None takes the newest table. Otherwise the table of the same major.minor, else the newest table
    of the same major version, with a note saying what that misses; a major version without any
    table is a ``StageError``.
    """
    ordered = sorted(versions, key=version_key)
    if not ordered:
        raise StageError(STAGE, f"no TensorRT operator table in {DATA_DIR}: reinstall trtforge")
    if tensorrt_version is None:
        return ordered[-1], None
    wanted = version_key(tensorrt_version)
    if len(wanted) < 2:
        raise StageError(STAGE, f"TensorRT version {tensorrt_version!r} is not a version like 10.1 or 10.1.0")
    exact = [v for v in ordered if version_key(v) == wanted]
    if exact:
        return exact[-1], None
    same_major = [v for v in ordered if version_key(v)[0] == wanted[0]]
    if not same_major:
        raise StageError(
            STAGE,
            f"no operator table for TensorRT {wanted[0]}.x (asked for {tensorrt_version}); trtforge has tables for "
            f"{', '.join(ordered)}, and a table of another major version does not describe this parser: check where "
            f"TensorRT {wanted[0]} is installed (its own parser), pass --tensorrt-version {ordered[-1]} to check against "
            f"that table knowingly, or add the {wanted[0]}.x table with tools/tensorrt_ops_table.py",
        )
    chosen = same_major[-1]
    if version_key(chosen) < wanted:
        missed = "operators added since are reported unsupported, and restrictions lifted since still apply"
    else:
        missed = f"operators and types added after {tensorrt_version} are reported supported"
    note = (
        f"trtforge has no operator table for TensorRT {tensorrt_version}; checked against {chosen}'s, the newest of "
        f"TensorRT {wanted[0]}: {missed}"
    )
    return chosen, note


def load_table(tensorrt_version: str | None = None) -> tuple[OperatorTable, str | None]:
    """The table for ``tensorrt_version`` (see ``table_version_for``), and the note when another release's stands in."""
    tables = available_tables()
    chosen, note = table_version_for(tensorrt_version, tables)
    path = tables[chosen]
    try:
        data = json.loads(path.read_text())
        table = OperatorTable(
            path=path,
            tensorrt_version=data["tensorrt_version"],
            opset_min=data["opset_min"],
            opset_max=data["opset_max"],
            data_types=tuple(data["data_types"]),
            quantized_types=tuple(data["quantized_types"]),
            io_only_types=tuple(data["io_only_types"]),
            limited_types=tuple(data["limited_types"]),
            operators=data["operators"],
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StageError(
            STAGE,
            f"operator table {path} cannot be read ({type(err).__name__}: {err}); regenerate it with "
            f"tools/tensorrt_ops_table.py, or reinstall trtforge",
        ) from None
    return table, note
