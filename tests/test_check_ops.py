"""The check-ops stage on real ONNX graphs: one built with onnx.helper per case, and exported models."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from tests.conftest import REPO
from trtforge.cli import app
from trtforge.errors import CompatibilityError, StageError
from trtforge.safeio import OnnxModelError
from trtforge.stages.check_ops import (
    ParserError,
    analyse,
    check_ops,
    load_table,
    merge_parser_result,
    static_check,
    table_version_for,
)
from trtforge.stages.check_ops import parser as parser_module
from trtforge.stages.check_ops.graph import node_name

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64


def tensor(name, elem_type, shape):
    return helper.make_tensor_value_info(name, elem_type, shape)


def initializer(name, values, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def save_model(path: Path, nodes, inputs, outputs, initializers=(), opset=18, domains=(), functions=()) -> Path:
    graph = helper.make_graph(nodes, "case", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def by_name(report, name):
    matches = [n for n in report.nodes if n.name == name]
    assert len(matches) == 1, f"no single node {name!r} in {[n.name for n in report.nodes]}"
    return matches[0]


def static(path: Path, **kwargs):
    return check_ops(path, use_tensorrt=False, **kwargs)


# --------------------------------------------------------------------------- operators and domains


def test_unsupported_op_is_named_with_reason_and_fix(tmp_path):
    path = save_model(
        tmp_path / "unique.onnx",
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Unique", ["r"], ["y"], name="dedupe")],
        [tensor("x", FLOAT, [8])],
        [tensor("y", FLOAT, [None])],
    )
    report = static(path)
    assert report.source == "static-table" and report.tensorrt_version == "10.1"
    assert not report.ok
    dedupe = by_name(report, "dedupe")
    assert dedupe.status == "unsupported"
    assert "does not support Unique" in dedupe.reason
    assert "plugin" in dedupe.fix and "--plugin Unique" in dedupe.fix
    assert by_name(report, "relu").status == "supported"
    assert [n.name for n in report.unsupported] == ["dedupe"]
    assert report.summary.by_op_type["Unique"].unsupported == 1
    assert report.summary.by_op_type["Relu"].supported == 1
    assert report.summary_rows() == [{"op_type": "Unique", "count": 1, "supported": 0, "conditional": 0, "unsupported": 1}]
    assert any("static check can miss restrictions only TensorRT's parser sees" in note for note in report.notes)


def custom_op_model(tmp_path) -> Path:
    return save_model(
        tmp_path / "custom.onnx",
        [helper.make_node("FancyNorm", ["x"], ["y"], name="fancy", domain="com.example")],
        [tensor("x", FLOAT, [1, 4])],
        [tensor("y", FLOAT, [1, 4])],
        domains=["com.example"],
    )


def test_custom_domain_op_is_unsupported_without_a_plugin(tmp_path):
    report = static(custom_op_model(tmp_path))
    fancy = by_name(report, "fancy")
    assert fancy.status == "unsupported" and fancy.domain == "com.example"
    assert "domain 'com.example'" in fancy.reason
    assert "--plugin com.example" in fancy.fix
    assert "com.example::FancyNorm" in report.summary.by_op_type


@pytest.mark.parametrize("declared", ["com.example", "FancyNorm"])
def test_custom_domain_op_is_accepted_when_declared_as_a_plugin(tmp_path, declared):
    report = static(custom_op_model(tmp_path), plugins=[declared])
    fancy = by_name(report, "fancy")
    assert report.ok and fancy.status == "supported"
    assert "declared TensorRT plugin" in fancy.reason


def test_opset_outside_the_table_range_names_the_nodes_whose_definition_changed(tmp_path):
    # Reshape has a version-21 definition; Relu has not changed since opset 14.
    path = save_model(
        tmp_path / "opset21.onnx",
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Reshape", ["r", "shape"], ["y"], name="flatten"),
        ],
        [tensor("x", FLOAT, [2, 3])],
        [tensor("y", FLOAT, [6])],
        [initializer("shape", [6], np.int64)],
        opset=21,
    )
    report = static(path)
    flatten = by_name(report, "flatten")
    assert flatten.status == "unsupported"
    assert "opset 21 gives Reshape its version-21 definition" in flatten.reason
    assert "covers opsets 9-20" in flatten.reason
    assert "export with opset 20 or lower" in flatten.fix
    assert by_name(report, "relu").status == "supported"
    assert any("opset 21 is outside" in note for note in report.notes)


# --------------------------------------------------------------------------- inputs that must be initializers


def conv_model(tmp_path, weight_shape) -> Path:
    return save_model(
        tmp_path / "conv.onnx",
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3])],
        [tensor("x", FLOAT, [1, 2, 8, 8]), tensor("w", FLOAT, weight_shape)],
        [tensor("y", FLOAT, [1, "out_channels", 6, 6])],
    )


def test_conv_weights_from_a_graph_input_with_a_dynamic_shape_are_unsupported(tmp_path):
    conv = by_name(static(conv_model(tmp_path, ["out_channels", 2, 3, 3])), "conv")
    assert conv.status == "unsupported"
    assert "weights 'W' come from tensor 'w'" in conv.reason and "not static" in conv.reason
    assert "initializer" in conv.fix


def test_conv_weights_from_a_graph_input_with_a_static_shape_are_conditional(tmp_path):
    conv = by_name(static(conv_model(tmp_path, [4, 2, 3, 3])), "conv")
    assert conv.status == "conditional"
    assert "not an initializer" in conv.reason


def test_conv_with_initializer_weights_is_supported(tmp_path):
    path = save_model(
        tmp_path / "conv.onnx",
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3])],
        [tensor("x", FLOAT, [1, 2, 8, 8])],
        [tensor("y", FLOAT, [1, 4, 6, 6])],
        [initializer("w", np.zeros((4, 2, 3, 3)))],
    )
    assert by_name(static(path), "conv").status == "supported"


def slice_model(tmp_path, axes_from: str) -> Path:
    nodes, inputs, inits = (
        [],
        [tensor("x", FLOAT, [4, 6])],
        [initializer("starts", [1], np.int64), initializer("ends", [3], np.int64)],
    )
    if axes_from == "graph input":
        inputs.append(tensor("axes", INT64, [1]))
    elif axes_from == "Constant node":
        nodes.append(helper.make_node("Constant", [], ["axes"], name="axes_const", value=initializer("v", [1], np.int64)))
    else:
        inits.append(initializer("axes_init", [1], np.int64))
        nodes.append(helper.make_node("Identity", ["axes_init"], ["axes"], name="axes_identity"))
    nodes.append(helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"], name="slice"))
    return save_model(tmp_path / "slice.onnx", nodes, inputs, [tensor("y", FLOAT, [2, 6])], inits)


def test_slice_axes_that_are_not_an_initializer_are_unsupported(tmp_path):
    node = by_name(static(slice_model(tmp_path, "graph input")), "slice")
    assert node.status == "unsupported"
    assert "input 'axes' (tensor 'axes') must be an initializer" in node.reason
    assert "fold" in node.fix


@pytest.mark.parametrize("axes_from", ["Constant node", "Identity of an initializer"])
def test_slice_axes_from_constants_the_parser_folds_are_supported(tmp_path, axes_from):
    report = static(slice_model(tmp_path, axes_from))
    assert report.ok and by_name(report, "slice").status == "supported", report.format_table()


def topk_model(tmp_path, k_from: str, sorted_flag: int = 1) -> Path:
    inputs, inits = [tensor("x", FLOAT, [2, 5000])], []
    if k_from == "graph input":
        inputs.append(tensor("k", INT64, [1]))
    else:
        inits.append(initializer("k", [int(k_from)], np.int64))
    return save_model(
        tmp_path / "topk.onnx",
        [helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk", sorted=sorted_flag)],
        inputs,
        [tensor("values", FLOAT, [2, "k"]), tensor("indices", INT64, [2, "k"])],
        inits,
    )


def test_topk_with_k_from_a_tensor_is_conditional(tmp_path):
    topk = by_name(static(topk_model(tmp_path, "graph input")), "topk")
    assert topk.status == "conditional"
    assert "input 'K' comes from tensor 'k'" in topk.reason and "K < 3840" in topk.reason


def test_topk_limits_from_the_table(tmp_path):
    too_many = by_name(static(topk_model(tmp_path, "5000")), "topk")
    assert too_many.status == "unsupported" and "K=5000" in too_many.reason
    unsorted = by_name(static(topk_model(tmp_path, "10", sorted_flag=0)), "topk")
    assert unsorted.status == "unsupported" and "sorted=0" in unsorted.reason
    assert by_name(static(topk_model(tmp_path, "10")), "topk").status == "supported"


# --------------------------------------------------------------------------- attributes, outputs, subgraphs


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({"mode": "linear", "antialias": 1}, "antialias=1"),
        ({"mode": "cubic"}, "mode='cubic'"),
    ],
)
def test_resize_attributes_outside_the_table_are_unsupported(tmp_path, attributes, expected):
    path = save_model(
        tmp_path / "resize.onnx",
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize", **attributes)],
        [tensor("x", FLOAT, [1, 3, 8, 8])],
        [tensor("y", FLOAT, [1, 3, 16, 16])],
        [initializer("scales", [1, 1, 2, 2])],
    )
    resize = by_name(static(path), "resize")
    assert resize.status == "unsupported"
    assert expected in resize.reason
    assert "interpolate" in resize.fix or "resize with" in resize.fix


def test_maxpool_whose_indices_are_used_is_unsupported(tmp_path):
    path = save_model(
        tmp_path / "pool.onnx",
        [helper.make_node("MaxPool", ["x"], ["y", "where"], name="pool", kernel_shape=[2, 2])],
        [tensor("x", FLOAT, [1, 1, 4, 4])],
        [tensor("y", FLOAT, [1, 1, 3, 3]), tensor("where", INT64, [1, 1, 3, 3])],
    )
    pool = by_name(static(path), "pool")
    assert pool.status == "unsupported"
    assert "output 'Indices' (tensor 'where') is used" in pool.reason


def test_loop_restrictions_the_table_cannot_verify_make_it_conditional(tmp_path):
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"], name="increment"),
        ],
        "body",
        [tensor("iteration", INT64, []), tensor("cond_in", TensorProto.BOOL, []), tensor("acc_in", FLOAT, [1])],
        [tensor("cond_out", TensorProto.BOOL, []), tensor("acc_out", FLOAT, [1])],
    )
    path = save_model(
        tmp_path / "loop.onnx",
        [helper.make_node("Loop", ["trips", "", "start"], ["total"], name="loop", body=body)],
        [tensor("start", FLOAT, [1])],
        [tensor("total", FLOAT, [1])],
        [initializer("trips", 3, np.int64), initializer("one", [1.0])],
    )
    report = static(path)
    loop = by_name(report, "loop")
    assert loop.status == "conditional"
    assert "Scan output length cannot be dynamic" in loop.reason and "cannot verify" in loop.reason
    assert by_name(report, "loop/body/increment").status == "supported"
    assert report.ok


def test_node_inside_a_local_function_is_reported_at_the_call(tmp_path):
    function = helper.make_function(
        "com.example.functions",
        "Dedupe",
        ["x"],
        ["y"],
        [helper.make_node("Unique", ["x"], ["y"], name="inner_unique")],
        [helper.make_opsetid("", 18)],
    )
    path = save_model(
        tmp_path / "function.onnx",
        [helper.make_node("Dedupe", ["x"], ["y"], name="call", domain="com.example.functions")],
        [tensor("x", FLOAT, [8])],
        [tensor("y", FLOAT, ["unique"])],
        domains=["com.example.functions"],
        functions=[function],
    )
    call = by_name(static(path), "call")
    assert call.status == "unsupported"
    assert "in local function Dedupe, node inner_unique" in call.reason and "Unique" in call.reason


# --------------------------------------------------------------------------- element types


def test_sequence_typed_tensor_is_unsupported(tmp_path):
    sequence = helper.make_tensor_sequence_value_info
    path = save_model(
        tmp_path / "sequence.onnx",
        [helper.make_node("Identity", ["items"], ["same"], name="pass_list")],
        [sequence("items", FLOAT, [2])],
        [sequence("same", FLOAT, [2])],
    )
    node = by_name(static(path), "pass_list")
    assert node.status == "unsupported"
    assert "input 'items' is a sequence of tensors" in node.reason
    assert "torch.stack" in node.fix


def test_element_types_tensorrt_does_not_take(tmp_path):
    path = save_model(
        tmp_path / "types.onnx",
        [
            helper.make_node("Cast", ["x"], ["as_text"], name="to_string", to=TensorProto.STRING),
            helper.make_node("Cast", ["x"], ["as_double"], name="to_double", to=TensorProto.DOUBLE),
            helper.make_node("MatMul", ["ints", "ints_t"], ["product"], name="int_matmul"),
        ],
        [
            tensor("x", FLOAT, [2]),
            tensor("ints", TensorProto.INT32, [2, 2]),
            tensor("ints_t", TensorProto.INT32, [2, 2]),
        ],
        [
            tensor("as_text", TensorProto.STRING, [2]),
            tensor("as_double", TensorProto.DOUBLE, [2]),
            tensor("product", TensorProto.INT32, [2, 2]),
        ],
    )
    report = static(path)
    text = by_name(report, "to_string")
    assert text.status == "unsupported" and "element type STRING" in text.reason
    double = by_name(report, "to_double")
    assert double.status == "conditional" and "casts it to FLOAT" in double.reason
    matmul = by_name(report, "int_matmul")
    assert matmul.status == "conditional" and "lists MatMul for FP32, FP16, BF16 only" in matmul.reason


def qdq_model(tmp_path, zero_point: str, elem_type=TensorProto.INT8) -> Path:
    inputs, inits = [tensor("x", FLOAT, [1, 4])], [initializer("scale", 0.1)]
    dtype = np.int8 if elem_type == TensorProto.INT8 else np.uint8
    if zero_point == "graph input":
        inputs.append(tensor("zp", elem_type, []))
    else:
        inits.append(initializer("zp", int(zero_point), dtype))
    return save_model(
        tmp_path / "qdq.onnx",
        [
            helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], name="quantize"),
            helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], name="dequantize"),
        ],
        inputs,
        [tensor("y", FLOAT, [1, 4])],
        inits,
    )


def test_qdq_with_a_non_zero_zero_point_is_unsupported(tmp_path):
    report = static(qdq_model(tmp_path, "3"))
    for name in ("quantize", "dequantize"):
        node = by_name(report, name)
        assert node.status == "unsupported"
        assert "holds non-zero values (e.g. 3)" in node.reason
        assert "symmetric" in node.fix


def test_qdq_with_a_zero_point_from_a_tensor_is_conditional(tmp_path):
    node = by_name(static(qdq_model(tmp_path, "graph input")), "quantize")
    assert node.status == "conditional"
    assert "zero point 'y_zero_point' comes from tensor 'zp'" in node.reason


def test_symmetric_int8_qdq_is_supported(tmp_path):
    report = static(qdq_model(tmp_path, "0"))
    assert report.ok and report.summary.conditional == 0, report.format_table()


def test_uint8_qdq_inside_the_network_is_unsupported(tmp_path):
    node = by_name(static(qdq_model(tmp_path, "0", TensorProto.UINT8)), "dequantize")
    assert node.status == "unsupported"
    assert "is UINT8 inside the network" in node.reason


def qdq_conv_model(tmp_path, weights_from: str) -> Path:
    """Conv whose weights come through DequantizeLinear: of an int8 initializer, of a Q of an fp32 one, or of a graph input."""
    inputs = [tensor("x", FLOAT, [1, 2, 8, 8])]
    inits = [initializer("scale", 0.02), initializer("zp", 0, np.int8), initializer("bias", np.zeros(4))]
    nodes = []
    if weights_from == "int8 initializer":
        inits.append(initializer("w_q", np.ones((4, 2, 3, 3)), np.int8))
    elif weights_from == "quantized initializer":
        inits.append(initializer("w", np.full((4, 2, 3, 3), 0.1)))
        nodes.append(helper.make_node("QuantizeLinear", ["w", "scale", "zp"], ["w_q"], name="quantize_w"))
    else:
        inputs.append(tensor("w_q", TensorProto.INT8, [4, 2, 3, 3]))
    nodes += [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["x_q"], name="quantize_x"),
        helper.make_node("DequantizeLinear", ["x_q", "scale", "zp"], ["x_dq"], name="dequantize_x"),
        helper.make_node("DequantizeLinear", ["w_q", "scale", "zp"], ["w_dq"], name="dequantize_w"),
        helper.make_node("Conv", ["x_dq", "w_dq", "bias"], ["y"], name="conv", kernel_shape=[3, 3]),
    ]
    return save_model(tmp_path / "qdq_conv.onnx", nodes, inputs, [tensor("y", FLOAT, [1, 4, 6, 6])], inits)


@pytest.mark.parametrize("weights_from", ["int8 initializer", "quantized initializer"])
def test_conv_with_dequantized_constant_weights_is_the_int8_pattern_not_a_finding(tmp_path, weights_from):
    report = static(qdq_conv_model(tmp_path, weights_from))
    assert report.ok and report.summary.conditional == 0, report.format_table()


def test_conv_with_dequantized_runtime_weights_never_advises_folding_the_dequantize(tmp_path):
    conv = by_name(static(qdq_conv_model(tmp_path, "graph input")), "conv")
    assert conv.status == "conditional" and "not an initializer" in conv.reason
    assert "keep the DequantizeLinear" in conv.fix and "fold" not in conv.fix


# --------------------------------------------------------------------------- files


def test_missing_malformed_empty_and_truncated_files_give_clear_errors(tmp_path):
    with pytest.raises(StageError, match=r"check-ops: ONNX model .*absent.onnx does not exist"):
        check_ops(tmp_path / "absent.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(OnnxModelError, match=r"^check-ops: ONNX model .*garbage.onnx cannot be parsed .*truncated or not an .onnx file"):
        check_ops(garbage)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(OnnxModelError, match=r"^check-ops: ONNX model .*empty.onnx holds no model"):
        check_ops(empty)
    whole = save_model(
        tmp_path / "whole.onnx",
        [helper.make_node("Add", ["x", "bias"], ["y"], name="add")],
        [tensor("x", FLOAT, [4096])],
        [tensor("y", FLOAT, [4096])],
        [initializer("bias", np.arange(4096))],
    )
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(OnnxModelError, match=r"^check-ops: ONNX model .*truncated.onnx cannot be parsed"):
        check_ops(truncated)


def external_model(folder: Path, zero_point: int) -> Path:
    """A Q/DQ model whose initializers, zero point included, live in an external data file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = qdq_model(folder, str(zero_point))
    model = onnx.load(str(path))
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    return path


