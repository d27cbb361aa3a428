"""ONNX facts read from real graphs built with onnx.helper: precisions, Q/DQ nodes, element types, domains."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtforge.onnxfacts import (
    all_nodes,
    default_opset,
    element_types,
    imported_domains,
    infer_types,
    op_domains,
    op_key,
    precision_facts,
    qdq_node_count,
)
from trtforge.spec import Precision

SHAPE = ["batch", 4]


def _model(nodes, initializers=(), opsets=(("", 19),), functions=()):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)],
        initializer=list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], functions=list(functions))
    model.ir_version = 10
    return model


def _qdq(zero_point_type: int | None):
    """x -> Q -> DQ -> Relu -> Add(x): the Relu reads a dequantized tensor, the Add computes in fp32."""
    initializers = [numpy_helper.from_array(np.array(0.1, np.float32), "scale")]
    inputs = ["x", "scale"]
    if zero_point_type is not None:
        initializers.append(helper.make_tensor("zero", zero_point_type, [], [0]))
        inputs.append("zero")
    nodes = [
        helper.make_node("QuantizeLinear", inputs, ["q"]),
        helper.make_node("DequantizeLinear", ["q", *inputs[1:]], ["dq"]),
        helper.make_node("Relu", ["dq"], ["relu"]),
        helper.make_node("Add", ["relu", "x"], ["y"]),
    ]
    return _model(nodes, initializers)


def _half(half_type: int):
    nodes = [
        helper.make_node("Cast", ["x"], ["half"], to=half_type),
        helper.make_node("Relu", ["half"], ["relu"]),
        helper.make_node("Cast", ["relu"], ["y"], to=TensorProto.FLOAT),
    ]
    return _model(nodes)


@pytest.mark.parametrize(
    ("zero_point_type", "precision"),
    [
        (TensorProto.INT8, Precision.INT8),
        (TensorProto.UINT8, Precision.INT8),
        (TensorProto.FLOAT8E4M3FN, Precision.FP8),
        (None, Precision.INT8),
    ],
)
def test_qdq_precision_comes_from_the_quantized_type_or_defaults_to_int8(zero_point_type, precision):
    facts = precision_facts(_qdq(zero_point_type))
    assert facts.precisions == {precision}
    assert facts.quantized == [precision]
    assert facts.qdq_nodes == 2
    assert facts.reduced_op_types == {"Relu": 1}
    assert facts.fp32_op_types == {"Add": 1}


@pytest.mark.parametrize(("half_type", "precision"), [(TensorProto.FLOAT16, Precision.FP16), (TensorProto.BFLOAT16, Precision.BF16)])
def test_half_precision_comes_from_the_tensor_types(half_type, precision):
    facts = precision_facts(_half(half_type))
    assert facts.precisions == {precision}
    assert facts.quantized == []
    assert (facts.qdq_nodes, facts.reduced_op_types, facts.fp32_op_types) == (0, {"Relu": 1}, {})


def test_an_fp32_graph_has_no_reduced_precision():
    facts = precision_facts(_model([helper.make_node("Relu", ["x"], ["y"])]))
    assert facts.precisions == frozenset()
    assert facts.fp32_op_types == {"Relu": 1}


def test_a_half_constant_counts_without_type_inference():
    value = numpy_helper.from_array(np.ones(4, np.float16), "c")
    nodes = [helper.make_node("Constant", [], ["c"], value=value), helper.make_node("Relu", ["x"], ["y"])]
    model = _model(nodes)
    assert element_types(model, typed=model)["c"] == TensorProto.FLOAT16
    assert precision_facts(model, typed=model).precisions == {Precision.FP16}


def test_element_types_come_from_inference_initializers_and_casts():
    types = element_types(_qdq(TensorProto.INT8))
    assert types["zero"] == TensorProto.INT8
    assert types["q"] == TensorProto.INT8
    assert types["dq"] == TensorProto.FLOAT
    assert types["y"] == TensorProto.FLOAT


def test_type_inference_leaves_large_weights_out_of_its_copy_and_the_model_untouched():
    weights = numpy_helper.from_array(np.ones((4, 8192), np.float32), "w")
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [weights])
    typed, note = infer_types(model)
    assert note is None
    assert len(model.graph.initializer[0].raw_data) == 4 * 8192 * 4
    assert not typed.graph.initializer[0].raw_data


def test_domains_and_nodes_include_subgraphs_and_functions():
    branch = helper.make_graph(
        [helper.make_node("Plugged", ["x"], ["b"], domain="vendor.ops")],
        "then",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, SHAPE)],
    )
    function = helper.make_function("local", "Twice", ["a"], ["o"], [helper.make_node("Relu", ["a"], ["o"])], [helper.make_opsetid("", 19)])
    nodes = [
        helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
        helper.make_node("If", ["cond"], ["b"], then_branch=branch, else_branch=branch),
        helper.make_node("Twice", ["b"], ["y"], domain="local"),
    ]
    model = _model(nodes, opsets=(("", 19), ("vendor.ops", 1), ("local", 1)), functions=[function])
    assert op_domains(model) == {"": 3, "local": 1, "vendor.ops": 2}
    wheres = {where for node, where in all_nodes(model) if node.op_type == "Plugged"}
    assert wheres == {"subgraph 'then_branch' of node 'If'", "subgraph 'else_branch' of node 'If'"}
    assert imported_domains(model) == {"", "vendor.ops", "local"}
    assert default_opset(model) == 19
    assert qdq_node_count(model) == 0
    assert (op_key("", "Conv"), op_key("ai.onnx", "Conv"), op_key("vendor.ops", "Plugged")) == ("Conv", "Conv", "vendor.ops::Plugged")


def test_a_subgraph_hidden_behind_a_wrong_attribute_type_is_still_walked():
    branch = helper.make_graph([helper.make_node("Plugged", [], ["b"], domain="vendor.ops")], "hidden", [], [])
    node = helper.make_node("Relu", ["x"], ["y"])
    attribute = node.attribute.add()
    attribute.name, attribute.type = "hidden", onnx.AttributeProto.FLOAT
    attribute.g.CopyFrom(branch)
    assert "vendor.ops" in op_domains(_model([node]))
