"""pull --fastest: of the engines that fit, the one whose gate measured the lowest median latency; show marks it.

The records have the shapes the backends and the publish stage write (build record plus the gate's
metrics), published through a real directory registry.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.test_registry import ENVIRONMENT, lineage
from tests.test_registry_pull import trt_record, trt_tag
from trtforge.cli import app
from trtforge.errors import NotFoundError, RegistryError
from trtforge.gpu import detect_gpus
from trtforge.registry import TargetArtifacts, open_registry
from trtforge.registry.pull import fastest_target

MODEL = "resnet50"


def ort_record(precision: str) -> dict:
    return {"backend": "onnxruntime", "precision": precision, "device": "cpu", "runtime_version": "1.32.0"}


FLEET = [
    ("ort1.32-cpu-fp32-b1_8_32", ort_record("fp32"), 0.9),
    ("ort1.32-cpu-int8-b1_8_32", ort_record("int8"), 0.5),
    (trt_tag("sm_90", "fp16"), trt_record("sm_90", "fp16"), 0.2),
    (trt_tag("sm_90", "int8"), trt_record("sm_90", "int8"), 0.1),
    # Faster still, but measured on the sm_80 GPU it was built on.
    (trt_tag("sm_80", "fp16", suffix="-hc"), trt_record("sm_80", "fp16", hardware="ampere_plus"), 0.05),
]


def artifacts(folder: Path, tag: str, record: dict, latency: float | None) -> TargetArtifacts:
    folder.mkdir(parents=True)
    metrics = {"accuracy": 0.97} | ({} if latency is None else {"latency_ms_median": latency, "latency_ms_p99": 2 * latency})
    record = {**record, "gate": {"metrics": metrics, "thresholds": {}, "notes": []}}
    (folder / "engine").write_bytes(f"engine {tag}".encode())
    (folder / "build.json").write_text(json.dumps(record))
    return TargetArtifacts(tag=tag, record=record, files={"engine": folder / "engine", "build.json": folder / "build.json"})


@pytest.fixture()
def registry(tmp_path):
    registry = open_registry(f"file://{tmp_path / 'registry'}")
    targets = [artifacts(tmp_path / "build" / tag, tag, record, latency) for tag, record, latency in FLEET]
    registry.publish(MODEL, targets, lineage=lineage(), environment=ENVIRONMENT)
    return registry


@pytest.mark.parametrize(
    "request_, chosen",
    [
        # An exact build for this GPU beats a hardware-compatible one, however fast that was on its own GPU.
        ({"arch": "sm_90"}, trt_tag("sm_90", "int8")),
        ({"arch": "9.0", "precision": "fp16"}, trt_tag("sm_90", "fp16")),
        ({"arch": "sm_89"}, trt_tag("sm_80", "fp16", suffix="-hc")),
        ({"arch": "cpu"}, "ort1.32-cpu-int8-b1_8_32"),
        ({"arch": "cpu", "precision": "fp32"}, "ort1.32-cpu-fp32-b1_8_32"),
    ],
)
def test_the_fastest_fitting_engine_is_chosen(registry, request_, chosen):
    assert fastest_target(registry.manifest(MODEL, 1), **request_).tag == chosen


def test_nothing_fitting_or_no_latency_is_explained(registry, tmp_path):
    manifest = registry.manifest(MODEL, 1)
    with pytest.raises(NotFoundError, match="no engine of resnet50 version 1 runs on sm_75"):
        fastest_target(manifest, arch="sm_75")
    with pytest.raises(NotFoundError, match="has no CPU engine that fits"):
        fastest_target(manifest, arch="cpu", precision="fp16")
    untimed = open_registry(f"file://{tmp_path / 'untimed'}")
    untimed.publish(MODEL, [artifacts(tmp_path / "u", *FLEET[0][:2], None)], lineage=lineage(), environment=ENVIRONMENT)
    with pytest.raises(RegistryError, match=re.escape("--fastest: no engine of resnet50 version 1 that fits records latency_ms_median")):
        fastest_target(untimed.manifest(MODEL, 1), arch="cpu")


@pytest.mark.skipif(detect_gpus().available, reason="this host has an NVIDIA GPU: --arch auto picks its engines, not the CPU's")
def test_pull_arch_auto_fastest_on_a_host_without_gpu_takes_the_fastest_cpu_engine(registry, tmp_path):
    args = ["pull", MODEL, "--arch", "auto", "--fastest", "-o", str(tmp_path / "deploy"), "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, [*args, "--registry", registry.uri, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.stdout)["tag"] == "ort1.32-cpu-int8-b1_8_32"
    assert (tmp_path / "deploy" / "engine").read_bytes() == b"engine ort1.32-cpu-int8-b1_8_32"


def test_pull_fastest_for_a_named_gpu_and_show_marks_the_fastest_per_place(registry, tmp_path):
    runner = CliRunner()
    args = ["pull", MODEL, "--arch", "sm_90", "--fastest", "-o", str(tmp_path / "deploy"), "--cache-dir", str(tmp_path / "cache")]
    result = runner.invoke(app, [*args, "--registry", registry.uri])
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"target {trt_tag('sm_90', 'int8')}" in result.stdout
    assert (tmp_path / "deploy" / "engine").read_bytes() == f"engine {trt_tag('sm_90', 'int8')}".encode()

    shown = runner.invoke(app, ["show", MODEL, "1", "--registry", registry.uri])
    assert shown.exit_code == 0, (shown.output, shown.exception)
    marks = {line.split()[1]: line.split("[fastest on ")[1].rstrip("]") for line in shown.stdout.splitlines() if "[fastest on" in line}
    assert marks == {"ort1.32-cpu-int8-b1_8_32": "cpu", trt_tag("sm_90", "int8"): "sm_90", trt_tag("sm_80", "fp16", suffix="-hc"): "sm_80"}
