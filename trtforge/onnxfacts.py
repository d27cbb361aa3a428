"""Facts about an ONNX graph: its element types, the precisions it computes in, its Q/DQ nodes, its op domains.

One implementation of each, so that the precision stage's record, the build's refusal of an
unconverted model, the untrusted-ONNX loader and the check-ops report read a graph the same way.
Everything here reads a ``ModelProto`` already in memory (``trtforge.safeio.load_onnx_safely``
gives one) and never needs its external data.

How precision is read from a graph (TensorRT 10 and 11 build it in the types the ONNX carries):

- int8 / fp8: Q/DQ nodes, by their quantized type: the zero point's type, the Q output's or the
  quantized DQ input's (all known from initializers, ``Constant`` nodes or type inference). A
  Q/DQ node with no zero point uses uint8, so it counts as int8.
- fp16 / bf16: any tensor of that element type (initializers, ``Constant`` nodes, ``Cast``
  targets and every inferred value).

A node "computes at reduced precision" when it reads a DequantizeLinear output (the Q/DQ
pattern TensorRT fuses into a quantized kernel) or produces fp16/bf16/fp8 values; it is "kept at
fp32" when it produces float32. Nodes that carry no arithmetic of their own (Q/DQ, Cast,
Constant, Identity) are neither.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from trtforge.spec import Precision

# The default operator set, by either of its names.
DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
# Specified by ONNX and run by onnxruntime's own kernels: no outside (plugin) code needed.
STANDARD_DOMAINS = DEFAULT_DOMAINS | {"ai.onnx.ml"}
QDQ_OP_TYPES = ("QuantizeLinear", "DequantizeLinear")
BOOKKEEPING_OP_TYPES = (*QDQ_OP_TYPES, "Cast", "Constant", "Identity")
# Shape inference needs the values of small constants only.
LARGE_INITIALIZER_BYTES = 1 << 16

_QUANTIZED_TYPE_NAMES = {
    "INT8": Precision.INT8,
    "UINT8": Precision.INT8,
    "FLOAT8E4M3FN": Precision.FP8,
    "FLOAT8E4M3FNUZ": Precision.FP8,
    "FLOAT8E5M2": Precision.FP8,
    "FLOAT8E5M2FNUZ": Precision.FP8,
}
_HALF_TYPE_NAMES = {"FLOAT16": Precision.FP16, "BFLOAT16": Precision.BF16}
_REDUCED_TYPE_NAMES = ("FLOAT16", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")


# --------------------------------------------------------------------------- nodes and domains


def op_key(domain: str, op_type: str) -> str:
    """How an operator is named in reports: ``Conv``, or ``domain::Op`` outside the default set."""
    return op_type if domain in DEFAULT_DOMAINS else f"{domain}::{op_type}"


def subgraphs(node) -> Iterator[tuple[str, Any]]:
    """The graphs in ``node``'s attributes (If branches, Loop and Scan bodies), with their attribute names."""
    for attribute in node.attribute:
        # By the fields set, not the declared attribute type: a forged file may declare one and
        # fill the other, and what reads the graph later goes by the fields.
        if attribute.HasField("g"):
            yield attribute.name, attribute.g
        for index, graph in enumerate(attribute.graphs):
            yield f"{attribute.name}[{index}]", graph


def all_nodes(model) -> Iterator[tuple[Any, str]]:
    """Every node of the model, subgraphs, local functions and training graphs included, with where it sits."""
    yield from _graph_nodes(model.graph, "the main graph")
    for function in model.functions:
        yield from _graph_nodes(function, f"function {function.domain}::{function.name}")
    for index, training in enumerate(model.training_info):
        yield from _graph_nodes(training.initialization, f"training_info[{index}].initialization")
        yield from _graph_nodes(training.algorithm, f"training_info[{index}].algorithm")


def _graph_nodes(graph, where: str) -> Iterator[tuple[Any, str]]:
    for node in graph.node:
        yield node, where
        for name, subgraph in subgraphs(node):
            yield from _graph_nodes(subgraph, f"subgraph {name!r} of node {node.name or node.op_type!r}")


def op_domains(model) -> dict[str, int]:
    """Node count per op domain (``""`` for the default set), over every node of the model."""
    return dict(sorted(Counter(node.domain or "" for node, _ in all_nodes(model)).items()))


def imported_domains(model) -> set[str]:
    """The op domains the model and its local functions import (their ``opset_import``)."""
    imports = [*model.opset_import, *(entry for function in model.functions for entry in function.opset_import)]
    return {entry.domain for entry in imports}


def default_opset(model) -> int | None:
    """The version of the default operator set the model imports, or None when it imports none."""
    return next((entry.version for entry in model.opset_import if entry.domain in DEFAULT_DOMAINS), None)


