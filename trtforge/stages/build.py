"""Stage 'build + gate': build one target's engine and gate it on the machine that built it."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from trtforge.backends.base import BuildOptions, BuiltEngine, get_backend
from trtforge.evalset import load_eval_set
from trtforge.isolation import run_isolated
from trtforge.registry import open_registry
from trtforge.safeio import atomic_write_bytes, atomic_write_json
from trtforge.spec import ModelSpec, Target, load_spec
from trtforge.stages.gate import (
    GateResult,
    PreviousRelease,
    effective_thresholds,
    gate_target,
    latency_failures,
    max_batch,
    measure_latency,
    noisy_timing_notes,
    timing_conditions,
)
from trtforge.stages.reference import ReferenceResult, load_reference
from trtforge.summary import TargetOutcome, TargetStatus


def _build_engine(onnx_path: Path, target: Target, spec: ModelSpec, work_dir: Path, options: BuildOptions) -> BuiltEngine:
    """Runs in the child process: engine builders are native code that can crash on a model."""
    return get_backend(target.backend).build(onnx_path, target, spec, work_dir, options)


def build_and_gate(
    spec: ModelSpec,
    target: Target,
    onnx_path: Path,
    reference: ReferenceResult,
    work_dir: Path,
    previous: PreviousRelease | None = None,
    options: BuildOptions | None = None,
    timed: bool = True,
) -> TargetOutcome:
    """``timed``: time the engine in its gate; False leaves that to ``time_alone`` once nothing else runs."""
    backend = get_backend(target.backend)
    built = run_isolated(
        "build",
        _build_engine,
        onnx_path,
        target,
        spec,
        work_dir,
        options or BuildOptions(),
        timeout_s=spec.isolation.timeout_s,
        memory_mb=spec.isolation.memory_mb,
    )
    runner = backend.load_runner(built.engine_path)
    try:
        result = gate_target(spec, target, built.tag, runner, load_eval_set(spec), load_reference(reference), previous, timed=timed)
    finally:
        runner.close()
    gate_json = work_dir / "gate.json"
    atomic_write_json(gate_json, result.model_dump(mode="json"))
    record = {**built.record, "timing": timing_conditions() | {"alone": False}} if timed else built.record
    return TargetOutcome(
        tag=built.tag,
        backend=target.backend,
        precision=target.precision.value,
        required=target.required,
        status=TargetStatus.PASSED if result.passed else TargetStatus.FAILED,
        reason="; ".join(result.failures),
        metrics=result.metrics,
        thresholds=result.thresholds,
        failures=result.failures,
        notes=result.notes,
        record=record,
        files={"engine": built.engine_path, **built.extra_files, "gate.json": gate_json},
    )


def time_alone(spec: ModelSpec, target: Target, outcome: TargetOutcome) -> TargetOutcome:
    """Latency and throughput of a target built and gated with ``timed=False``, measured now: the caller runs
    this while nothing else of its run executes, one engine at a time, so no conversion or build shares the
    cores. The latency thresholds are applied, and gate.json and the outcome updated."""
    runner = get_backend(target.backend).load_runner(outcome.files["engine"])
    try:
        timing = measure_latency(spec, runner, load_eval_set(spec), max_batch(spec, target))
    finally:
        runner.close()
    metrics = {**outcome.metrics, **timing}
    failures = outcome.failures + latency_failures(metrics, effective_thresholds(spec, target))
    notes = outcome.notes + noisy_timing_notes(metrics)
    gate_json = outcome.files["gate.json"]
    gated = GateResult.model_validate_json(gate_json.read_text())
    atomic_write_json(
        gate_json,
        gated.model_copy(update={"metrics": metrics, "failures": failures, "notes": notes, "passed": not failures}).model_dump(mode="json"),
    )
    return outcome.model_copy(
        update={
            "status": TargetStatus.FAILED if failures else outcome.status,
            "reason": "; ".join(failures),
            "metrics": metrics,
            "failures": failures,
            "notes": notes,
            "record": {**outcome.record, "timing": timing_conditions() | {"alone": True}},
        }
    )


class BuildRequest(BaseModel):
    """One target to build and gate: what the local build task, the GPU-worker task and the ``build-target``
    deployment take (the deployment as JSON). The target is named by its spec file and index, so a worker
    reads the same spec from its own checkout."""

    spec_path: str
    target_index: int
    onnx_path: Path
    reference: ReferenceResult
    work_dir: Path
    previous: PreviousRelease | None = None
    registry: str | None = None
    # Set when the ONNX and the reference outputs travel through the registry's staging area: the
    # paths are then staging names, and the worker checks what it fetches against these.
    onnx_sha256: str | None = None
    reference_sha256: str | None = None
    # The staged ONNX's external data files: location (relative to the model) -> sha256.
    onnx_external: dict[str, str] = {}
    # False: the engine is gated untimed, and the caller times it afterwards, alone (``time_alone``).
    time_engine: bool = True


def build_requested(request: BuildRequest) -> TargetOutcome:
    """Build and gate the requested target, with the registry's shared timing cache where its backend has one."""
    spec = load_spec(request.spec_path)
    target = spec.targets[request.target_index]
    registry = open_registry(request.registry) if request.registry else None
    return build_with_shared_timing_cache(
        registry, spec, target, request.onnx_path, request.reference, request.work_dir, request.previous, timed=request.time_engine
    )


def build_with_shared_timing_cache(
    registry,
    spec: ModelSpec,
    target: Target,
    onnx_path: Path,
    reference: ReferenceResult,
    work_dir: Path,
    previous: PreviousRelease | None = None,
    timed: bool = True,
) -> TargetOutcome:
    """``build_and_gate``, with the backend's shared timing cache (where it has one) fetched from the registry first and stored back after."""
    key = get_backend(target.backend).timing_cache_key(target)
    if key is None or registry is None:
        return build_and_gate(spec, target, onnx_path, reference, work_dir, previous, timed=timed)
    cache = work_dir / "timing.cache"
    work_dir.mkdir(parents=True, exist_ok=True)
    stored = registry.get_timing_cache(key)
    if stored is not None:
        atomic_write_bytes(cache, stored)
    outcome = build_and_gate(spec, target, onnx_path, reference, work_dir, previous, BuildOptions(timing_cache=cache), timed=timed)
    if cache.is_file():
        registry.put_timing_cache(key, cache.read_bytes())
    return outcome
