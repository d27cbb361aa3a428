"""The onnxruntime CPU backend: the engine is the ONNX model with onnxruntime's graph optimizations applied.

ORT_ENABLE_EXTENDED, not ORT_ENABLE_ALL: the 'all' level adds layout transforms specific to
the building machine's CPU, which would make the saved engine non-portable across workers.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Literal

import numpy as np

from trtforge.backends.base import Availability, BuildOptions, BuiltEngine, register_backend, target_tag, wall_clock_ms
from trtforge.errors import StageError
from trtforge.hashing import sha256_file
from trtforge.numeric import onnxruntime_session
from trtforge.safeio import atomic_output, atomic_write_json
from trtforge.spec import ModelSpec, Precision, Target

SUPPORTED_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.INT8)
OPTIMIZATION_LEVEL = "ORT_ENABLE_EXTENDED"


class OnnxRuntimeTarget(Target):
    """An onnxruntime CPU target: precision and the common options, nothing GPU-specific."""

    backend: Literal["onnxruntime"] = "onnxruntime"
    device: Literal["cpu"] = "cpu"

    @property
    def place(self) -> str:
        return self.device


class OnnxRuntimeRunner:
    def __init__(self, engine_path: Path):
        self.session = onnxruntime_session(engine_path)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {k: feeds[k] for k in self.input_names})
        return dict(zip(self.output_names, outputs))

    def time_ms(self, feeds: dict[str, np.ndarray], *, warmup: int, iterations: int) -> list[float]:
        return wall_clock_ms(lambda: self.run(feeds), warmup=warmup, iterations=iterations)

    def close(self) -> None:
        self.session = None


class OnnxRuntimeBackend:
    name = "onnxruntime"
    tag_prefix = "ort"
    target_model = OnnxRuntimeTarget

    def runtime_version(self) -> str | None:
        import onnxruntime

        return onnxruntime.__version__

    def availability(self, target: Target) -> Availability:
        if target.precision not in SUPPORTED_PRECISIONS:
            supported = ", ".join(p.value for p in SUPPORTED_PRECISIONS)
            return Availability(False, f"onnxruntime CPU has no {target.precision.value} kernels; use one of {supported}")
        return Availability(True)

    def build(self, onnx_path: Path, target: Target, spec: ModelSpec, out_dir: Path, options: BuildOptions = BuildOptions()) -> BuiltEngine:
        tag = target_tag(target, spec, self.runtime_version())
        out_dir.mkdir(parents=True, exist_ok=True)
        engine = out_dir / "engine"
        started = time.perf_counter()
        with atomic_output(engine) as partial:
            try:
                onnxruntime_session(onnx_path, optimized_path=partial)
            except Exception as err:
                raise StageError("build", f"onnxruntime could not load {onnx_path}: {err}") from None
        seconds = time.perf_counter() - started
        record = {
            "tag": tag,
            "backend": self.name,
            "precision": target.precision.value,
            "device": "cpu",
            "runtime_version": self.runtime_version(),
            "graph_optimization_level": OPTIMIZATION_LEVEL,
            "source_onnx_sha256": sha256_file(onnx_path),
            "engine_sha256": sha256_file(engine),
            "engine_bytes": engine.stat().st_size,
            "build_seconds": seconds,
            "machine": platform.machine(),
        }
        build_json = out_dir / "build.json"
        atomic_write_json(build_json, record)
        return BuiltEngine(tag=tag, engine_path=engine, record=record, extra_files={"build.json": build_json})

    def load_runner(self, engine_path: Path) -> OnnxRuntimeRunner:
        return OnnxRuntimeRunner(engine_path)

    def timing_cache_key(self, target: Target) -> None:
        return None


register_backend(OnnxRuntimeBackend())
