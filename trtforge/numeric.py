"""Numeric agreement between a model and its reference on random inputs at min, opt and max shapes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from trtforge.spec import InputSpec, ModelSpec

SHAPE_LEVELS = ("min", "opt", "max")
# Token ids and indices below the smallest vocabulary or table a model is likely to have.
DEFAULT_INTEGER_RANGE = (0, 99)
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


def random_inputs(inputs: list[InputSpec], level: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in inputs:
        shape = inp.shape_at(level)
        dtype = NUMPY_DTYPES[inp.dtype]
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            low, high = inp.value_range or DEFAULT_INTEGER_RANGE
            feeds[inp.name] = rng.integers(low, high + 1, shape).astype(dtype)
    return feeds


# The level saved graphs get: ALL adds layout transforms (NchwcTransformer) specific to the CPU
# that applies them, so a graph saved at ALL would not be portable across workers. ALL also
# segfaulted onnxruntime 1.32 on AutoCast fp16 transformers: sessions open at ALL only where a
# build probed it safe (trtforge.backends.onnxruntime).
PORTABLE_OPTIMIZATION_LEVEL = "ORT_ENABLE_EXTENDED"


def onnxruntime_session(
    onnx_path: Path,
    optimized_path: Path | None = None,
    disable_optimizations: bool = False,
    optimization_level: str = PORTABLE_OPTIMIZATION_LEVEL,
):
    """A CPU session on ``onnx_path``; ``optimization_level`` is a ``GraphOptimizationLevel`` name."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization_level)
    if disable_optimizations:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
        # The saved engine is one self-contained file: without these, onnxruntime keeps a source model's
        # external-data references, which point at files the engine's folder (and the registry) never has.
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "inline.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", str(1 << 62))
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def max_abs_diff_by_level(
    spec: ModelSpec,
    candidate: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
    reference: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
) -> dict[str, float]:
    """Largest absolute difference over all outputs, per shape level."""
    diffs = {}
    for offset, level in enumerate(SHAPE_LEVELS):
        feeds = random_inputs(spec.inputs, level, spec.export.seed + offset)
        got = candidate(feeds)
        want = reference(feeds)
        # initial=0: a data-dependent output may be empty at some shape.
        diffs[level] = max(
            float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)), initial=0.0)) for g, w in zip(got, want)
        )
    return diffs


def onnx_runner(onnx_path: Path, output_names: list[str], disable_optimizations: bool = False):
    session = onnxruntime_session(onnx_path, disable_optimizations=disable_optimizations)
    return lambda feeds: session.run(output_names, feeds)
