"""What precision conversion buys and costs on onnxruntime CPU: latency and accuracy per precision.

For the digits CNN (trained from the example spec) and torchvision ResNet-18 (random weights),
converts to fp16 and int8 with the convert-precision stage, builds each with the onnxruntime
backend, and prints the median latency at batch 1 and 32 as a ratio to fp32 measured in the
same run, with the accuracy of each precision: digits top-1 on its eval set; for ResNet-18,
whose random weights have no task accuracy, top-1 agreement with fp32 and mean cosine
similarity of the logits on random images.

    python benchmarks/cpu_precision.py [--models digits resnet18] [--min-seconds 1.0]
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
from trtforge.backends.onnxruntime import OnnxRuntimeTarget
from trtforge.spec import ModelSpec, Precision, load_spec, parse_spec
from trtforge.stages.checkpoint import ensure_checkpoint
from trtforge.stages.convert_precision import convert_precision
from trtforge.stages.export import export_onnx
from trtforge.stages.simplify import simplify_onnx

REPO = Path(__file__).resolve().parents[1]
DIGITS_SPEC = REPO / "examples" / "digits" / "spec.yaml"
PRECISIONS = (Precision.FP32, Precision.FP16, Precision.INT8)
BATCHES = (1, 32)
DIGITS_CALIBRATION_SAMPLES = 320
RESNET_CALIBRATION_SAMPLES = 32
RESNET_PROBE_SAMPLES = 64


@dataclass(frozen=True)
class Workload:
    name: str
    onnx_path: Path
    spec: ModelSpec
    calibration: dict[str, np.ndarray]
    probe: np.ndarray
    labels: np.ndarray | None


@dataclass(frozen=True)
class Row:
    model: str
    precision: str
    batch: int
    latency_ms: float
    ratio: float
    accuracy: str


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
    runners: dict[Precision, object], feeds: dict[str, np.ndarray], min_seconds: float, min_rounds: int = 3
) -> dict[Precision, float]:
    """Runs the precisions in turn, round after round, so load from other processes falls on all of them alike."""
    for runner in runners.values():
        runner.run(feeds)  # the first run allocates and picks kernels
    times: dict[Precision, list[float]] = {precision: [] for precision in runners}
    started = time.perf_counter()
    while len(times[Precision.FP32]) < min_rounds or time.perf_counter() - started < min_seconds * len(runners):
        for precision, runner in runners.items():
            tick = time.perf_counter()
            runner.run(feeds)
            times[precision].append(time.perf_counter() - tick)
    return {precision: statistics.median(samples) * 1000 for precision, samples in times.items()}


def run_all(runner, images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([runner.run({"input": images[i : i + batch]})["logits"] for i in range(0, len(images), batch)])


def benchmark(workload: Workload, work: Path, min_seconds: float) -> list[Row]:
    backend = get_backend("onnxruntime")
    outputs: dict[Precision, np.ndarray] = {}
    runners = {}
    for precision in PRECISIONS:
        converted = convert_precision(
            workload.onnx_path,
            precision,
            workload.calibration,
            workload.spec.precision,
            spec=workload.spec,
            cache_dir=work / "precision-cache",
        )
        target = OnnxRuntimeTarget(precision=precision)
        built = backend.build(converted.onnx_path, target, workload.spec, work / workload.name / f"engine-{precision.value}")
        runners[precision] = backend.load_runner(built.engine_path)
        outputs[precision] = run_all(runners[precision], workload.probe, max(BATCHES))
    latencies = {}
    for batch in BATCHES:
        for precision, latency in median_latencies_ms(runners, {"input": workload.probe[:batch]}, min_seconds).items():
            latencies[precision, batch] = latency

    rows = []
    for precision in PRECISIONS:
        logits = outputs[precision]
        if workload.labels is not None:
            accuracy = f"top-1 {100 * np.mean(logits.argmax(1) == workload.labels):.2f}%"
        else:
            reference = outputs[Precision.FP32]
            agreement = np.mean(logits.argmax(1) == reference.argmax(1))
            cosine = np.mean((logits * reference).sum(1) / (np.linalg.norm(logits, axis=1) * np.linalg.norm(reference, axis=1)))
            accuracy = f"agreement {100 * agreement:.1f}%, cosine {cosine:.5f}"
        for batch in BATCHES:
            latency = latencies[precision, batch]
            rows.append(Row(workload.name, precision.value, batch, latency, latency / latencies[Precision.FP32, batch], accuracy))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("digits", "resnet18"), default=["digits", "resnet18"])
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time spent measuring each latency")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep models and engines here (default: a temp folder)")
    args = parser.parse_args()

    import onnxruntime

    builders = {"digits": digits_workload, "resnet18": resnet18_workload}
    with tempfile.TemporaryDirectory(prefix="cpu-precision-") as scratch:
        work = args.work_dir or Path(scratch)
        rows = []
        for name in args.models:
            rows += benchmark(builders[name](work), work, args.min_seconds)

    print(f"onnxruntime {onnxruntime.__version__} CPU, {os.cpu_count()} logical CPUs; median latency, ratio to fp32 in this run")
    header = f"{'model':<10} {'precision':<9} {'batch':>5} {'latency ms':>11} {'vs fp32':>8}  accuracy"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row.model:<10} {row.precision:<9} {row.batch:>5} {row.latency_ms:>11.3f} {row.ratio:>7.2f}x  {row.accuracy}")


if __name__ == "__main__":
    main()
