"""pull --fastest: of the engines that fit, the fastest by latency (or with --best, throughput): the manifest's
choice per place where it has one, else ranked from the gate metrics; show marks both choices.

The records have the shapes the backends and the publish stage write (build record plus the gate's
metrics), published through a real directory registry: without the manifest's ``fastest`` (as versions
published before it), and with it as the publish stage writes it from the run's outcomes.
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
from trtforge.stages.publish import publish_release
from trtforge.summary import TargetOutcome, TargetStatus

MODEL = "resnet50"


def ort_record(precision: str) -> dict:
    return {"backend": "onnxruntime", "precision": precision, "device": "cpu", "runtime_version": "1.32.0"}


# (tag, build record, median latency at the opt batch 8, samples/s at the max batch 32)
FLEET = [
    # Slower per call than int8, but more samples per second at the max batch.
    ("ort1.32-cpu-fp32-b1_8_32", ort_record("fp32"), 0.9, 60_000.0),
    ("ort1.32-cpu-int8-b1_8_32", ort_record("int8"), 0.5, 40_000.0),
    (trt_tag("sm_90", "fp16"), trt_record("sm_90", "fp16"), 0.2, 400_000.0),
    (trt_tag("sm_90", "int8"), trt_record("sm_90", "int8"), 0.1, 300_000.0),
    # Faster still, but measured on the sm_80 GPU it was built on.
    (trt_tag("sm_80", "fp16", suffix="-hc"), trt_record("sm_80", "fp16", hardware="ampere_plus"), 0.05, 500_000.0),
]


def gate_metrics(latency: float | None, throughput: float | None = None) -> dict[str, float]:
    """The speed figures the gate records (trtforge.stages.gate.measure_latency), with an accuracy."""
    metrics = {"accuracy": 0.97}
    if latency is not None:
        metrics |= {"latency_ms_median": latency, "latency_ms_p99": 2 * latency, "opt_batch": 8.0}
        metrics |= {"throughput_opt_per_s": 8 * 1000 / latency, "latency_runs": 50.0, "latency_warmup": 5.0, "latency_spread": 0.1}
    if throughput is not None:
        metrics |= {"max_batch": 32.0, "throughput_max_per_s": throughput, "max_batch_runs": 50.0, "max_batch_warmup": 3.0}
    return metrics


def artifacts(folder: Path, tag: str, record: dict, latency: float | None, throughput: float | None = None) -> TargetArtifacts:
    folder.mkdir(parents=True)
    record = {**record, "gate": {"metrics": gate_metrics(latency, throughput), "thresholds": {}, "notes": []}}
    (folder / "engine").write_bytes(f"engine {tag}".encode())
    (folder / "build.json").write_text(json.dumps(record))
    return TargetArtifacts(tag=tag, record=record, files={"engine": folder / "engine", "build.json": folder / "build.json"})


@pytest.fixture()
def registry(tmp_path):
    registry = open_registry(f"file://{tmp_path / 'registry'}")
    targets = [artifacts(tmp_path / "build" / fleet[0], *fleet) for fleet in FLEET]
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
        # By throughput: the most samples/s at the opt or the max batch.
        ({"arch": "cpu", "best": "throughput"}, "ort1.32-cpu-fp32-b1_8_32"),
        ({"arch": "sm_90", "best": "throughput"}, trt_tag("sm_90", "fp16")),
        ({"arch": "sm_90", "best": "throughput", "precision": "int8"}, trt_tag("sm_90", "int8")),
    ],
)
def test_the_fastest_fitting_engine_is_chosen_from_the_gate_metrics_of_a_manifest_without_its_choice(registry, request_, chosen):
    manifest = registry.manifest(MODEL, 1)
    assert manifest.fastest == {}
    assert fastest_target(manifest, **request_).tag == chosen


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
    with pytest.raises(RegistryError, match=re.escape("records throughput_opt_per_s or throughput_max_per_s (versions gated before")):
        fastest_target(untimed.manifest(MODEL, 1), arch="cpu", best="throughput")
    with pytest.raises(RegistryError, match=re.escape("--best 'speed': rank by one of latency, throughput")):
        fastest_target(manifest, arch="cpu", best="speed")


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
    assert show_marks(shown.stdout) == {
        "ort1.32-cpu-int8-b1_8_32": ["best latency on cpu"],
        "ort1.32-cpu-fp32-b1_8_32": ["best throughput on cpu"],
        trt_tag("sm_90", "int8"): ["best latency on sm_90"],
        trt_tag("sm_90", "fp16"): ["best throughput on sm_90"],
        trt_tag("sm_80", "fp16", suffix="-hc"): ["best latency on sm_80", "best throughput on sm_80"],
    }


def show_marks(text: str) -> dict[str, list[str]]:
    return {
        line.split()[1]: marks for line in text.splitlines() if line.startswith("target ") and (marks := re.findall(r"\[([^]]+)\]", line))
    }


def outcome(folder: Path, tag: str, record: dict, latency: float, throughput: float, status: str = "passed") -> TargetOutcome:
    """A gated target as build_and_gate returns it: the record and the gate's metrics, its files on disk."""
    return TargetOutcome(
        tag=tag,
        backend=record["backend"],
        precision=record["precision"],
        required=False,
        status=TargetStatus(status),
        metrics=gate_metrics(latency, throughput),
        record=record,
        files=artifacts(folder / tag, tag, record, latency, throughput).files,
    )


