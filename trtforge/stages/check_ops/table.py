"""TensorRT's ONNX operator tables shipped in ``trtforge/data``, and which one answers for a TensorRT version.

A table describes one TensorRT release (``tensorrt_onnx_ops_<major>.<minor>.json``, written by
tools/tensorrt_ops_table.py from onnx-tensorrt's ``docs/operators.md`` of that release). A
TensorRT version without its own table is checked against the newest older one.
"""

from __future__ import annotations

import json
import re
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


def load_table(tensorrt_version: str | None = None) -> tuple[OperatorTable, str | None]:
    """The table for ``tensorrt_version`` (newest when None), and a note when an older one stands in."""
    tables = available_tables()
    if not tables:
        raise StageError(STAGE, f"no TensorRT operator table in {DATA_DIR}: reinstall trtforge")
    ordered = sorted(tables, key=version_key)
    note = None
    if tensorrt_version is None:
        chosen = ordered[-1]
    else:
        wanted = version_key(tensorrt_version)
        if len(wanted) < 2:
            raise StageError(STAGE, f"TensorRT version {tensorrt_version!r} is not a version like 10.1 or 10.1.0")
        older = [v for v in ordered if version_key(v) <= wanted]
        if not older:
            raise StageError(
                STAGE,
                f"no operator table for TensorRT {tensorrt_version} or older; trtforge has tables for "
                f"{', '.join(ordered)} (add one with tools/tensorrt_ops_table.py)",
            )
        chosen = older[-1]
        if version_key(chosen) != wanted:
            note = (
                f"trtforge has no operator table for TensorRT {tensorrt_version}; checked against {chosen}'s, the "
                f"newest older one: operators added since are reported unsupported, restrictions lifted since still apply"
            )
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
