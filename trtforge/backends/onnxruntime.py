"""The onnxruntime CPU backend: the engine is the ONNX model with onnxruntime's graph optimizations applied.

The engine is saved at ORT_ENABLE_EXTENDED, which is portable across CPU workers; the runner
opens it at ORT_ENABLE_ALL (which adds the NCHWc layout transforms for the CPU it runs on, a
large speed-up for convolutions) where the build probed ALL safe on the engine. The probe runs
in a child process, because ALL has segfaulted onnxruntime on some graphs (AutoCast fp16
transformers); a crash there keeps EXTENDED, and build.json beside the engine records the level
the runner uses and why.

int8 engines for this backend are quantized by onnxruntime's own quantizer (QDQ that its CPU
kernels fuse into integer ones), not ModelOpt's TensorRT-oriented placement.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Literal

import numpy as np

from trtforge.backends.base import Availability, BuildOptions, BuiltEngine, register_backend, target_tag, wall_clock_ms
from trtforge.errors import StageError, TrtforgeError
from trtforge.hashing import sha256_file
from trtforge.isolation import run_isolated
from trtforge.numeric import PORTABLE_OPTIMIZATION_LEVEL, max_abs_diff_by_level, onnxruntime_session
from trtforge.safeio import atomic_output, atomic_write_json, load_onnx_safely
from trtforge.spec import ModelSpec, Precision, Target
from trtforge.stages.convert_precision import QUANTIZER_METADATA_KEY, Quantizer

SUPPORTED_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.INT8)
FAST_OPTIMIZATION_LEVEL = "ORT_ENABLE_ALL"
BUILD_RECORD = "build.json"
PROBE_STAGE = "build (probe ORT_ENABLE_ALL)"


def run_at_fast_level(engine_path: str, spec: ModelSpec) -> dict[str, float]:
    """Runs in the probe's child process: the engine at ALL and at its saved level on random inputs at every shape
    level; returns the largest absolute difference of their outputs per level."""
    fast = onnxruntime_session(Path(engine_path), optimization_level=FAST_OPTIMIZATION_LEVEL)
    saved = onnxruntime_session(Path(engine_path))
    return max_abs_diff_by_level(spec, lambda feeds: fast.run(None, feeds), lambda feeds: saved.run(None, feeds))


class OnnxRuntimeTarget(Target):
    """An onnxruntime CPU target: precision and the common options, nothing GPU-specific."""

    backend: Literal["onnxruntime"] = "onnxruntime"
    device: Literal["cpu"] = "cpu"

    @property
    def place(self) -> str:
        return self.device


class OnnxRuntimeRunner:
    def __init__(self, engine_path: Path, optimization_level: str = PORTABLE_OPTIMIZATION_LEVEL):
        self.optimization_level = optimization_level
        self.session = onnxruntime_session(engine_path, optimization_level=optimization_level)
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
    # int8 quantized the way onnxruntime's CPU kernels run fast (trtforge.stages.convert_precision).
    quantizer = Quantizer.ONNXRUNTIME

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
        level, probe = self.probe_fast_level(engine, spec)
        record = {
            "tag": tag,
            "backend": self.name,
            "precision": target.precision.value,
            "device": "cpu",
            "runtime_version": self.runtime_version(),
            # The level the runner opens the engine at; the engine file itself is saved at the portable one.
            "graph_optimization_level": level,
            "saved_graph_optimization_level": PORTABLE_OPTIMIZATION_LEVEL,
            "optimization_probe": probe,
            "quantizer": _quantizer_of(onnx_path, spec),
            "source_onnx_sha256": sha256_file(onnx_path),
            "engine_sha256": sha256_file(engine),
            "engine_bytes": engine.stat().st_size,
            "build_seconds": seconds,
            "machine": platform.machine(),
        }
        build_json = out_dir / BUILD_RECORD
        atomic_write_json(build_json, record)
        return BuiltEngine(tag=tag, engine_path=engine, record=record, extra_files={BUILD_RECORD: build_json})

    def probe_fast_level(self, engine: Path, spec: ModelSpec) -> tuple[str, dict]:
        """The level the runner may use: ALL where the engine runs at ALL in a child process, else the portable level."""
        try:
            max_abs_diff = run_isolated(
                PROBE_STAGE,
                self.fast_level_check,
                str(engine),
                spec,
                timeout_s=spec.isolation.timeout_s,
                memory_mb=spec.isolation.memory_mb,
            )
        except TrtforgeError as err:
            return PORTABLE_OPTIMIZATION_LEVEL, {
                "level": FAST_OPTIMIZATION_LEVEL,
                "safe": False,
                "reason": f"{err}; the runner keeps {PORTABLE_OPTIMIZATION_LEVEL}",
            }
        return FAST_OPTIMIZATION_LEVEL, {
            "level": FAST_OPTIMIZATION_LEVEL,
            "safe": True,
            "reason": "ran in a child process at the min, opt and max shapes of the spec's inputs",
            "max_abs_diff_vs_saved_level": max_abs_diff,
        }

    # What the probe's child runs: a module-level function (the child is spawned), named here so a subclass can check otherwise.
    fast_level_check = staticmethod(run_at_fast_level)

    def load_runner(self, engine_path: Path) -> OnnxRuntimeRunner:
        return OnnxRuntimeRunner(engine_path, runner_level(engine_path))

    def timing_cache_key(self, target: Target) -> None:
        return None


def runner_level(engine_path: Path) -> str:
    """The level the build recorded in build.json beside the engine (the build folder and a pulled target's
    folder both keep it there); the portable level for an engine without one."""
    record_path = Path(engine_path).with_name(BUILD_RECORD)
    if not record_path.is_file():
        return PORTABLE_OPTIMIZATION_LEVEL
    try:
        level = json.loads(record_path.read_text()).get("graph_optimization_level")
    except (ValueError, AttributeError):
        raise StageError("build", f"{record_path} is not a build record: pull the target again or rebuild it") from None
    if level not in (PORTABLE_OPTIMIZATION_LEVEL, FAST_OPTIMIZATION_LEVEL):
        raise StageError(
            "build",
            f"{record_path}: graph_optimization_level {level!r} is not {PORTABLE_OPTIMIZATION_LEVEL} or "
            f"{FAST_OPTIMIZATION_LEVEL}: pull the target again or rebuild it",
        )
    return level


def _quantizer_of(onnx_path: Path, spec: ModelSpec) -> dict | None:
    """Which quantizer made the model the engine is built from (the conversion stamps it in the model), or None."""
    model = load_onnx_safely(onnx_path, plugins=spec.plugins, load_external_data=False)
    stamp = next((entry.value for entry in model.metadata_props if entry.key == QUANTIZER_METADATA_KEY), None)
    if stamp is None:
        return None
    try:
        return json.loads(stamp)
    except ValueError:
        raise StageError(
            "build", f"{onnx_path}: metadata {QUANTIZER_METADATA_KEY!r} is not JSON: convert the model with trtforge again"
        ) from None


register_backend(OnnxRuntimeBackend())
