"""Stage 'build + gate': build one target's engine and gate it on the machine that built it."""

from __future__ import annotations

from pathlib import Path

from trtforge.backends.base import BuiltEngine, get_backend
from trtforge.evalset import load_eval_set
from trtforge.isolation import run_isolated
from trtforge.safeio import atomic_write_bytes, atomic_write_json
from trtforge.spec import BackendName, ModelSpec, Target
from trtforge.stages.gate import PreviousRelease, gate_target
from trtforge.stages.reference import ReferenceResult, load_reference
from trtforge.summary import TargetOutcome, TargetStatus


def _build_engine(
    backend_name: str, onnx_path: Path, target: Target, spec: ModelSpec, work_dir: Path, timing_cache: Path | None
) -> BuiltEngine:
    """Runs in the child process: engine builders are native code that can crash on a model."""
    options = {"timing_cache": timing_cache} if timing_cache is not None else {}
    return get_backend(backend_name).build(onnx_path, target, spec, work_dir, **options)


def build_and_gate(
    spec: ModelSpec,
    target: Target,
    onnx_path: Path,
    reference: ReferenceResult,
    work_dir: Path,
    previous: PreviousRelease | None = None,
    timing_cache: Path | None = None,
) -> TargetOutcome:
    """``timing_cache`` (TensorRT only) is read before the build and updated after it."""
    backend = get_backend(target.backend.value)
    built = run_isolated(
        "build",
        _build_engine,
        target.backend.value,
        onnx_path,
        target,
        spec,
        work_dir,
        timing_cache,
        timeout_s=spec.isolation.timeout_s,
        memory_mb=spec.isolation.memory_mb,
    )
    runner = backend.load_runner(built.engine_path)
    result = gate_target(spec, target, built.tag, runner, load_eval_set(spec), load_reference(reference), previous)
    gate_json = work_dir / "gate.json"
    atomic_write_json(gate_json, result.model_dump(mode="json"))
    return TargetOutcome(
        tag=built.tag,
        backend=target.backend.value,
        precision=target.precision.value,
        required=target.required,
        status=TargetStatus.PASSED if result.passed else TargetStatus.FAILED,
        reason="; ".join(result.failures),
        metrics=result.metrics,
        thresholds=result.thresholds,
        failures=result.failures,
        notes=result.notes,
        record=built.record,
        files={"engine": built.engine_path, **built.extra_files, "gate.json": gate_json},
    )


def timing_cache_key(runtime_version: str, arch: str) -> str:
    """One shared cache per (TensorRT major.minor, compute capability): tactics differ across both."""
    return f"trt{'.'.join(runtime_version.split('.')[:2])}-{arch.replace('_', '')}"


def build_with_shared_timing_cache(
    registry,
    spec: ModelSpec,
    target: Target,
    onnx_path: Path,
    reference: ReferenceResult,
    work_dir: Path,
    previous: PreviousRelease | None = None,
) -> TargetOutcome:
    """``build_and_gate``, with TensorRT's timing cache fetched from the registry first and stored back after."""
    backend = get_backend(target.backend.value)
    version = backend.runtime_version()
    if target.backend is not BackendName.TENSORRT or version is None or registry is None:
        return build_and_gate(spec, target, onnx_path, reference, work_dir, previous)
    key = timing_cache_key(version, target.arch)
    cache = work_dir / "timing.cache"
    work_dir.mkdir(parents=True, exist_ok=True)
    stored = registry.get_timing_cache(key)
    if stored is not None:
        atomic_write_bytes(cache, stored)
    outcome = build_and_gate(spec, target, onnx_path, reference, work_dir, previous, timing_cache=cache)
    if cache.is_file():
        registry.put_timing_cache(key, cache.read_bytes())
    return outcome
