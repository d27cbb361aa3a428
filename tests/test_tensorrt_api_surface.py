"""Every TensorRT name the backend and the GPU benchmark use exists in each supported TensorRT.

The tables (trtforge/data/tensorrt-api-<version>.json) are what tools/tensorrt_api_surface.py
read from NVIDIA's real bindings wheels; the names used are collected from the code's AST, so
a new call is checked without anyone listing it. The tables are flat (a name exists somewhere
in the module), so this catches removed and misspelled names, not a name used on the wrong class.
"""

from __future__ import annotations

import ast
import json
import typing
from pathlib import Path

import pytest

from trtforge.backends.tensorrt import TensorRTTarget

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "trtforge" / "backends" / "tensorrt.py", REPO / "benchmarks" / "gpu_engines.py"]
TABLES = sorted((REPO / "trtforge" / "data").glob("tensorrt-api-*.json"))
# Receivers that hold TensorRT objects without a trt.* call in sight: the module itself, and the
# builder config and engine that polygraphy's loaders hand back.
SEEDS = frozenset({"trt", "config", "engine"})


def _key(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _key(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def _tainted(node: ast.AST, holders: set[str]) -> bool:
    """Whether ``node`` evaluates to a TensorRT object (or the module): a holder, or a call on one."""
    if isinstance(node, ast.Name | ast.Attribute):
        return _key(node) in holders
    if isinstance(node, ast.Call):
        return _key(node.func) in holders or (isinstance(node.func, ast.Attribute) and _tainted(node.func.value, holders))
    if isinstance(node, ast.Subscript):
        return _tainted(node.value, holders)
    return False


def tensorrt_attributes(path: Path) -> dict[str, int]:
    """Each attribute the file reads on a TensorRT object, with the first line that does."""
    tree = ast.parse(path.read_text())
    holders = set(SEEDS)
    # What a call on a TensorRT object returns is one too (runtime -> engine -> context); to a fixed point.
    while True:
        before = len(holders)
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and _tainted(node.value, holders):
                holders.update(k for target in node.targets if (k := _key(target)))
        if len(holders) == before:
            break
    used: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            receiver = node.value
            on_holder = _key(receiver) in holders or (isinstance(receiver, ast.Call) and _tainted(receiver, holders))
            on_member = isinstance(receiver, ast.Attribute) and _key(receiver.value) == "trt"
            if on_holder or on_member:
                used.setdefault(node.attr, node.lineno)
    return used


def enum_members_from_target_options() -> set[str]:
    """The enum members the backend looks up by name from the target's options (``_enum_member``)."""

    def values(annotation) -> list[str]:
        if typing.get_origin(annotation) is typing.Literal:
            return list(typing.get_args(annotation))
        return [value for inner in typing.get_args(annotation) for value in values(inner)]

    members = set()
    for field in ("hardware_compatibility", "tiling_optimization_level"):
        members.update(value.upper() for value in values(TensorRTTarget.model_fields[field].annotation) if value != "none")
    return members


def used_names() -> dict[str, str]:
    names = {}
    for path in SOURCES:
        for name, line in tensorrt_attributes(path).items():
            names.setdefault(name, f"{path.relative_to(REPO)}:{line}")
    for member in enum_members_from_target_options():
        names.setdefault(member, "trtforge/backends/tensorrt.py (TensorRTTarget options)")
    return names


def table(version: str) -> set[str]:
    return set(json.loads((REPO / "trtforge" / "data" / f"tensorrt-api-{version}.json").read_text())["identifiers"])


def test_the_code_is_read_for_what_it_calls():
    names = used_names()
    # A sample from every kind of use: module members, enum values, calls on the runtime, engine, context, config, cache.
    for name in (
        "Runtime",
        "Logger",
        "WARNING",
        "deserialize_cuda_engine",
        "create_execution_context",
        "set_optimization_profile_async",
        "set_tensor_address",
        "execute_async_v3",
        "get_timing_cache",
        "combine",
        "serialize",
        "load_library",
        "create_engine_inspector",
        "AMPERE_PLUS",
        "MODERATE",
    ):
        assert name in names, name
    # Plain Python values are not taken for TensorRT objects.
    for name in ("split", "read_bytes", "append", "synchronize"):
        assert name not in names, (name, names.get(name))


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.stem)
def test_every_tensorrt_name_the_code_uses_exists_in_each_supported_version(path):
    data = json.loads(path.read_text())
    available = set(data["identifiers"])
    missing = {name: where for name, where in sorted(used_names().items()) if name not in available}
    assert not missing, f"TensorRT {data['version']} ({data['wheel']}) has no " + ", ".join(
        f"{n} (used at {w})" for n, w in missing.items()
    )


def test_known_removals_are_absent_from_tensorrt_11_and_present_in_10():
    eleven, ten = table("11.4"), table("10.16")
    # BuilderFlag.FP16/INT8-style precision flags and NetworkDefinitionCreationFlag.EXPLICIT_BATCH left in 11.
    for removed in ("FP16", "EXPLICIT_BATCH", "IInt8EntropyCalibrator2", "max_workspace_size"):
        assert removed not in eleven, removed
    for kept_in_ten in ("FP16", "EXPLICIT_BATCH", "IInt8EntropyCalibrator2"):
        assert kept_in_ten in ten, kept_in_ten
    # Names that exist only as the tail of a longer string are found: Runtime lives inside IRuntime.
    assert {"Runtime", "Logger", "Builder", "nptype", "__version__"} <= eleven & ten


def test_tables_name_their_wheel():
    versions = {json.loads(path.read_text())["version"].split(".")[0] for path in TABLES}
    assert versions == {"10", "11"}
    for path in TABLES:
        data = json.loads(path.read_text())
        assert path.name == f"tensorrt-api-{'.'.join(data['version'].split('.')[:2])}.json"
        assert data["package"] in data["wheel"].replace("_", "-") and len(data["wheel_sha256"]) == 64


def test_code_written_for_tensorrt_10_is_caught_against_11(tmp_path):
    old = tmp_path / "old_builder.py"
    old.write_text(
        "def build(trt, builder):\n"
        "    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))\n"
        "    config = builder.create_builder_config()\n"
        "    config.set_flag(trt.BuilderFlag.FP16)\n"
        "    return network, config\n"
    )
    used = tensorrt_attributes(old)
    assert {"NetworkDefinitionCreationFlag", "EXPLICIT_BATCH", "BuilderFlag", "FP16", "set_flag"} <= set(used)
    assert sorted(set(used) - table("11.4")) == ["EXPLICIT_BATCH", "FP16"]
    assert set(used) <= table("10.16")