def test_external_data_values_are_read_from_the_models_folder(tmp_path):
    path = external_model(tmp_path / "model", zero_point=7)
    assert (tmp_path / "model" / "weights.bin").is_file()
    node = by_name(static(path), "quantize")
    assert node.status == "unsupported" and "e.g. 7" in node.reason


def relocate_external_data(path: Path, location: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for tensor_proto in model.graph.initializer:
        for entry in tensor_proto.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))


def test_external_data_outside_the_models_folder_is_refused(tmp_path):
    path = external_model(tmp_path / "model", zero_point=0)
    (tmp_path / "model" / "weights.bin").rename(tmp_path / "outside.bin")
    relocate_external_data(path, "../outside.bin")
    with pytest.raises(OnnxModelError, match=r"external data at '../outside.bin', which leaves the model's folder"):
        check_ops(path)


def test_external_data_through_a_symbolic_link_is_refused(tmp_path):
    path = external_model(tmp_path / "model", zero_point=0)
    (tmp_path / "model" / "weights.bin").rename(tmp_path / "elsewhere.bin")
    os.symlink(tmp_path / "elsewhere.bin", tmp_path / "model" / "weights.bin")
    with pytest.raises(OnnxModelError, match=r"weights.bin is a symbolic link"):
        check_ops(path)


