"""What the static check reads off an ONNX graph: constants, tensor types, producers, subgraphs, attributes."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtforge.onnxfacts import constant_value, subgraphs
from trtforge.stages.check_ops.report import DEFAULT_DOMAINS

# Constant values are read only to check small inputs (zero points, K, flags); a larger
# tensor is treated as unknown rather than read from disk.
MAX_CONSTANT_ELEMENTS = 1 << 20


@dataclass
class Scope:
    """What a node can see: constants and tensor types of its graph and of the graphs around it."""

    graph: Any
    prefix: str
    model_dir: Path
    constants: dict[str, Any]
    types: dict[str, Any]
    producers: dict[str, Any]
    network_io: frozenset[str]
    used: frozenset[str]
    local_functions: dict[tuple[str, str], Any] = field(default_factory=dict)

    def child(self, graph, prefix: str) -> Scope:
        scope = Scope(
            graph=graph,
            prefix=prefix,
            model_dir=self.model_dir,
            constants=dict(self.constants),
            types=dict(self.types),
            producers=dict(self.producers),
            network_io=self.network_io,
            used=self.used,
            local_functions=self.local_functions,
        )
        scope.add_graph(graph)
        return scope

    def add_graph(self, graph) -> None:
        from onnx import helper

        for info in list(graph.input) + list(graph.output) + list(graph.value_info):
            if info.type.WhichOneof("value") is not None:
                self.types[info.name] = info.type
        for init in graph.initializer:
            self.constants[init.name] = init
            self.types[init.name] = helper.make_tensor_type_proto(init.data_type, list(init.dims))
        for node in graph.node:
            for output in node.output:
                if output:
                    self.producers[output] = node
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.output:
                tensor = constant_value(node)
                if tensor is not None:
                    self.constants[node.output[0]] = tensor
            # TensorRT's parser passes weights through Identity unchanged, so they stay initializers.
            if node.op_type == "Identity" and node.domain in DEFAULT_DOMAINS and node.input and node.input[0] in self.constants:
                self.constants[node.output[0]] = self.constants[node.input[0]]

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def is_dequantized_constant(self, name: str) -> bool:
        """Whether ``name`` is a DequantizeLinear of a constant, or of a QuantizeLinear of a constant.

        That is how int8/fp8 Q/DQ graphs (ModelOpt's, the convert stage's) give Conv, ConvTranspose,
        Gemm and MatMul their weights: TensorRT reads the pattern as explicit quantization and folds
        it into the layer's quantized weights when it builds the engine.
        """
        dequantize = self.producers.get(name)
        if not _is_default_op(dequantize, "DequantizeLinear") or not dequantize.input:
            return False
        source = dequantize.input[0]
        quantize = self.producers.get(source)
        if _is_default_op(quantize, "QuantizeLinear") and quantize.input:
            source = quantize.input[0]
        return self.is_constant(source)

    def value(self, name: str):
        """The constant's values as numpy, or None when not a constant, too large, or unreadable."""
        from onnx import numpy_helper

        tensor = self.constants.get(name)
        if tensor is None:
            return None
        count = 1
        for dim in tensor.dims:
            count *= dim
        if count > MAX_CONSTANT_ELEMENTS:
            return None
        try:
            return numpy_helper.to_array(tensor, base_dir=str(self.model_dir))
        except Exception:
            return None

    def shape(self, name: str) -> list[int | str | None] | None:
        type_proto = self.types.get(name)
        if type_proto is None or type_proto.WhichOneof("value") != "tensor_type":
            return None
        tensor_type = type_proto.tensor_type
        if not tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]


def _is_default_op(node, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in DEFAULT_DOMAINS


def used_names(graph) -> set[str]:
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(i for i in node.input if i)
        for _, subgraph in subgraphs(node):
            used |= used_names(subgraph)
    return used


def node_name(node) -> str:
    """The name TensorRT gives a node: its own, or ``node_of_<first output>`` when it has none."""
    if node.name:
        return node.name
    return f"node_of_{node.output[0]}" if node.output else node.op_type


class FunctionGraph:
    """A local function seen as a graph: its nodes, no initializers, no declared types."""

    def __init__(self, function):
        self.node = function.node
        self.initializer: list[Any] = []
        self.input: list[Any] = []
        self.output: list[Any] = []
        self.value_info: list[Any] = []


@functools.lru_cache(maxsize=4096)
def schema_of(op_type: str, opset: int, domain: str = ""):
    import onnx.defs

    try:
        return onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return None


def attribute_value(node, name: str, schema) -> Any:
    """The attribute's value, else its schema default, else None; strings decoded."""
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            value = helper.get_attribute_value(attribute)
            break
    else:
        if schema is None or name not in schema.attributes:
            return None
        default = schema.attributes[name].default_value
        value = helper.get_attribute_value(default) if default.type else None
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value


def has_attribute(node, name: str) -> bool:
    return any(a.name == name for a in node.attribute)


def input_of(node, schema, name: str) -> str | None:
    """The tensor feeding the formal input ``name``, or None when the op has no such input or it is left out."""
    if schema is None:
        return None
    names = [i.name for i in schema.inputs]
    if name not in names:
        return None
    index = names.index(name)
    if index >= len(node.input) or not node.input[index]:
        return None
    return node.input[index]
