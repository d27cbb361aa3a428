"""Our TensorRT engines against PyTorch on the same GPU, in the same run.

For ResNet-50, ViT-B/16 and Swin-T (torchvision architectures, seeded random weights: speed does
not depend on the weights' values), this builds fp16 and int8 engines the way the pipeline
does (export stage, ModelOpt AutoCast / Q/DQ, the tensorrt backend) and measures, at one batch
size, GPU latency with CUDA events (median, p99) and throughput, next to PyTorch eager fp16 and
``torch.compile`` fp16. It prints each engine's speed-up over both as ratios and writes JSON.

Needs an NVIDIA GPU, TensorRT and torch with CUDA:

    python benchmarks/gpu_engines.py --batch 32 --out artifacts/benchmarks/gpu_engines.json

Elsewhere it stops at once and says what is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODELS = {"resnet50": "torchvision.models:resnet50", "vit_b_16": "torchvision.models:vit_b_16", "swin_t": "torchvision.models:swin_t"}
PRECISIONS = ("fp16", "int8")
IMAGE_SHAPE = (3, 224, 224)
# Int8 calibration here only has to produce a valid Q/DQ model: accuracy is the gate's business.
# At least one batch of the benchmark's batch size; random images stand in for real ones.
CALIBRATION_SAMPLES = 64
EXPORT_TOLERANCE = 1e-2


def preflight():
    """The GPU to benchmark on (the first one CUDA can see in this process, which is the one torch
    uses as cuda:0), or exit with every reason this machine cannot run the benchmark."""
    from trtforge.backends.tensorrt import probe_tensorrt, usable_gpus
    from trtforge.gpu import probe_cuda_runtime

    problems = []
    cuda = probe_cuda_runtime()
    if not cuda.usable:
        problems.append(cuda.reason)
    gpus = usable_gpus(cuda)
    if not gpus.available:
        problems.append(gpus.reason)
    probe = probe_tensorrt()
    if not probe.usable:
        problems.append(probe.reason)
    try:
        import torch

        if not torch.cuda.is_available():
            problems.append(f"torch {torch.__version__} cannot use a CUDA GPU here (a CPU-only build, or no GPU)")
    except ImportError:
        problems.append("torch is not installed: pip install 'trtforge[pipeline]'")
    if problems:
        raise SystemExit(
            "benchmarks/gpu_engines.py needs an NVIDIA GPU with TensorRT and CUDA-enabled torch; on this machine:\n  - "
            + "\n  - ".join(problems)
        )
    return min(gpus.gpus, key=lambda gpu: gpu.cuda_device)


def make_spec(name: str, factory: str, checkpoint: Path, batch: int, arch: str):
    from trtforge.spec import parse_spec

    return parse_spec(
        {
            "name": f"bench-{name.replace('_', '-')}",
            "model": factory,
            "checkpoint": str(checkpoint),
            "inputs": [{"name": "images", "shape": ["batch", *IMAGE_SHAPE], "dynamic": {"batch": {"min": 1, "opt": batch, "max": batch}}}],
            "outputs": [{"name": "logits"}],
            "export": {"opset": 18, "tolerance": EXPORT_TOLERANCE},
            # What a deployment would pick for speed: max calibration, unquantized parts in fp16.
            "precision": {"calibration_method": "max", "high_precision_dtype": "fp16"},
            "eval": {"data": "unused-by-the-benchmark.npz"},
            "targets": [{"backend": "tensorrt", "device": "gpu", "arch": arch, "precision": p} for p in PRECISIONS],
        },
        source=f"benchmark spec for {name}",
    )


def seeded_checkpoint(factory: str, path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from trtforge.modelload import import_callable

    if not path.is_file():
        torch.manual_seed(0)
        model = import_callable(factory, None, "model")()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def convert(spec, onnx_path: Path, precision, work: Path) -> Path:
    import numpy as np

    from trtforge.stages.convert_precision import convert_precision

    samples = np.random.default_rng(0).standard_normal((CALIBRATION_SAMPLES, *IMAGE_SHAPE)).astype(np.float32)
    return convert_precision(onnx_path, precision, {"images": samples}, spec.precision, spec=spec, cache_dir=work / "converted").onnx_path


def time_torch(module, batch: int, runs: int, warmup: int) -> dict[str, float]:
    import numpy as np
    import torch

    images = torch.randn(batch, *IMAGE_SHAPE, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        for _ in range(warmup):
            module(images)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(runs):
            start.record()
            module(images)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    samples = np.asarray(times)
    return {"median_ms": float(np.median(samples)), "p99_ms": float(np.percentile(samples, 99))}


def bench_model(name: str, factory: str, arch: str, args) -> list[dict]:
    import torch

    from trtforge.backends.base import BuildOptions, get_backend
    from trtforge.modelload import load_model
    from trtforge.stages.export import export_onnx

    work = args.work / name
    spec = make_spec(name, factory, seeded_checkpoint(factory, work / "weights.safetensors"), args.batch, arch)
    print(f"[{name}] exporting", flush=True)
    onnx_path = export_onnx(spec, spec.checkpoint, work).onnx_path
    backend = get_backend("tensorrt")
    rows = []
    for target in spec.targets:
        cache = args.work / "timing-caches" / f"{backend.timing_cache_key(target)}.cache"
        precision = target.precision.value
        print(f"[{name}] {precision}: converting and building", flush=True)
        converted = convert(spec, onnx_path, target.precision, work)
        built = backend.build(converted, target, spec, work / precision, BuildOptions(timing_cache=cache))
        with backend.load_runner(built.engine_path) as runner:
            (latency,) = runner.measure_latency(runs=args.runs, warmup=args.warmup)
        rows.append(
            {
                "model": name,
                "engine": f"tensorrt {precision}",
                "median_ms": latency.stats.median_ms,
                "p99_ms": latency.stats.p99_ms,
                "build_seconds": built.record["build_seconds"],
                "tag": built.tag,
            }
        )

    model = load_model(spec, spec.checkpoint).half().cuda().eval()
    print(f"[{name}] PyTorch eager fp16", flush=True)
    rows.append({"model": name, "engine": "torch eager fp16", **time_torch(model, args.batch, args.runs, args.warmup)})
    print(f"[{name}] torch.compile fp16 (compiling)", flush=True)
    started = time.perf_counter()
    compiled = torch.compile(model)
    timed = time_torch(compiled, args.batch, args.runs, max(args.warmup, 3))
    rows.append({"model": name, "engine": "torch.compile fp16", **timed, "compile_seconds": time.perf_counter() - started})
    del model, compiled
    torch.cuda.empty_cache()

    eager = next(r for r in rows if r["engine"] == "torch eager fp16")["median_ms"]
    compiled_ms = next(r for r in rows if r["engine"] == "torch.compile fp16")["median_ms"]
    for row in rows:
        row["batch"] = args.batch
        row["images_per_s"] = args.batch * 1000.0 / row["median_ms"]
        row["vs_eager"] = eager / row["median_ms"]
        row["vs_compile"] = compiled_ms / row["median_ms"]
    return rows


def print_table(rows: list[dict], gpu: str) -> None:
    print(f"\nGPU: {gpu}; batch {rows[0]['batch']}; latency = one batch, CUDA events; speed-up = PyTorch median / this median")
    header = f"{'model':<10} {'engine':<20} {'median ms':>10} {'p99 ms':>9} {'images/s':>10} {'x eager':>8} {'x compile':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<10} {r['engine']:<20} {r['median_ms']:>10.3f} {r['p99_ms']:>9.3f} {r['images_per_s']:>10.0f} "
            f"{r['vs_eager']:>8.2f} {r['vs_compile']:>10.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path("artifacts/benchmarks/gpu_engines"))
    parser.add_argument("--out", type=Path, default=Path("artifacts/benchmarks/gpu_engines.json"))
    args = parser.parse_args(argv)
    if args.batch < 1 or args.runs < 1 or args.warmup < 0:
        parser.error("--batch and --runs must be >= 1, --warmup >= 0")

    gpu = preflight()
    arch = gpu.compute_capability
    import torch

    from trtforge.backends.tensorrt import probe_tensorrt
    from trtforge.gpu import detect_gpus

    # PyTorch on the GPU the engines are built and timed on (the build picks the first visible GPU of its arch).
    torch.cuda.set_device(gpu.cuda_device)

    rows = []
    for name in args.models:
        rows.extend(bench_model(name, MODELS[name], arch, args))
    print_table(rows, f"{gpu.name} ({arch}, {gpu.pci_bus_id})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "gpu": gpu.name,
        "pci_bus_id": gpu.pci_bus_id,
        "arch": arch,
        "driver": detect_gpus().driver_version,
        "tensorrt": probe_tensorrt().version,
        "batch": args.batch,
        "runs": args.runs,
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