def test_publish_writes_the_fastest_passing_targets_per_place_into_the_manifest(tmp_path, digits_spec):
    outcomes = [outcome(tmp_path / "build", *fleet) for fleet in FLEET]
    # Faster than everything on the CPU, but it failed its gate: never chosen.
    outcomes.append(outcome(tmp_path / "build", "ort1.32-cpu-fp16-b1_8_32", ort_record("fp16"), 0.01, 1e7, status="failed"))
    uri = f"file://{tmp_path / 'registry'}"
    version = publish_release(digits_spec, uri, outcomes, lineage(), {})
    manifest = open_registry(uri).manifest(digits_spec.name, version)
    assert {place: (choice.latency, choice.throughput) for place, choice in manifest.fastest.items()} == {
        "cpu": ("ort1.32-cpu-int8-b1_8_32", "ort1.32-cpu-fp32-b1_8_32"),
        "sm_80": (trt_tag("sm_80", "fp16", suffix="-hc"),) * 2,
        "sm_90": (trt_tag("sm_90", "int8"), trt_tag("sm_90", "fp16")),
    }
    cpu = manifest.fastest["cpu"]
    assert (cpu.latency_ms, cpu.throughput_per_s, cpu.throughput_batch) == (0.5, 60_000.0, 32)


def test_pull_fastest_takes_the_manifests_choice_where_it_fits_the_request(tmp_path):
    """A choice that differs from what the metrics rank shows which one the pull used."""
    registry = open_registry(f"file://{tmp_path / 'registry'}")
    targets = [artifacts(tmp_path / "build" / fleet[0], *fleet) for fleet in FLEET]
    fp32, int8 = "ort1.32-cpu-fp32-b1_8_32", "ort1.32-cpu-int8-b1_8_32"
    choice = {"latency": fp32, "latency_ms": 0.9, "throughput": int8, "throughput_per_s": 40_000.0, "throughput_batch": 32}
    registry.publish(MODEL, targets, lineage=lineage(), environment=ENVIRONMENT, fastest={"cpu": choice})
    manifest = registry.manifest(MODEL, 1)
    assert fastest_target(manifest, arch="cpu").tag == fp32
    assert fastest_target(manifest, arch="cpu", best="throughput").tag == int8
    # A --precision the choice is not of: ranked from the metrics of the int8 engines.
    assert fastest_target(manifest, arch="cpu", precision="int8").tag == int8
    # No choice recorded for sm_90 in this manifest: ranked from the metrics.
    assert fastest_target(manifest, arch="sm_90").tag == trt_tag("sm_90", "int8")

    runner = CliRunner()
    args = ["pull", MODEL, "--arch", "cpu", "--best", "throughput", "-o", str(tmp_path / "deploy"), "--cache-dir", str(tmp_path / "cache")]
    pulled = runner.invoke(app, [*args, "--registry", registry.uri, "--json"])
    assert pulled.exit_code == 0, (pulled.output, pulled.exception)
    assert json.loads(pulled.stdout)["tag"] == int8
    shown = runner.invoke(app, ["show", MODEL, "1", "--registry", registry.uri])
    assert show_marks(shown.stdout) == {fp32: ["best latency on cpu"], int8: ["best throughput on cpu"]}


def test_a_choice_naming_no_target_of_the_version_is_refused_before_a_version_is_taken(tmp_path):
    registry = open_registry(f"file://{tmp_path / 'registry'}")
    targets = [artifacts(tmp_path / "build" / FLEET[0][0], *FLEET[0])]
    wrong = {"cpu": {"latency": "ort1.32-cpu-int8-b1_8_32", "latency_ms": 0.5}}
    with pytest.raises(RegistryError, match=re.escape("fastest.cpu names ['ort1.32-cpu-int8-b1_8_32'], which are not targets of this")):
        registry.publish(MODEL, targets, lineage=lineage(), environment=ENVIRONMENT, fastest=wrong)
    with pytest.raises(RegistryError, match=re.escape("fastest: 'gpu' is not a place ('cpu' or a GPU architecture like sm_90)")):
        registry.publish(MODEL, targets, lineage=lineage(), environment=ENVIRONMENT, fastest={"gpu": wrong["cpu"]})
    assert registry.versions(MODEL) == []