def test_custom_domain_nodes_are_reported_but_unsafe_external_data_is_still_refused(tmp_path):
    path = external_model(tmp_path / "model", zero_point=0)
    model = onnx.load(str(path), load_external_data=False)
    model.graph.node.append(helper.make_node("FancyNorm", ["y"], ["z"], name="fancy", domain="com.example"))
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(model, str(path))
    assert by_name(static(path), "fancy").status == "unsupported"
    (tmp_path / "model" / "weights.bin").rename(tmp_path / "elsewhere.bin")
    os.symlink(tmp_path / "elsewhere.bin", tmp_path / "model" / "weights.bin")
    with pytest.raises(OnnxModelError, match=r"weights.bin is a symbolic link"):
        static(path)


# --------------------------------------------------------------------------- tables, versions, failures


def run_table_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "tensorrt_ops_table.py"), *args], capture_output=True, text=True)


def test_data_files_are_what_the_generator_writes_from_the_published_tables():
    source = REPO / "trtforge" / "data" / "tensorrt-10.1-onnx-operator-support.md"
    result = run_table_tool(str(source), "--tensorrt-version", "10.1", "--check")
    assert result.returncode == 0, result.stderr
    every = run_table_tool("--check")
    assert every.returncode == 0, every.stderr
    data = json.loads((REPO / "trtforge" / "data" / "tensorrt_onnx_ops_10.1.json").read_text())
    assert data["tensorrt_version"] == "10.1" and (data["opset_min"], data["opset_max"]) == (9, 20)
    assert data["operators"]["Unique"]["supported"] is False
    assert {"kind": "initializer_input", "input": "axes"} in [r["check"] for r in data["operators"]["Slice"]["restrictions"]]


