"""What graph optimization and precision conversion buy and cost on onnxruntime CPU: latency and accuracy.

For the digits CNN (trained from the example spec) and torchvision ResNet-18 (random weights),
converts to fp16 and int8 with the convert-precision stage, builds each with the onnxruntime
backend, and measures, at batch 1 and 32, fp32 at ORT_ENABLE_EXTENDED (the level engines are
saved at) and at ORT_ENABLE_ALL (the baseline: fp32 at full speed), fp16, int8 quantized by
ModelOpt (its Q/DQ placement for TensorRT) and int8 quantized by onnxruntime's own quantizer
(what onnxruntime targets get), each at the level its build probed safe. It prints the median
latency, the speed-up over the baseline measured in the same run, and the accuracy: digits top-1
on its eval set; for ResNet-18, whose random weights have no task accuracy, top-1 agreement with
fp32 and mean cosine similarity of the logits on random images.

    python benchmarks/cpu_precision.py [--models digits resnet18] [--min-seconds 1.0]
    python benchmarks/cpu_precision.py --variants "fp32 ALL" "int8 onnxruntime"   # where ModelOpt is not installed
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trtforge.backends.base import get_backend
from trtforge.backends.onnxruntime import FAST_OPTIMIZATION_LEVEL, OnnxRuntimeRunner, OnnxRuntimeTarget
from trtforge.numeric import PORTABLE_OPTIMIZATION_LEVEL
from trtforge.spec import ModelSpec, Precision, load_spec, parse_spec
from trtforge.stages.checkpoint import ensure_checkpoint
from trtforge.stages.convert_precision import Quantizer, convert_precision, onnxruntime_int8_settings
from trtforge.stages.export import export_onnx
from trtforge.stages.simplify import simplify_onnx

REPO = Path(__file__).resolve().parents[1]
DIGITS_SPEC = REPO / "examples" / "digits" / "spec.yaml"
BATCHES = (1, 32)
DIGITS_CALIBRATION_SAMPLES = 320
RESNET_CALIBRATION_SAMPLES = 32
RESNET_PROBE_SAMPLES = 64
INT8_GOAL_BATCH = 32
INT8_GOAL_SPEEDUP = 2.5
INT8_GOAL_AGREEMENT = 0.99


@dataclass(frozen=True)
class Workload:
    name: str
    onnx_path: Path
    spec: ModelSpec
    calibration: dict[str, np.ndarray]
    probe: np.ndarray
    labels: np.ndarray | None


@dataclass(frozen=True)
class Variant:
    """One way to run the model: its precision, who quantized it, and the level its session opens at (None: the build's choice)."""

    label: str
    precision: Precision
    quantizer: Quantizer
    level: str | None


BASELINE = "fp32 ALL"
VARIANTS = (
    Variant("fp32 EXTENDED", Precision.FP32, Quantizer.MODELOPT, PORTABLE_OPTIMIZATION_LEVEL),
    Variant(BASELINE, Precision.FP32, Quantizer.MODELOPT, FAST_OPTIMIZATION_LEVEL),
    Variant("fp16", Precision.FP16, Quantizer.MODELOPT, None),
    Variant("int8 ModelOpt", Precision.INT8, Quantizer.MODELOPT, None),
    Variant("int8 onnxruntime", Precision.INT8, Quantizer.ONNXRUNTIME, None),
)


@dataclass(frozen=True)
class Row:
    model: str
    variant: str
    level: str
    batch: int
    latency_ms: float
    speedup: float
    accuracy: str
    agreement: float | None


def digits_workload(work: Path) -> Workload:
    spec = load_spec(DIGITS_SPEC)
    checkpoint = ensure_checkpoint(spec).path
    exported = export_onnx(spec, checkpoint, work / "digits")
    simplified = simplify_onnx(spec, exported.onnx_path, work / "digits")
    module_spec = importlib.util.spec_from_file_location("digits_data", spec.source / "digits_data.py")
    digits_data = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(digits_data)
    train_images, _ = digits_data.load_split("train")
    with np.load(spec.eval.data) as archive:
        images, labels = archive["input"], archive["labels"]
    return Workload("digits", simplified.onnx_path, spec, {"input": train_images[:DIGITS_CALIBRATION_SAMPLES]}, images, labels)


def resnet18_workload(work: Path) -> Workload:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    path = work / "resnet18" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            model,
            (torch.randn(1, 3, 224, 224),),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            opset_version=18,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=max(BATCHES))},),
            dynamo=True,
            external_data=False,
        )
    spec = parse_spec(
        {
            "name": "resnet18",
            "model": "torchvision.models:resnet18",
            "checkpoint": "random-weights",
            "inputs": [{"name": "input", "shape": ["batch", 3, 224, 224], "dynamic": {"batch": {"min": 1, "opt": 8, "max": max(BATCHES)}}}],
            "outputs": [{"name": "logits"}],
            "eval": {"data": "none.npz"},
            "targets": [{}],
        }
    )
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((RESNET_CALIBRATION_SAMPLES, 3, 224, 224)).astype(np.float32)
    probe = rng.standard_normal((RESNET_PROBE_SAMPLES, 3, 224, 224)).astype(np.float32)
    return Workload("resnet18", path, spec, {"input": calibration}, probe, None)


