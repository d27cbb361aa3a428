"""The example specs of examples/zoo/ (ResNet-50, ViT-B/16, Swin-T, YOLOv8n): each parses, and each runs end to end.

The end-to-end runs are the slow tier (``pytest -m slow``): each is the installed CLI in a
process of its own, as a user runs it, into a registry and artifacts folder under tmp_path. The
spec's ``train`` entry point writes its random-weight checkpoint and data into
examples/zoo/generated/ (git-ignored) on the first run and reuses them afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from trtforge.spec import parse_spec

ZOO = REPO / "examples" / "zoo"
SPECS = ("resnet50.yaml", "vit_b16.yaml", "swin_t.yaml", "yolov8n.yaml")
# One Prefect home for the module: a new one costs each run its database migrations.
PREFECT_HOME = Path(tempfile.mkdtemp(prefix="trtforge-zoo-prefect-"))


@pytest.mark.parametrize("name", SPECS)
def test_zoo_spec_parses_without_its_generated_data(name, tmp_path):
    # Resolved against an empty folder: nothing the train entry point writes is needed to validate the spec.
    spec = parse_spec(yaml.safe_load((ZOO / name).read_text()), source=name, base_dir=tmp_path)
    assert spec.calibration.preprocessing.resize is not None
    assert not spec.calibration.data.suffix, "calibration is an image folder"
    assert [(t.backend, t.precision.value, t.required) for t in spec.targets] == [
        ("onnxruntime", "fp32", True),
        ("onnxruntime", "int8", False),
    ]
    assert spec.train == f"zoo_prepare.py:{Path(name).stem}"


def run_spec(name: str, tmp_path: Path) -> dict:
    """``trtforge run SPEC`` in a process of its own; the run's report.json.

    The report, not the printed table: a detection gate silences its COCO evaluator by swapping
    ``sys.stdout``, and with two targets gated at once the swap can outlive both gates.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TRTFORGE_"))}
    env["PREFECT_HOME"] = str(PREFECT_HOME)
    done = subprocess.run(
        [sys.executable, "-c", "from trtforge.cli import main; main()", "run", str(ZOO / name)]
        + ["--registry", f"file://{tmp_path / 'registry'}", "--artifacts", str(tmp_path / "artifacts")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    model = yaml.safe_load((ZOO / name).read_text())["name"]
    (report,) = (tmp_path / "artifacts" / "runs" / model).glob("*/report.json")
    return json.loads(report.read_text())


def fp32_target(report: dict) -> dict:
    assert report["published"] and report["version"] == 1, report["message"]
    (fp32,) = [t for t in report["targets"] if t["precision"] == "fp32"]
    assert fp32["status"] == "passed" and fp32["failures"] == []
    assert fp32["location"].endswith("/engine")
    assert fp32["metrics"]["latency_ms_median"] > 0
    return fp32


def assert_classifier_agrees(name: str, tmp_path: Path) -> None:
    metrics = fp32_target(run_spec(name, tmp_path))["metrics"]
    # Random weights, no labels: judged on agreement with the FP32 reference over the 64 eval scenes.
    assert "accuracy" not in metrics
    assert metrics["agreement.n"] == 64
    assert metrics["agreement_excluding_near_ties"] >= 0.999
    assert metrics["cosine_mean"] >= 0.9999


@pytest.mark.slow
def test_resnet50_spec_runs_end_to_end(tmp_path):
    assert_classifier_agrees("resnet50.yaml", tmp_path)


@pytest.mark.slow
def test_vit_b16_spec_runs_end_to_end(tmp_path):
    assert_classifier_agrees("vit_b16.yaml", tmp_path)


@pytest.mark.slow
def test_swin_t_spec_runs_end_to_end(tmp_path):
    assert_classifier_agrees("swin_t.yaml", tmp_path)


@pytest.mark.slow
def test_yolov8n_spec_runs_end_to_end(tmp_path):
    pytest.importorskip(
        "ultralytics", reason="the YOLOv8n spec needs Ultralytics (AGPL-3.0, not a trtforge dependency): pip install ultralytics"
    )
    metrics = fp32_target(run_spec("yolov8n.yaml", tmp_path))["metrics"]
    assert metrics["eval_images"] == 64 and metrics["gt_instances"] > 64
    assert metrics["detections_per_image"] > 0, "the agreement metrics need detections to agree on"
    assert metrics["agreement_map"] >= 0.95
    assert abs(metrics["map"] - metrics["reference_map"]) <= 0.002