def test_generator_refuses_a_document_of_another_major_version(tmp_path):
    source = REPO / "trtforge" / "data" / "tensorrt-10.1-onnx-operator-support.md"
    result = run_table_tool(str(source), "--tensorrt-version", "11.0", "--output", str(tmp_path / "table.json"))
    assert result.returncode != 0 and "says 'TensorRT 10.0', not TensorRT 11.0's major version" in result.stderr
    assert not (tmp_path / "table.json").exists()


def test_a_table_with_a_check_kind_without_a_rule_is_refused(tmp_path):
    table, _ = load_table("10.1")
    slice_entry = table.operators["Slice"]
    unknown = {**slice_entry, "restrictions": [{"text": "`axes` must be sorted", "check": {"kind": "sorted_axes"}}]}
    edited = dataclasses.replace(table, operators={**table.operators, "Slice": unknown})
    with pytest.raises(StageError, match=r"Slice's restriction '`axes` must be sorted' has check kind 'sorted_axes'.*rules.py"):
        static_check(onnx.load(str(custom_op_model(tmp_path))), tmp_path, edited, plugins=[])


def test_table_versions(tmp_path):
    exact, note = load_table("10.1.0")
    assert exact.tensorrt_version == "10.1" and note is None
    later_minor, note = load_table("10.8")
    assert later_minor.tensorrt_version == "10.1" and "newest of TensorRT 10" in note and "reported unsupported" in note
    earlier_minor, note = load_table("10.0.1")
    assert earlier_minor.tensorrt_version == "10.1" and "added after 10.0.1 are reported supported" in note
    for other_major in ("11.4", "8.6"):
        with pytest.raises(StageError, match=rf"no operator table for TensorRT {other_major[:-2]}.x .*tables for 10.1"):
            load_table(other_major)
    with pytest.raises(StageError, match=r"no operator table for TensorRT 11.x"):
        static(custom_op_model(tmp_path), tensorrt_version="11.4")


