"""The small protocol every engine backend implements, and the registry of backends by name.

A backend builds an engine file from an ONNX model for one target and loads it back as a
runner for the gate and the benchmarks. Adding a backend is one module: its target model (a
``Target`` subclass with ``backend: Literal["name"]`` and the options that apply to it) and
its backend object, registered together with ``register_backend``; targets name it in the spec
(tests/test_backend_extension.py adds one in a single file).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from trtforge.errors import TrtforgeError
from trtforge.spec import ModelSpec, Target, register_target_model


@dataclass(frozen=True)
class Availability:
    """Whether this process can build and run a target, and if not, what the user can do about it."""

    available: bool
    reason: str = ""


@dataclass(frozen=True)
class BuiltEngine:
    """An engine file plus what describes how it was built (written as build.json beside it)."""

    tag: str
    engine_path: Path
    record: dict[str, Any]
    extra_files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildOptions:
    """What a build gets besides the model, the target and the spec; a backend ignores what does not apply to it."""

    # TensorRT's timing cache: read before the build when the file exists, written after it.
    timing_cache: Path | None = None


class Runner(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def time_ms(self, feeds: dict[str, np.ndarray], *, warmup: int, iterations: int) -> list[float]:
        """Milliseconds of each of ``iterations`` calls on ``feeds``, by the runtime's own clock (CUDA events on a GPU)."""

    def close(self) -> None:
        """Free what the runner holds (sessions, streams, device buffers)."""


class Backend(Protocol):
    name: str
    # First part of the target tags of its engines, e.g. 'ort' in ort1.32-cpu-fp32-b1_32_128.
    tag_prefix: str
    target_model: type[Target]

    def runtime_version(self) -> str | None:
        """Version of the runtime that builds the engine, or None where it is not installed."""

    def availability(self, target: Target) -> Availability: ...

    def build(
        self, onnx_path: Path, target: Target, spec: ModelSpec, out_dir: Path, options: BuildOptions = BuildOptions()
    ) -> BuiltEngine: ...

    def load_runner(self, engine_path: Path) -> Runner: ...

    def timing_cache_key(self, target: Target) -> str | None:
        """The registry key of the build-tuning cache that builds of ``target`` share, or None where the backend has none."""


def wall_clock_ms(run: Callable[[], object], *, warmup: int, iterations: int) -> list[float]:
    """Milliseconds of each of ``iterations`` calls of ``run`` after ``warmup`` untimed ones: the timer of runners
    whose call is the whole inference (CPU runtimes), where no device keeps working after it returns."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return times


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Make ``backend`` and its target model known: spec targets with ``backend: <its name>`` validate against that model."""
    declared = backend.target_model.model_fields["backend"].default
    if declared != backend.name:
        raise TypeError(f"backend {backend.name!r} registers a target model whose 'backend' defaults to {declared!r}")
    _BACKENDS[backend.name] = backend
    register_target_model(backend.target_model)
    return backend


def get_backend(name: str) -> Backend:
    # Importing the package registers the built-in backends.
    import trtforge.backends  # noqa: F401

    try:
        return _BACKENDS[name]
    except KeyError:
        raise TrtforgeError(f"unknown backend {name!r}; known: {', '.join(sorted(_BACKENDS))}") from None


def shape_profile_tag(spec: ModelSpec) -> str:
    """Short name of the spec's dynamic ranges, e.g. ``b1_32_128`` for a batch dim 1/32/128."""
    parts = []
    for inp in spec.inputs:
        for dim_name, dim in inp.dynamic.items():
            part = f"{dim_name[0]}{dim.min}_{dim.opt}_{dim.max}"
            if part not in parts:
                parts.append(part)
    return "-".join(parts) or "static"


def target_tag(target: Target, spec: ModelSpec, runtime_version: str | None) -> str:
    """The registry name of one built target, e.g. ``trt11.4-sm90-int8-b1_32_128``.

    The runtime's major.minor is part of the tag because engines (TensorRT plans, and
    onnxruntime-optimized graphs with contrib ops) are tied to the runtime that made them.
    """
    version = ".".join(runtime_version.split(".")[:2]) if runtime_version else ""
    return f"{get_backend(target.backend).tag_prefix}{version}-{target.place}-{target.precision.value}-{shape_profile_tag(spec)}"