def constant_value(node):
    """The value of a ``Constant`` node as a TensorProto, or None for the attributes that are not tensors."""
    from onnx import TensorProto, helper

    for attribute in node.attribute:
        if attribute.name == "value":
            return attribute.t
        if attribute.name in ("value_float", "value_floats", "value_int", "value_ints"):
            value = helper.get_attribute_value(attribute)
            is_float = attribute.name.startswith("value_float")
            dims = [] if attribute.name in ("value_float", "value_int") else [len(value)]
            values = value if isinstance(value, list) else [value]
            return helper.make_tensor(node.output[0], TensorProto.FLOAT if is_float else TensorProto.INT64, dims, values)
    return None


# --------------------------------------------------------------------------- element types


def infer_types(model) -> tuple[Any, str | None]:
    """The model with inferred value types, and a note when inference failed (the declared types are all there is)."""
    import onnx

    # Handing shape inference hundreds of MB of weights costs seconds of copying, so large
    # initializers go in as data-less placeholders.
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for tensor in light.graph.initializer:
        if len(tensor.raw_data) > LARGE_INITIALIZER_BYTES:
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            placeholder = tensor.external_data.add()
            placeholder.key, placeholder.value = "location", "(not read for shape inference)"
    try:
        return onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True), None
    except Exception as err:  # onnx's inference raises its own errors, or RuntimeError, depending on the op
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return model, f"shape inference failed ({first}); element types and ranks come only from what the model declares"


def element_types(model, typed=None) -> dict[str, int]:
    """Element type (a ``TensorProto.DataType``) by tensor name, for the main graph's tensors.

    From the declared and inferred value types of ``typed`` (``infer_types(model)[0]``; inferred
    here when not given), the initializers, ``Constant`` nodes and ``Cast`` targets.
    """
    if typed is None:
        typed, _ = infer_types(model)
    types: dict[str, int] = {}
    for value in (*typed.graph.input, *typed.graph.output, *typed.graph.value_info):
        if value.type.WhichOneof("value") == "tensor_type" and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for initializer in model.graph.initializer:
        types[initializer.name] = initializer.data_type
    for node in model.graph.node:
        if node.domain not in DEFAULT_DOMAINS or not node.output:
            continue
        if node.op_type == "Constant":
            value = constant_value(node)
            if value is not None:
                types[node.output[0]] = value.data_type
        elif node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to:
                types[node.output[0]] = to
    return types


def _type_name(elem_type: int | None) -> str | None:
    from onnx import TensorProto

    if elem_type is None or elem_type not in TensorProto.DataType.values():
        return None
    return TensorProto.DataType.Name(elem_type)


# --------------------------------------------------------------------------- precision


def qdq_node_count(model) -> int:
    """QuantizeLinear and DequantizeLinear nodes in the main graph (onnxruntime's com.microsoft ones included)."""
    return sum(1 for node in model.graph.node if node.op_type in QDQ_OP_TYPES)


@dataclass(frozen=True)
class PrecisionFacts:
    """What precisions a graph computes in (see the module docstring for how each is read).

    ``precisions`` holds the reduced precisions present (never FP32); ``reduced_op_types`` and
    ``fp32_op_types`` count nodes per op type computing at reduced precision or kept at fp32.
    """

    precisions: frozenset[Precision]
    qdq_nodes: int
    reduced_op_types: dict[str, int]
    fp32_op_types: dict[str, int]

    @property
    def quantized(self) -> list[Precision]:
        """The Q/DQ precisions present (int8, fp8), sorted by name."""
        return sorted((p for p in self.precisions if p.needs_calibration), key=lambda p: p.value)


def precision_facts(model, typed=None) -> PrecisionFacts:
    """The precision facts of ``model``'s main graph; ``typed`` as for ``element_types``."""
    names = {tensor: _type_name(elem) for tensor, elem in element_types(model, typed).items()}
    found: set[Precision] = {_HALF_TYPE_NAMES[name] for name in names.values() if name in _HALF_TYPE_NAMES}
    dequantized = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    reduced: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    for node in model.graph.node:
        if node.op_type in QDQ_OP_TYPES:
            # Q: (x, scale, zero point) -> y; DQ: (x, scale, zero point) -> y. The quantized side
            # is Q's zero point and output, DQ's zero point and input.
            quantized_side = [*node.input[2:], *(node.output if node.op_type == "QuantizeLinear" else node.input[:1])]
            kinds = {_QUANTIZED_TYPE_NAMES[names[t]] for t in quantized_side if names.get(t) in _QUANTIZED_TYPE_NAMES}
            # Without a zero point, Q/DQ default to uint8.
            found |= kinds or {Precision.INT8}
            continue
        if node.op_type in BOOKKEEPING_OP_TYPES:
            continue
        output_types = {names.get(name) for name in node.output}
        if dequantized.intersection(node.input) or output_types.intersection(_REDUCED_TYPE_NAMES):
            reduced[node.op_type] += 1
        elif "FLOAT" in output_types:
            kept[node.op_type] += 1
    return PrecisionFacts(
        precisions=frozenset(found),
        qdq_nodes=qdq_node_count(model),
        reduced_op_types=dict(sorted(reduced.items())),
        fp32_op_types=dict(sorted(kept.items())),
    )