def test_the_newest_table_of_the_same_major_version_answers():
    versions = ["10.1", "10.8", "11.1", "11.3"]
    assert table_version_for(None, versions) == ("11.3", None)
    assert table_version_for("11.1.0.5", versions) == ("11.1", None)
    chosen, note = table_version_for("11.4", versions)
    assert chosen == "11.3" and "reported unsupported" in note
    chosen, note = table_version_for("10.5", versions)
    assert chosen == "10.8" and "added after 10.5 are reported supported" in note
    with pytest.raises(StageError, match=r"no operator table for TensorRT 12.x"):
        table_version_for("12.0", versions)
    with pytest.raises(StageError, match=r"'eleven' is not a version like 10.1"):
        table_version_for("eleven", versions)


def test_raise_if_unsupported_lists_each_node_with_reason_and_fix(tmp_path):
    report = static(custom_op_model(tmp_path))
    with pytest.raises(CompatibilityError, match=r"(?s)fancy \[com.example::FancyNorm\]: .*domain 'com.example'.*fix: "):
        report.raise_if_unsupported()
    assert json.loads(report.model_dump_json())["summary"]["unsupported"] == 1


def test_merge_puts_parser_errors_on_nodes_and_keeps_static_verdicts_after_the_first_error(tmp_path):
    path = save_model(
        tmp_path / "chain.onnx",
        [
            helper.make_node("Relu", ["x"], ["a"], name="first"),
            helper.make_node("FancyNorm", ["a"], ["b"], name="fancy", domain="com.example"),
            helper.make_node("Unique", ["b"], ["c"], name="dedupe"),
            helper.make_node("Relu", ["c"], ["y"], name="last"),
        ],
        [tensor("x", FLOAT, [4])],
        [tensor("y", FLOAT, ["unique"])],
        domains=["com.example"],
    )
    table, _ = load_table("10.1")
    result = static_check(onnx.load(str(path)), tmp_path, table, plugins=[])
    errors = [
        ParserError(node_index=1, node_name="", op_type="FancyNorm", message="no importer for FancyNorm"),
        ParserError(node_index=-1, node_name="", op_type="", message="input x has an unsupported type"),
    ]
    merged, notes = merge_parser_result(result, parsed=False, errors=errors, plugins=[])
    verdicts = {n.name: n for n in merged}
    assert verdicts["first"].status == "supported"
    assert verdicts["fancy"].status == "unsupported" and verdicts["fancy"].reason == "TensorRT's parser: no importer for FancyNorm"
    # The parser static-checks every node, so Unique's static verdict stands beside its passing the parser's checks.
    assert verdicts["dedupe"].status == "unsupported" and "passed TensorRT's static checks" in verdicts["dedupe"].reason
    assert "import is not confirmed" in verdicts["last"].reason and "first error (at fancy)" in verdicts["last"].reason
    assert verdicts["last"].status == "supported"
    assert verdicts["(model)"].reason == "TensorRT's parser: input x has an unsupported type"
    assert any("static-checked every node but imported only those before its first error (at fancy)" in n for n in notes)
    assert not any("stops at the first" in n.reason for n in merged)

    # Network inputs are imported before any node: an input error first means no node was imported.
    input_first, _ = merge_parser_result(result, parsed=False, errors=errors[::-1], plugins=[])
    verdicts = {n.name: n for n in input_first}
    assert "import is not confirmed" in verdicts["first"].reason and "outside any node" in verdicts["first"].reason
    assert verdicts["fancy"].status == "unsupported"

    as_plugin, _ = merge_parser_result(result, parsed=False, errors=errors[:1], plugins=["com.example"])
    assert {n.name: n for n in as_plugin}["fancy"].status == "conditional"

    clean, _ = merge_parser_result(result, parsed=True, errors=[], plugins=[])
    assert all(n.status == "supported" for n in clean)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_requiring_the_parser_without_tensorrt_fails_clearly(tmp_path):
    with pytest.raises(StageError, match="TensorRT is not installed, so its parser cannot check the model"):
        check_ops(custom_op_model(tmp_path), use_tensorrt=True)


