"""Speed in the gate: throughput recorded beside latency, ``max_latency_ms``, and ``min_speedup_over`` across the
targets of a run (trtforge.stages.latency_gate), up to a real run of the digits example whose fp16 target must be
1000x as fast as fp32 and so fails, optional, while fp32 is published as the fastest engine on the CPU."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import DIGITS_SPEC
from tests.flow_harness import run_flow, write_spec
from trtforge.backends.base import get_backend
from trtforge.cli import app
from trtforge.errors import SpecError
from trtforge.evalset import load_eval_set
from trtforge.registry import open_registry
from trtforge.report import chosen_engines
from trtforge.spec import parse_spec
from trtforge.stages import gate
from trtforge.stages.gate import effective_thresholds, latency_failures, max_batch, measure_latency
from trtforge.stages.latency_gate import apply_speedup_gates
from trtforge.summary import TargetOutcome, TargetStatus

PROFILE = "b1_32_128"


def digits(targets: list[dict], **gate_) -> object:
    data = yaml.safe_load(DIGITS_SPEC.read_text())
    data["targets"] = targets
    data["gate"] = {**data["gate"], **gate_}
    return parse_spec(data, "test spec")


def ort(precision: str, **extra) -> dict:
    return {"backend": "onnxruntime", "precision": precision, **extra}


def trt(precision: str, **extra) -> dict:
    return {"backend": "tensorrt", "arch": "sm_90", "precision": precision, "required": False, **extra}


def gated(tag: str, latency: float | None, status: str = "passed", required: bool = True) -> TargetOutcome:
    backend = "tensorrt" if tag.startswith("trt") else "onnxruntime"
    metrics = {} if latency is None else {"latency_ms_median": latency}
    return TargetOutcome(
        tag=tag,
        backend=backend,
        precision=tag.split("-")[2],
        required=required,
        status=TargetStatus(status),
        reason="" if status == "passed" else "build: the builder ran out of memory",
        metrics=metrics,
    )


def test_an_int8_target_slower_than_fp16_on_the_same_place_fails_with_both_latencies():
    spec = digits([ort("fp32"), ort("fp16"), ort("int8", required=False, gate={"min_speedup_over": "fp16"})])
    outcomes = [gated(f"ort1.32-cpu-{p}-{PROFILE}", latency) for p, latency in (("fp32", 2.0), ("fp16", 2.7), ("int8", 3.1))]
    apply_speedup_gates(spec, outcomes)
    fp32, fp16, int8 = outcomes
    assert fp32.status is fp16.status is TargetStatus.PASSED and not fp32.failures and not fp16.failures
    assert int8.status is TargetStatus.FAILED
    assert int8.reason == "int8 latency 3.1 ms is not faster than fp16's 2.7 ms on cpu (min_speedup_over: fp16)"
    assert int8.failures == [int8.reason]


def test_a_faster_target_passes_with_a_note_and_a_factor_asks_for_more_than_faster():
    spec = digits([ort("fp16"), ort("int8", gate={"min_speedup_over": {"precision": "fp16", "factor": 1.5}})])
    fast = [gated(f"ort1.32-cpu-fp16-{PROFILE}", 3.0), gated(f"ort1.32-cpu-int8-{PROFILE}", 1.5)]
    apply_speedup_gates(spec, fast)
    assert fast[1].status is TargetStatus.PASSED
    assert fast[1].notes == ["int8 latency 1.5 ms is 2.00x as fast as fp16's 3 ms on cpu (min_speedup_over: fp16, factor 1.5)"]
    # Faster, but not by more than the factor.
    slow = [gated(f"ort1.32-cpu-fp16-{PROFILE}", 3.0), gated(f"ort1.32-cpu-int8-{PROFILE}", 2.5)]
    apply_speedup_gates(spec, slow)
    assert slow[1].status is TargetStatus.FAILED
    assert (
        slow[1].reason
        == "int8 latency 2.5 ms is 1.20x as fast as fp16's 3 ms on cpu, not more than 1.5x (min_speedup_over: fp16, factor 1.5)"
    )


def test_targets_are_compared_only_on_their_own_place_and_backend_and_the_spec_wide_rule_spares_that_precision():
    # The spec's gate asks every target to beat fp16; the fp16 targets themselves are not asked to beat themselves.
    spec = digits([ort("fp16"), ort("int8"), trt("fp16"), trt("int8")], min_speedup_over="fp16")
    outcomes = [
        gated(f"ort1.32-cpu-fp16-{PROFILE}", 2.0),
        gated(f"ort1.32-cpu-int8-{PROFILE}", 1.0),
        # The GPU's fp16 is faster than the CPU's int8, and its int8 slower than its fp16: only that counts.
        gated(f"trt10.13-sm90-fp16-{PROFILE}", 0.2, required=False),
        gated(f"trt10.13-sm90-int8-{PROFILE}", 0.3, required=False),
    ]
    apply_speedup_gates(spec, outcomes)
    assert [o.status.value for o in outcomes] == ["passed", "passed", "passed", "failed"]
    assert outcomes[3].reason == "int8 latency 0.3 ms is not faster than fp16's 0.2 ms on sm90 (min_speedup_over: fp16)"


def test_a_rule_that_cannot_be_checked_fails_its_target_naming_why():
    spec = digits([ort("fp16", required=False), ort("int8", gate={"min_speedup_over": "fp16"})])
    outcomes = [gated(f"ort1.32-cpu-fp16-{PROFILE}", None, status="failed", required=False), gated(f"ort1.32-cpu-int8-{PROFILE}", 1.0)]
    apply_speedup_gates(spec, outcomes)
    assert outcomes[1].status is TargetStatus.FAILED
    assert outcomes[1].reason == (
        "int8 latency 1 ms could not be compared with fp16 on cpu (min_speedup_over: fp16): the onnxruntime fp16 target "
        f"has no measured latency (ort1.32-cpu-fp16-{PROFILE} failed: build: the builder ran out of memory)"
    )


@pytest.mark.parametrize(
    "targets, gate_, message",
    [
        (
            [ort("fp32"), ort("int8", gate={"min_speedup_over": "int8"})],
            {},
            "targets[1].gate.min_speedup_over: int8 is this target's own precision: name the precision it must beat",
        ),
        (
            [ort("fp32"), ort("int8", gate={"min_speedup_over": "fp16"})],
            {},
            "targets[1].gate.min_speedup_over: targets[1] (onnxruntime int8 on cpu) has no onnxruntime fp16 target on cpu to be "
            "compared with: add one, or remove min_speedup_over",
        ),
        (
            [ort("fp32"), ort("int8"), trt("fp16")],
            {"min_speedup_over": "fp32"},
            "gate.min_speedup_over: targets[2] (tensorrt fp16 on sm90) has no tensorrt fp32 target on sm90 to be compared with",
        ),
        (
            [ort("fp32"), ort("int8", gate={"min_speedup_over": {"precision": "fp32", "factor": 0.5}})],
            {},
            "factor: Input should be greater",
        ),
        ([ort("fp32", gate={"max_latency_ms": 0})], {}, "targets[0].gate.max_latency_ms: Input should be greater than 0"),
    ],
)
def test_the_spec_refuses_a_latency_gate_it_cannot_keep(targets, gate_, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        digits(targets, **gate_)


def test_max_latency_ms_fails_the_targets_own_gate():
    spec = digits([ort("fp32", gate={"max_latency_ms": 2.5})])
    thresholds = effective_thresholds(spec, spec.targets[0])
    assert latency_failures({"latency_ms_median": 2.0}, thresholds) == []
    assert latency_failures({"latency_ms_median": 3.1}, thresholds) == ["median latency 3.1 ms at the opt shape > max_latency_ms 2.5"]


def test_latency_and_throughput_at_the_opt_and_max_batch_are_recorded_with_runs_warmup_and_spread(digits_spec, digits_onnx, tmp_path):
    backend = get_backend("onnxruntime")
    built = backend.build(digits_onnx, digits_spec.targets[0], digits_spec, tmp_path)
    runner = backend.load_runner(built.engine_path)
    assert max_batch(digits_spec, digits_spec.targets[0]) == 128
    metrics = measure_latency(digits_spec, runner, load_eval_set(digits_spec), 128)
    assert (metrics["opt_batch"], metrics["latency_runs"], metrics["latency_warmup"]) == (32, gate.LATENCY_ITERATIONS, gate.LATENCY_WARMUP)
    assert metrics["throughput_opt_per_s"] == pytest.approx(32 * 1000 / metrics["latency_ms_median"])
    assert metrics["max_batch"] == 128 and metrics["max_batch_warmup"] == gate.MAX_BATCH_WARMUP
    # The digits CNN is fast enough at batch 128 for every run the budget allows.
    assert metrics["max_batch_runs"] == gate.LATENCY_ITERATIONS
    assert metrics["throughput_max_per_s"] == pytest.approx(128 * 1000 / metrics["max_batch_ms_median"])
    assert metrics["latency_spread"] >= 0 and metrics["max_batch_spread"] >= 0


def test_a_spread_above_ten_percent_is_named_as_a_noisy_figure():
    assert gate.noisy_timing_notes({"latency_spread": 0.04, "max_batch_spread": 0.1}) == []
    assert gate.noisy_timing_notes({"latency_spread": 0.25, "max_batch_spread": 0.11}) == [
        "latency spread 25% (p10 to p90 over the median) is above 10%: the figure is noisy",
        "max-batch time spread 11% (p10 to p90 over the median) is above 10%: the figure is noisy",
    ]


class SlowRunner:
    """400 ms a call by its own clock, without taking them: the opt shape and the max batch get the fewest runs, not 50."""

    def __init__(self):
        self.calls: list[tuple[int, int, int]] = []

    def time_ms(self, feeds, *, warmup, iterations):
        self.calls.append((len(feeds["input"]), warmup, iterations))
        return [400.0] * iterations


def test_a_slow_engine_is_timed_within_the_budgets(digits_spec):
    runner = SlowRunner()
    metrics = measure_latency(digits_spec, runner, load_eval_set(digits_spec), 128)
    untimed = gate.LATENCY_WARMUP - 2
    assert runner.calls == [(32, untimed, 2), (32, 0, gate.LATENCY_MIN_RUNS), (128, 1, 2), (128, 0, gate.MAX_BATCH_MIN_RUNS)]
    assert metrics["latency_runs"] == gate.LATENCY_MIN_RUNS and metrics["latency_ms_median"] == 400.0
    assert metrics["max_batch_runs"] == gate.MAX_BATCH_MIN_RUNS and metrics["throughput_max_per_s"] == 320.0


@pytest.mark.usefixtures("prefect_api")
def test_a_run_whose_fp16_target_is_not_1000x_as_fast_as_fp32_leaves_it_out_and_publishes_fp32_as_fastest(tmp_path, digits_checkpoint):
    rule = {"min_speedup_over": {"precision": "fp32", "factor": 1000}}
    targets = [ort("fp32"), ort("fp16", required=False, gate=rule)]
    summary = run_flow(write_spec(tmp_path / "spec", digits_checkpoint, targets=targets), tmp_path)
    assert summary.published and summary.version == 1
    fp32, fp16 = summary.targets
    assert fp32.status is TargetStatus.PASSED
    assert fp16.status is TargetStatus.FAILED
    assert re.fullmatch(
        r"fp16 latency [\d.]+ ms is [\d.]+x as fast as fp32's [\d.]+ ms on cpu, not more than 1000x \(min_speedup_over: fp32, factor 1000\)",
        fp16.reason,
    ), fp16.reason
    assert (fp32.metrics["opt_batch"], fp32.metrics["max_batch"]) == (32, 128)
    # Both engines were timed alone, each after every target had been built and gated.
    stages = [s.stage.value for s in summary.stages]
    assert stages[stages.index("build") :].count("time") == 2 and "time" not in stages[: stages.index("build")]
    assert [s.detail.split()[0] for s in summary.stages if s.stage.value == "time"] == [fp32.tag, fp16.tag]

    manifest = open_registry(f"file://{tmp_path / 'registry'}").manifest("digits-cnn", 1)
    assert set(manifest.targets) == {fp32.tag}
    timing = manifest.targets[fp32.tag].record["timing"]
    assert timing["alone"] is True and timing["cpu_threads"] >= 1 and timing["cpu_model"]
    gated = json.loads((tmp_path / "registry" / "digits-cnn" / "versions" / "1" / fp32.tag / "gate.json").read_text())
    assert gated["metrics"]["latency_ms_median"] == fp32.metrics["latency_ms_median"]
    assert [entry["tag"] for entry in manifest.extra["left_out"]] == [fp16.tag]
    cpu = manifest.fastest["cpu"]
    assert (cpu.latency, cpu.throughput, cpu.latency_ms) == (fp32.tag, fp32.tag, fp32.metrics["latency_ms_median"])
    assert cpu.throughput_per_s == max(fp32.metrics["throughput_opt_per_s"], fp32.metrics["throughput_max_per_s"])
    assert chosen_engines(summary)["cpu"]["latency"] == fp32.tag

    report = (summary.run_dir / "report.md").read_text()
    assert "### Fastest passing engine per place" in report
    assert f"- **cpu**: `{fp32.tag}`, best latency at the opt shape (batch 32): " in report
    assert "not more than 1000x (min_speedup_over: fp32, factor 1000)" in report

    args = ["pull", "digits-cnn", "--arch", "cpu", "--fastest", "-o", str(tmp_path / "deploy"), "--cache-dir", str(tmp_path / "cache")]
    pulled = CliRunner().invoke(app, [*args, "--registry", f"file://{tmp_path / 'registry'}", "--json"])
    assert pulled.exit_code == 0, (pulled.output, pulled.exception)
    assert json.loads(pulled.stdout)["tag"] == fp32.tag