def median_latencies_ms(
    runners: dict[str, object], feeds: dict[str, np.ndarray], min_seconds: float, rounds: int = 2, min_runs: int = 3
) -> dict[str, float]:
    """Each variant timed in a block of its own runs, the order reversed from one round to the next, so load from
    other processes falls on all of them alike. Blocks, not runs in turn: a session's thread pool spins for a while
    after each run, and would slow the next variant's run on the same cores."""
    times: dict[str, list[float]] = {label: [] for label in runners}
    order = list(runners)
    for round_index in range(rounds):
        for label in order if round_index % 2 == 0 else reversed(order):
            runner = runners[label]
            runner.run(feeds)  # the first run allocates and picks kernels; later ones warm the thread pool
            started = time.perf_counter()
            runs = 0
            while runs < min_runs or time.perf_counter() - started < min_seconds / rounds:
                tick = time.perf_counter()
                runner.run(feeds)
                times[label].append(time.perf_counter() - tick)
                runs += 1
    return {label: statistics.median(samples) * 1000 for label, samples in times.items()}


def run_all(runner, images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([runner.run({"input": images[i : i + batch]})["logits"] for i in range(0, len(images), batch)])


def benchmark(workload: Workload, work: Path, min_seconds: float, variants: tuple[Variant, ...] = VARIANTS) -> list[Row]:
    backend = get_backend("onnxruntime")
    outputs: dict[str, np.ndarray] = {}
    runners = {}
    for variant in variants:
        converted = convert_precision(
            workload.onnx_path,
            variant.precision,
            workload.calibration,
            workload.spec.precision,
            spec=workload.spec,
            cache_dir=work / "precision-cache",
            quantizer=variant.quantizer,
        )
        target = OnnxRuntimeTarget(precision=variant.precision)
        folder = work / workload.name / f"engine-{variant.precision.value}-{converted.quantizer or 'none'}"
        built = backend.build(converted.onnx_path, target, workload.spec, folder)
        if variant.level is None:
            runners[variant.label] = backend.load_runner(built.engine_path)
        else:
            runners[variant.label] = OnnxRuntimeRunner(built.engine_path, variant.level)
        outputs[variant.label] = run_all(runners[variant.label], workload.probe, max(BATCHES))
    latencies = {}
    for batch in BATCHES:
        for label, latency in median_latencies_ms(runners, {"input": workload.probe[:batch]}, min_seconds).items():
            latencies[label, batch] = latency

    rows = []
    for variant in variants:
        logits = outputs[variant.label]
        agreement = None
        if workload.labels is not None:
            accuracy = f"top-1 {100 * np.mean(logits.argmax(1) == workload.labels):.2f}%"
        else:
            reference = outputs[BASELINE]
            agreement = float(np.mean(logits.argmax(1) == reference.argmax(1)))
            cosine = np.mean((logits * reference).sum(1) / (np.linalg.norm(logits, axis=1) * np.linalg.norm(reference, axis=1)))
            accuracy = f"agreement {100 * agreement:.1f}%, cosine {cosine:.5f}"
        level = runners[variant.label].optimization_level.removeprefix("ORT_ENABLE_")
        for batch in BATCHES:
            latency = latencies[variant.label, batch]
            rows.append(Row(workload.name, variant.label, level, batch, latency, latencies[BASELINE, batch] / latency, accuracy, agreement))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("digits", "resnet18"), default=["digits", "resnet18"])
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time spent measuring each latency")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep models and engines here (default: a temp folder)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=[v.label for v in VARIANTS],
        default=[v.label for v in VARIANTS],
        help=f"the variants to measure (default all; {BASELINE!r}, the baseline, is always measured)",
    )
    args = parser.parse_args()
    variants = tuple(v for v in VARIANTS if v.label in args.variants or v.label == BASELINE)

    import onnxruntime

    builders = {"digits": digits_workload, "resnet18": resnet18_workload}
    with tempfile.TemporaryDirectory(prefix="cpu-precision-") as scratch:
        work = args.work_dir or Path(scratch)
        rows = []
        for name in args.models:
            rows += benchmark(builders[name](work), work, args.min_seconds, variants)

    settings = onnxruntime_int8_settings()
    print(
        f"onnxruntime {onnxruntime.__version__} CPU, {os.cpu_count()} logical CPUs, {settings['cpu']} (onnxruntime's int8: "
        f"{settings['activation_type']} activations, reduce_range {settings['reduce_range']}); median latency, "
        f"speed-up over {BASELINE} in this run"
    )
    header = f"{'model':<10} {'variant':<17} {'level':<9} {'batch':>5} {'latency ms':>11} {'speed-up':>9}  accuracy"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.model:<10} {row.variant:<17} {row.level:<9} {row.batch:>5} {row.latency_ms:>11.3f} {row.speedup:>8.2f}x  {row.accuracy}"
        )
    print(int8_goal_verdict(rows, settings))


def int8_goal_verdict(rows: list[Row], settings: dict) -> str:
    """The int8 aim: onnxruntime's int8 ResNet-18 at batch 32 at least 2.5x fp32 at ALL, agreeing on 99% of top-1s.
    It is set for CPUs with VNNI; elsewhere the line says what this CPU gives and that the aim does not apply."""
    found = next(
        (r for r in rows if (r.model, r.variant, r.batch) == ("resnet18", "int8 onnxruntime", INT8_GOAL_BATCH)),
        None,
    )
    if found is None:
        return "int8 goal: not measured (needs the resnet18 model and the 'int8 onnxruntime' variant)"
    goal = f"int8 goal (>= {INT8_GOAL_SPEEDUP}x, >= {100 * INT8_GOAL_AGREEMENT:g}% agreement, on a CPU with VNNI)"
    measured = f"{found.speedup:.2f}x fp32 at batch {INT8_GOAL_BATCH}, agreement {100 * found.agreement:.1f}%"
    if not settings["cpu"].startswith("x86 with "):
        return f"{goal}: does not apply to this CPU ({measured})"
    met = found.speedup >= INT8_GOAL_SPEEDUP and found.agreement >= INT8_GOAL_AGREEMENT
    return f"{goal}: {'met' if met else 'NOT met'} ({measured})"


if __name__ == "__main__":
    main()