def _gpu_visible() -> bool:
    from trtforge.gpu import detect_gpus

    return detect_gpus().available


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None or _gpu_visible(), reason="needs a machine without TensorRT and GPU")
def test_tensorrt_without_a_gpu_says_the_parser_needs_a_gpu_worker_and_uses_the_table(tmp_path, monkeypatch):
    # Only the installation is pretended: the GPU detection is this machine's, which has none.
    monkeypatch.setattr(parser_module, "tensorrt_importable", lambda: True)
    report = analyse(str(custom_op_model(tmp_path)), [], None, None)
    assert report.source == "static-table"
    assert any(n.startswith("TensorRT's ONNX parser needs a GPU worker") and "static table" in n for n in report.notes)
    with pytest.raises(StageError, match=r"parser needs a GPU worker.*run the check on a GPU worker"):
        analyse(str(custom_op_model(tmp_path)), [], None, True)
    with pytest.raises(StageError, match=r"parser needs a GPU worker.*; and no operator table for TensorRT 11.x"):
        analyse(str(custom_op_model(tmp_path)), [], "11.4", None)


# --------------------------------------------------------------------------- the CLI


def test_cli_exit_codes_and_json(tmp_path):
    runner = CliRunner()
    bad = custom_op_model(tmp_path)
    result = runner.invoke(app, ["check", str(bad), "--json"])
    assert result.exit_code == 1, result.output
    payload = json.loads(result.stdout)
    assert {"source", "tensorrt_version", "summary", "nodes", "notes"} <= set(payload)
    assert payload["summary"]["unsupported"] == 1 and "com.example::FancyNorm" in payload["summary"]["by_op_type"]
    assert {"name", "op_type", "status", "reason", "fix"} <= set(payload["nodes"][0])
    assert payload["nodes"][0]["name"] == "fancy" and payload["nodes"][0]["status"] == "unsupported"

    accepted = runner.invoke(app, ["check", str(bad), "--plugin", "com.example"])
    assert accepted.exit_code == 0, accepted.output
    assert "1 nodes: 1 supported, 0 conditional, 0 unsupported" in accepted.stdout

    table = runner.invoke(app, ["check", str(bad)])
    assert table.exit_code == 1
    assert "unsupported" in table.stdout and "fancy" in table.stdout and "fix:" in table.stdout


