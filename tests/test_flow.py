"""The retrain-to-engine flow end to end on the digits example, under a real (temporary) Prefect API."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import DIGITS_SPEC
from tests.flow_harness import run_flow, write_spec
from trtforge.cli import app
from trtforge.errors import RunFailed
from trtforge.registry import open_registry

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_retrains_publishes_version_1_then_is_up_to_date(tmp_path):
    """The bundled example as it ships: fp32, fp16 and int8 on onnxruntime, an optional TensorRT target."""
    example_targets = yaml.safe_load(DIGITS_SPEC.read_text())["targets"]
    spec = write_spec(tmp_path / "spec", tmp_path / "ckpt" / "digits.safetensors", targets=example_targets)
    summary = run_flow(spec, tmp_path)
    assert summary.published and summary.version == 1 and not summary.up_to_date
    assert [s.stage for s in summary.stages][:6] == ["retrain", "validate-calibration", "export", "simplify", "check-ops", "reference"]
    assert summary.stages[0].detail.startswith("trained")
    assert summary.compatibility[0].unsupported == 0
    assert summary.calibration.passed and summary.calibration.samples == 600
    by_precision = {t.precision: t for t in summary.targets if t.backend == "onnxruntime"}
    assert {p: t.status.value for p, t in by_precision.items()} == {"fp32": "passed", "fp16": "passed", "int8": "passed"}
    fp32, int8 = by_precision["fp32"], by_precision["int8"]
    assert fp32.metrics["accuracy"] > 0.95
    assert fp32.metrics["accuracy"] - int8.metrics["accuracy"] <= 0.01
    (trt,) = [t for t in summary.targets if t.backend == "tensorrt"]
    assert trt.status.value == "unavailable" and not trt.required
    target = fp32

    registry = open_registry(f"file://{tmp_path / 'registry'}")
    assert registry.versions("digits-cnn") == [1]
    assert registry.aliases("digits-cnn")["latest"] == 1
    manifest = registry.manifest("digits-cnn", 1)
    assert set(manifest.targets) == {t.tag for t in by_precision.values()}
    assert manifest.lineage.calibration_sha256 == summary.calibration.sha256
    assert manifest.extra["left_out"][0]["status"] == "unavailable"
    assert (summary.run_dir / "accuracy_latency.png").stat().st_size > 1000
    entry = manifest.targets[target.tag]
    assert {"engine", "build.json", "gate.json"} <= set(entry.files)
    checkpoint = tmp_path / "ckpt" / "digits.safetensors"
    from trtforge.hashing import sha256_file

    assert manifest.lineage.checkpoint_sha256 == sha256_file(checkpoint)
    assert manifest.lineage.onnx_sha256 == target.record["source_onnx_sha256"]
    assert manifest.lineage.code_version
    assert manifest.environment["onnxruntime"]
    report = (summary.run_dir / "report.md").read_text()
    assert "published version 1" in report and target.tag in report

    again = run_flow(spec, tmp_path)
    assert again.up_to_date and again.version == 1 and not again.published
    assert registry.versions("digits-cnn") == [1]


def test_required_target_failing_publishes_nothing(tmp_path, digits_checkpoint):
    spec = write_spec(tmp_path / "spec", digits_checkpoint, gate={"min_accuracy": 0.9999})
    with pytest.raises(
        RunFailed, match=r"not published: ort.*-cpu-fp32-b1_32_128 failed: top-1 accuracy 0\.\d+ < threshold 0\.9999"
    ) as caught:
        run_flow(spec, tmp_path)
    assert caught.value.summary.targets[0].status.value == "failed"
    assert open_registry(f"file://{tmp_path / 'registry'}").versions("digits-cnn") == []
    assert (caught.value.summary.run_dir / "report.json").is_file()


def test_unavailable_optional_target_is_reported_and_the_rest_published(tmp_path, digits_checkpoint):
    targets = [{"backend": "onnxruntime", "precision": "fp32"}, {"backend": "onnxruntime", "precision": "bf16", "required": False}]
    spec = write_spec(tmp_path / "spec", digits_checkpoint, targets=targets)
    summary = run_flow(spec, tmp_path)
    assert summary.published
    statuses = {t.precision: (t.status.value, t.reason) for t in summary.targets}
    assert statuses["fp32"][0] == "passed"
    assert statuses["bf16"] == ("unavailable", "onnxruntime CPU has no bf16 kernels; use one of fp32, fp16, int8")
    manifest = open_registry(f"file://{tmp_path / 'registry'}").manifest("digits-cnn", summary.version)
    assert all("-fp32-" in tag for tag in manifest.targets)


def test_given_checkpoint_is_used_and_cli_prints_json(tmp_path, digits_checkpoint):
    spec = write_spec(tmp_path / "spec", tmp_path / "never-written.safetensors", train=None)
    args = [
        "run",
        str(spec),
        "--checkpoint",
        str(digits_checkpoint),
        "--registry",
        f"file://{tmp_path / 'registry'}",
        "--artifacts",
        str(tmp_path / "artifacts"),
        "--json",
        "--summary",
        str(tmp_path / "summary.md"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) >= {"model", "version", "published", "up_to_date", "targets"}
    assert payload["model"] == "digits-cnn" and payload["version"] == 1 and payload["published"] is True
    assert set(payload["targets"][0]) >= {"tag", "backend", "precision", "status", "metrics"}
    assert "published version 1" in (tmp_path / "summary.md").read_text()
    assert not (tmp_path / "never-written.safetensors").exists()
    # The first stages ran before the flow, which took them: timed as the stages' own, not as the tasks' waits.
    stages = {s["stage"]: s for s in payload["stages"]}
    assert stages["retrain"]["head_start"] and stages["export"]["head_start"] and not stages["simplify"]["head_start"]
    assert stages["export"]["started_at"] >= stages["retrain"]["started_at"] + stages["retrain"]["seconds"]
    assert stages["export"]["seconds"] > 0.5

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0
    assert json.loads(again.stdout)["up_to_date"] is True


def test_target_with_a_work_pool_is_built_by_the_served_build_target_deployment(tmp_path, digits_checkpoint, served_build_target):
    targets = [{"backend": "onnxruntime", "precision": "fp32", "required": True, "work_pool": "test-builders"}]
    spec = write_spec(tmp_path / "spec", digits_checkpoint, targets=targets)
    summary = run_flow(spec, tmp_path)
    (target,) = summary.targets
    assert target.status.value == "passed" and target.metrics["accuracy"] > 0.95
    assert "remote-0" in str(target.files["engine"]), "the engine came back from the worker through staging"
    registry = open_registry(f"file://{tmp_path / 'registry'}")
    assert registry.versions("digits-cnn") == [1]
    assert registry.store.list("digits-cnn/staging/") == [], "staging is cleared after the run"


def test_required_target_without_worker_fails_the_run(tmp_path, digits_checkpoint):
    targets = [
        {"backend": "onnxruntime", "precision": "fp32"},
        {"backend": "tensorrt", "device": "gpu", "arch": "sm_90", "precision": "fp16", "required": True},
    ]
    spec = write_spec(tmp_path / "spec", digits_checkpoint, targets=targets)
    with pytest.raises(
        RunFailed,
        match=r"trt.*-sm90-fp16-b1_32_128 unavailable: no GPU worker for sm_90: start a worker on pool gpu-sm90, or remove the target",
    ):
        run_flow(spec, tmp_path)
    assert open_registry(f"file://{tmp_path / 'registry'}").versions("digits-cnn") == []


def test_degraded_checkpoint_fails_its_gate_and_publishes_nothing(tmp_path, digits_checkpoint):
    import torch
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(0)
    state = {
        name: value + 0.6 * value.std() * torch.randn(value.shape, generator=generator) if value.ndim > 1 else value
        for name, value in load_file(str(digits_checkpoint)).items()
    }
    degraded = tmp_path / "degraded.safetensors"
    save_file(state, str(degraded))
    spec = write_spec(tmp_path / "spec", degraded)
    # Through `trtforge ci`, which builds a local checkpoint in the watch flow: its export is head-started too.
    args = ["ci", "--spec", str(spec), "--checkpoint", str(degraded), "--registry", f"file://{tmp_path / 'registry'}"]
    result = CliRunner().invoke(app, [*args, "--artifacts", str(tmp_path / "artifacts"), "--json"])
    assert result.exit_code == 1, result.output
    payload = json.loads(result.stdout)
    assert re.search(r"top-1 accuracy 0\.\d+ < threshold 0\.9500 \(PyTorch FP32 reference 0\.\d+\)", payload["message"])
    (target,) = payload["targets"]
    assert target["metrics"]["accuracy"] < 0.93, "the perturbation must cost several points"
    assert open_registry(f"file://{tmp_path / 'registry'}").versions("digits-cnn") == []
    stages = {s["stage"]: s for s in payload["stages"]}
    assert stages["export"]["head_start"] and not stages["simplify"]["head_start"]
    (report_file,) = (tmp_path / "artifacts" / "runs" / "digits-cnn").glob("*/report.md")
    report = report_file.read_text()
    assert "not published" in report and "top-1 accuracy" in report
