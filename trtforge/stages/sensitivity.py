"""Stage 'sensitivity': which quantized nodes of an int8/fp8 graph cost the most accuracy.

Both graphs run on calibration batches (never the eval set, which judges the result) with
every quantized node's output, and the activations feeding it, marked as graph outputs. For
each node the relative L2 error of its output against the FP32 graph's same tensor is
``output_error``; the error it *adds* is that minus the largest error already present on its
inputs. Ranking by the added error points at the nodes whose own Q/DQ does the damage, not at
every node downstream of them (which inherits the error and would otherwise rank just as high).

A ranking is measured, not a proof: the precision ladder re-gates every exclusion it makes.
The graphs run in a child process, as every stage that hands a graph to native code does.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from trtforge.errors import StageError
from trtforge.isolation import run_isolated
from trtforge.safeio import load_onnx_safely
from trtforge.spec import ModelSpec, Precision
from trtforge.stages.convert_precision import plan_batches

STAGE = "sensitivity"
# Enough samples for a stable per-node error on every model tried; more only costs time.
SAMPLES = 64
REPORTED_NODES = 10
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
FLOAT_TYPES = (1, 10, 16)  # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16
DEFAULT_TIMEOUT_S = 1800.0


class NodeSensitivity(BaseModel):
    name: str
    op_type: str
    output_error: float
    added_error: float


class SensitivityResult(BaseModel):
    precision: Precision
    samples: int
    nodes: list[NodeSensitivity]
    seconds: float

    def worst(self, count: int, skip: frozenset[str] = frozenset()) -> list[NodeSensitivity]:
        """The ``count`` nodes that add the most error, leaving out ``skip`` and nodes that add none."""
        return [n for n in self.nodes if n.name not in skip and n.added_error > 0][:count]


def describe_nodes(nodes: list[NodeSensitivity]) -> str:
    return ", ".join(f"{n.name} ({n.op_type}, {n.added_error:+.3f})" for n in nodes)


def exact_node_patterns(names: list[str]) -> list[str]:
    """ModelOpt's nodes_to_exclude are regular expressions matched from the start of a name: these match exactly one name each."""
    return [re.escape(name) + "$" for name in names]


def rank_quantized_nodes(
    reference_onnx: Path,
    quantized_onnx: Path,
    precision: Precision,
    calibration: Mapping[str, np.ndarray],
    *,
    spec: ModelSpec,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> SensitivityResult:
    """The quantized nodes of ``quantized_onnx``, most harmful first, against ``reference_onnx`` (the graph it was converted from)."""
    started = time.perf_counter()
    plan = plan_batches(calibration, list(spec.inputs), quantized_onnx)
    batches = min(plan.batches, max(1, -(-SAMPLES // plan.batch_size)))
    feeds = [
        {inp.name: calibration[inp.name][i * plan.batch_size : (i + 1) * plan.batch_size] for inp in spec.inputs} for i in range(batches)
    ]
    nodes = run_isolated(STAGE, _rank_in_child, str(reference_onnx), str(quantized_onnx), feeds, list(spec.plugins), timeout_s=timeout_s)
    if not nodes:
        raise StageError(STAGE, f"{quantized_onnx} has no quantized nodes whose outputs can be compared with {reference_onnx}")
    return SensitivityResult(precision=precision, samples=batches * plan.batch_size, nodes=nodes, seconds=time.perf_counter() - started)


def _rank_in_child(
    reference_path: str, quantized_path: str, feeds: list[dict[str, np.ndarray]], plugins: list[str]
) -> list[NodeSensitivity]:

    reference = load_onnx_safely(Path(reference_path), plugins=plugins)
    quantized = load_onnx_safely(Path(quantized_path), plugins=plugins)
    producers = {out: node for node in quantized.graph.node for out in node.output}
    reference_values = {out for node in reference.graph.node for out in node.output}
    types = _float_value_types(quantized)

    def activation_source(name: str) -> str | None:
        """The tensor a Q -> DQ pair fake-quantizes, or None for a weight (DQ of an initializer) or a plain input."""
        dequantize = producers.get(name)
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            return None
        quantize = producers.get(dequantize.input[0])
        return quantize.input[0] if quantize is not None and quantize.op_type == "QuantizeLinear" else None

    candidates = []
    for node in quantized.graph.node:
        if node.op_type in QDQ_OPS or not any(
            producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input
        ):
            continue
        outputs = [o for o in node.output if o in reference_values and o in types]
        if not outputs:
            continue
        sources = [s for s in (activation_source(i) or i for i in node.input if i) if s in reference_values and s in types]
        candidates.append((node, outputs, sources))
    watched = sorted({name for _, outputs, sources in candidates for name in (*outputs, *sources)})
    with tempfile.TemporaryDirectory(prefix="trtforge-sensitivity-") as tmp:
        errors = _relative_errors(
            _with_outputs(reference, watched, types), _with_outputs(quantized, watched, types), watched, feeds, Path(tmp)
        )
    ranked = []
    for node, outputs, sources in candidates:
        out_error = max(errors[o] for o in outputs)
        in_error = max((errors[s] for s in sources), default=0.0)
        ranked.append(NodeSensitivity(name=node.name, op_type=node.op_type, output_error=out_error, added_error=out_error - in_error))
    return sorted(ranked, key=lambda n: (-n.added_error, n.name))


def _float_value_types(model) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.value_info, *inferred.graph.output]
    return {v.name: v.type.tensor_type.elem_type for v in values if v.type.tensor_type.elem_type in FLOAT_TYPES}


def _with_outputs(model, names: list[str], types: dict[str, int]):
    import onnx

    marked = onnx.ModelProto()
    marked.CopyFrom(model)
    present = {v.name for v in marked.graph.output}
    marked.graph.output.extend(onnx.helper.make_tensor_value_info(n, types[n], None) for n in names if n not in present)
    return marked


def _relative_errors(reference, quantized, names: list[str], feeds: list[dict[str, np.ndarray]], folder: Path) -> dict[str, float]:
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Basic level: Q/DQ stay as the simulated quantization they describe, not fused into kernels.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sessions = []
    for label, model in (("reference", reference), ("quantized", quantized)):
        path = folder / f"{label}.onnx"
        onnx.save(model, path, save_as_external_data=model.ByteSize() > 1_500_000_000)
        sessions.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
    squared_error = dict.fromkeys(names, 0.0)
    squared_norm = dict.fromkeys(names, 0.0)
    for feed in feeds:
        ref_values, quant_values = (dict(zip(names, s.run(names, feed))) for s in sessions)
        for name in names:
            ref = ref_values[name].astype(np.float64)
            squared_error[name] += float(np.sum((quant_values[name].astype(np.float64) - ref) ** 2))
            squared_norm[name] += float(np.sum(ref**2))
    return {n: float(np.sqrt(squared_error[n] / squared_norm[n])) if squared_norm[n] > 0 else 0.0 for n in names}