def test_cli_reports_a_broken_file_without_a_traceback(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    result = subprocess.run(
        [sys.executable, "-c", "from trtforge.cli import main; main()", "check", str(broken)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: check-ops: ") and "broken.onnx" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- exported models


@pytest.mark.parametrize("fixture", ["digits_onnx", "resnet18_onnx", "vit_b16_onnx", "swin_t_onnx"])
def test_exported_models_pass(request, fixture):
    path = request.getfixturevalue(fixture)
    report = check_ops(path)
    assert report.ok, report.failure_message()
    assert report.summary.nodes == len(onnx.load(str(path), load_external_data=False).graph.node)
    assert report.summary.conditional == 0, report.format_table()


@pytest.fixture(scope="module")
def digits_int8_onnx(digits_onnx, digits_spec, tmp_path_factory) -> Path:
    """The digits CNN as the convert stage writes it for int8 (ModelOpt Q/DQ), calibrated on the project's calibration set."""
    from trtforge.spec import Precision, PrecisionOptions
    from trtforge.stages.convert_precision import convert_precision

    with np.load(REPO / "calibration_data" / "digits" / "calibration.npz") as archive:
        images = archive["input"][:64]
    cache = tmp_path_factory.mktemp("digits-int8")
    return convert_precision(
        digits_onnx, Precision.INT8, {"input": images}, PrecisionOptions(), spec=digits_spec, cache_dir=cache
    ).onnx_path


def test_int8_qdq_graph_of_the_convert_stage_has_no_findings(digits_int8_onnx):
    model = onnx.load(str(digits_int8_onnx))
    producers = {output: node for node in model.graph.node for output in node.output}
    weighted = [
        node
        for node in model.graph.node
        if node.op_type in ("Conv", "Gemm", "MatMul") and getattr(producers.get(node.input[1]), "op_type", None) == "DequantizeLinear"
    ]
    assert {node.op_type for node in weighted} >= {"Conv", "Gemm"}, "ModelOpt no longer feeds weights through Q/DQ"
    report = static(digits_int8_onnx)
    assert report.ok and report.summary.conditional == 0, report.format_table()
    for node in weighted:
        assert by_name(report, node_name(node)).status == "supported"


@pytest.mark.tensorrt
def test_tensorrt_parser_passes_resnet18(resnet18_onnx):
    report = check_ops(resnet18_onnx, use_tensorrt=True)
    assert report.source == "tensorrt-parser"
    assert report.ok, report.failure_message()


@pytest.mark.tensorrt
def test_tensorrt_parser_names_an_unknown_custom_op(tmp_path):
    report = check_ops(custom_op_model(tmp_path), use_tensorrt=True)
    assert report.source == "tensorrt-parser"
    fancy = by_name(report, "fancy")
    assert fancy.status == "unsupported" and fancy.reason.startswith("TensorRT's parser: ")
