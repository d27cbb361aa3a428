"""Fixtures shared by the test modules: real models, real data, real servers."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

# A Prefect home for each test process (each xdist worker): the CLI runs in the tests start
# ephemeral servers on its database, and two processes migrating one sqlite file lock each other.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="trtforge-tests-prefect-home-")

REPO = Path(__file__).resolve().parents[1]
DIGITS_DIR = REPO / "examples" / "digits"
DIGITS_SPEC = DIGITS_DIR / "spec.yaml"

# Fixture modules contributed by test areas (each owns its file).
pytest_plugins: list[str] = ["tests.s3_server", "tests.model_zoo", "tests.flow_harness"]


def tensorrt_skip_reason() -> str | None:
    """Why TensorRT tests cannot run here, or None when TensorRT and an NVIDIA GPU are present."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (install it from NVIDIA's pip index or use the NGC TensorRT container)"
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() == 0:
            return "no NVIDIA GPU visible to NVML"
    except Exception as err:  # NVML raises its own error family when no driver is loaded
        return f"no NVIDIA GPU: NVML unavailable ({err})"
    return None


def pytest_collection_modifyitems(config, items):
    reason = tensorrt_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "tensorrt" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_spec():
    from trtforge.spec import load_spec

    return load_spec(DIGITS_SPEC)


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory, digits_spec) -> Path:
    """A digits CNN trained once per test session with the example's own train entry point."""
    from trtforge.modelload import import_callable

    path = tmp_path_factory.mktemp("digits-checkpoint") / "digits-cnn.safetensors"
    import_callable(digits_spec.train, digits_spec.source, "train")(path)
    return path


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory, digits_spec, digits_checkpoint) -> Path:
    """The digits model exported and simplified by the real stages (dynamic batch 1/32/128)."""
    from trtforge.stages.export import export_onnx
    from trtforge.stages.simplify import simplify_onnx

    work = tmp_path_factory.mktemp("digits-onnx")
    exported = export_onnx(digits_spec, digits_checkpoint, work)
    return simplify_onnx(digits_spec, exported.onnx_path, work).onnx_path
