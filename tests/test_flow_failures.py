"""A run's promises off the happy path: an optional target that fails never takes the run down, and
every run that got past the up-to-date check leaves its report and an empty staging area.

The build crash is caused by a backend defined here whose build kills its own process with
SIGSEGV: a segfaulting engine builder is a fault this machine cannot otherwise produce on
demand, and everything around it (the isolated child, the flow, the publish) is the real one.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import yaml

from tests.conftest import DIGITS_DIR
from tests.flow_harness import run_flow, write_spec
from trtforge.backends.base import Availability, BuildOptions, BuiltEngine, register_backend
from trtforge.errors import SpecError, StageError
from trtforge.registry import open_registry
from trtforge.spec import ModelSpec, Target


class SegfaultingTarget(Target):
    backend: Literal["segfaults-on-build"] = "segfaults-on-build"


class SegfaultingBackend:
    name = "segfaults-on-build"
    tag_prefix = "segv"
    target_model = SegfaultingTarget

    def runtime_version(self) -> str | None:
        return "1.0"

    def availability(self, target: Target) -> Availability:
        return Availability(True)

    def build(self, onnx_path: Path, target: Target, spec: ModelSpec, out_dir: Path, options: BuildOptions = BuildOptions()) -> BuiltEngine:
        os.kill(os.getpid(), signal.SIGSEGV)
        raise AssertionError("SIGSEGV did not end the build process")

    def load_runner(self, engine_path: Path):
        raise AssertionError("nothing was built")

    def timing_cache_key(self, target: Target) -> None:
        return None


register_backend(SegfaultingBackend())

pytestmark = pytest.mark.usefixtures("prefect_api")

FP32 = {"backend": "onnxruntime", "precision": "fp32"}


def _published_tags(tmp_path: Path, version: int) -> set[str]:
    return set(open_registry(f"file://{tmp_path / 'registry'}").manifest("digits-cnn", version).targets)


def test_optional_target_whose_conversion_fails_is_listed_and_the_rest_published(tmp_path, digits_checkpoint):
    targets = [FP32, {"backend": "onnxruntime", "precision": "fp16", "required": False}]
    spec = write_spec(tmp_path / "spec", digits_checkpoint, targets=targets, precision={"keep_fp32_nodes": ["no-such-node"]})
    summary = run_flow(spec, tmp_path)
    assert summary.published
    outcome = {t.precision: t for t in summary.targets}
    assert outcome["fp32"].status.value == "passed"
    assert outcome["fp16"].status.value == "failed"
    assert outcome["fp16"].reason.startswith("convert-precision: precision.keep_fp32_nodes pattern 'no-such-node' matches no node")
    assert all("-fp32-" in tag for tag in _published_tags(tmp_path, summary.version))
    report = (summary.run_dir / "report.md").read_text()
    assert "matches no node" in report and "published version 1" in report


def test_optional_target_whose_build_process_segfaults_is_listed_and_the_rest_published(tmp_path, digits_checkpoint):
    targets = [FP32, {"backend": "segfaults-on-build", "precision": "fp32", "required": False}]
    spec = write_spec(tmp_path / "spec", digits_checkpoint, targets=targets)
    summary = run_flow(spec, tmp_path)
    assert summary.published
    crashed = next(t for t in summary.targets if t.backend == "segfaults-on-build")
    assert crashed.status.value == "failed"
    assert crashed.reason.startswith("build: the child process crashed with signal SIGSEGV")
    assert all(tag.startswith("ort") for tag in _published_tags(tmp_path, summary.version))


def test_optional_target_whose_worker_run_fails_is_listed_and_the_rest_published(tmp_path, digits_checkpoint, served_build_target):
    # The worker cannot build this target (its process does not know the backend), so its run fails.
    targets = [FP32, {"backend": "segfaults-on-build", "precision": "fp32", "required": False, "work_pool": "test-builders"}]
    spec = write_spec(tmp_path / "spec", digits_checkpoint, targets=targets)
    summary = run_flow(spec, tmp_path)
    assert summary.published
    remote = next(t for t in summary.targets if t.backend == "segfaults-on-build")
    assert remote.status.value == "failed"
    assert remote.reason.startswith("build: deployment build-target/test-builders run ")
    assert "segfaults-on-build" in remote.reason
    assert open_registry(f"file://{tmp_path / 'registry'}").store.list("digits-cnn/staging/") == [], "staging is cleared"


def test_run_that_fails_at_export_still_writes_its_report(tmp_path, digits_checkpoint):
    spec = write_spec(tmp_path / "spec", digits_checkpoint, export={"opset": 18, "tolerance": 1e-30, "rtol": 0})
    with pytest.raises(StageError, match=r"^export: ") as caught:
        run_flow(spec, tmp_path)
    (run_dir,) = (tmp_path / "artifacts" / "runs" / "digits-cnn").iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["published"] is False and report["message"] == str(caught.value)
    assert "not published" in (run_dir / "report.md").read_text() and "export" in (run_dir / "report.md").read_text()
    assert open_registry(f"file://{tmp_path / 'registry'}").versions("digits-cnn") == []


def test_an_eval_file_without_the_input_fails_before_export_naming_its_arrays(tmp_path, digits_checkpoint):
    with np.load(DIGITS_DIR / "eval.npz") as archive:
        np.savez(tmp_path / "eval.npz", pixel_values=archive["input"], labels=archive["labels"])
    data = yaml.safe_load(write_spec(tmp_path / "spec", digits_checkpoint).read_text())
    data["eval"]["data"] = str(tmp_path / "eval.npz")
    spec = tmp_path / "spec" / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    with pytest.raises(
        SpecError, match=r"eval.data: .*eval.npz has no array 'input' for input 'input'; it has \['labels', 'pixel_values'\]"
    ) as caught:
        run_flow(spec, tmp_path)
    assert [s.stage.value for s in caught.value.summary.stages] == ["retrain"], "nothing was exported"


def test_each_converted_graph_a_tensorrt_target_builds_is_checked_q_dq_aware(tmp_path, digits_checkpoint, served_build_target):
    # Routed to the served deployment, so it is converted and checked here; the worker has no TensorRT to build it.
    tensorrt = {"backend": "tensorrt", "arch": "sm_90", "precision": "int8", "required": False, "work_pool": "test-builders"}
    spec = write_spec(tmp_path / "spec", digits_checkpoint, targets=[FP32, tensorrt])
    summary = run_flow(spec, tmp_path)
    assert summary.published
    checks = {c.graph: c for c in summary.compatibility}
    assert list(checks) == ["fp32", "int8"]
    assert checks["int8"].unsupported == 0 and checks["int8"].conditional == 0, (
        "DequantizeLinear -> Conv is the int8 pattern, not a finding"
    )
    assert next(t for t in summary.targets if t.backend == "tensorrt").status.value == "failed"
    assert "int8 graph" in (summary.run_dir / "report.md").read_text()
