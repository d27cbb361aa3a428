"""Hostile ONNX files: each attack in its own folder, refused with the file and the reason named.

Every attack model lives in ``tmp_path/model``; ``tests.containment.Outside`` puts a secret in
``tmp_path/outside`` and proves afterwards that it was not read and that nothing under
``tmp_path`` was added or changed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.containment import Outside
from trtforge.errors import TrtforgeError
from trtforge.safeio import OnnxModelError, load_onnx_safely
from trtforge.spec import Precision, PrecisionOptions
from trtforge.stages.convert_precision import convert_precision
from trtforge.stages.simplify import simplify_onnx

WEIGHTS = np.arange(6, dtype=np.float32).reshape(2, 3)
OPSET = helper.make_opsetid("", 18)


def add_model(weight: TensorProto, nodes=None, extra_opsets=(), functions=()) -> onnx.ModelProto:
    """y = x + w, with ``w`` as given (inline or external) and optional extra nodes after it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph(nodes or [helper.make_node("Add", ["x", "w"], ["y"], name="add")], "g", [x], [y], [weight])
    return helper.make_model(graph, opset_imports=[OPSET, *extra_opsets], functions=list(functions))


def external_weight(location: str, **fields: int) -> TensorProto:
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2, 3], data_location=TensorProto.EXTERNAL)
    for key, value in {"location": location, **{k: str(v) for k, v in fields.items()}}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def write(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    # SerializeToString, not onnx.save: onnx.save would itself write the external data it names.
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def refused(path: Path, reason: str, **kwargs) -> OnnxModelError:
    with pytest.raises(OnnxModelError) as raised:
        load_onnx_safely(path, **kwargs)
    message = str(raised.value)
    assert str(path) in message, message
    assert reason in message, message
    return raised.value


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return tmp_path / "model"


# ---------------------------------------------------------------- external data that leaves the folder


def test_external_data_climbing_out_with_dotdot_is_refused(tmp_path, model_dir):
    path = write(add_model(external_weight("../outside/secret.bin")), model_dir)
    outside = Outside(tmp_path)
    refused(path, "leaves the model's folder through '..'")
    outside.assert_untouched()


def test_external_data_hidden_dotdot_deeper_in_the_path_is_refused(tmp_path, model_dir):
    (model_dir / "sub").mkdir(parents=True)
    path = write(add_model(external_weight("sub/../../outside/secret.bin")), model_dir)
    outside = Outside(tmp_path)
    refused(path, "leaves the model's folder through '..'")
    outside.assert_untouched()


def test_external_data_at_an_absolute_path_is_refused(tmp_path, model_dir):
    outside = Outside(tmp_path)
    path = write(add_model(external_weight(str(outside.secret))), model_dir)
    outside.record()
    refused(path, "an absolute path")
    outside.assert_untouched()


def test_external_data_through_a_symlink_to_outside_is_refused(tmp_path, model_dir):
    outside = Outside(tmp_path)
    path = write(add_model(external_weight("weights.bin")), model_dir)
    (model_dir / "weights.bin").symlink_to(outside.secret)
    outside.record()
    refused(path, "weights.bin is a symbolic link")
    outside.assert_untouched()


def test_external_data_through_a_symlinked_folder_is_refused(tmp_path, model_dir):
    outside = Outside(tmp_path)
    path = write(add_model(external_weight("data/secret.bin")), model_dir)
    (model_dir / "data").symlink_to(outside.folder, target_is_directory=True)
    outside.record()
    refused(path, "data is a symbolic link")
    outside.assert_untouched()


def test_external_data_hard_linked_to_a_file_outside_is_refused(tmp_path, model_dir):
    outside = Outside(tmp_path)
    path = write(add_model(external_weight("weights.bin")), model_dir)
    os.link(outside.secret, model_dir / "weights.bin")
    outside.record()
    refused(path, "weights.bin has 2 hard links")
    outside.assert_untouched()


def test_missing_external_data_file_is_refused(tmp_path, model_dir):
    path = write(add_model(external_weight("weights.bin")), model_dir)
    outside = Outside(tmp_path)
    refused(path, "which does not exist")
    outside.assert_untouched()


@pytest.mark.timeout(60)
def test_external_data_that_is_a_fifo_is_refused_without_opening_it(tmp_path, model_dir):
    path = write(add_model(external_weight("weights.bin")), model_dir)
    # Opening a FIFO for reading blocks until a writer comes: a loader that opened it would hang here.
    os.mkfifo(model_dir / "weights.bin")
    outside = Outside(tmp_path)
    refused(path, "which is not a regular file")
    outside.assert_untouched()


def test_external_data_in_a_constant_inside_a_subgraph_is_checked(tmp_path, model_dir):
    constant = external_weight("../outside/secret.bin")
    then_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=constant)],
        "then",
        [],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 3])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(WEIGHTS))],
        "else",
        [],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 3])],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Cast", ["s"], ["cond"], to=TensorProto.BOOL),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch, name="branch"),
    ]
    path = write(add_model(numpy_helper.from_array(WEIGHTS, "w"), nodes=nodes), model_dir)
    outside = Outside(tmp_path)
    refused(path, "subgraph 'then_branch' of node 'branch'")
    outside.assert_untouched()


# ---------------------------------------------------------------- byte lengths that do not match the shape


def test_inline_weights_shorter_than_their_shape_are_refused(tmp_path, model_dir):
    weight = numpy_helper.from_array(WEIGHTS, "w")
    weight.raw_data = weight.raw_data[:-4]
    path = write(add_model(weight), model_dir)
    refused(path, "holds 20 bytes, but its shape [2, 3] of FLOAT needs 24")


def test_typed_values_that_do_not_fill_the_shape_are_refused(tmp_path, model_dir):
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 3], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    del weight.float_data[-1]
    path = write(add_model(weight), model_dir)
    refused(path, "holds 5 values in float_data, but its shape [2, 3] of FLOAT needs 6")


def test_external_length_that_does_not_match_the_shape_is_refused(tmp_path, model_dir):
    model_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(WEIGHTS.tobytes() * 1000)
    path = write(add_model(external_weight("weights.bin", length=24 * 1000)), model_dir)
    refused(path, "of 24000 bytes, but its shape [2, 3] needs 24")


def test_external_range_past_the_end_of_the_data_file_is_refused(tmp_path, model_dir):
    model_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(WEIGHTS.tobytes())
    path = write(add_model(external_weight("weights.bin", offset=16, length=24)), model_dir)
    refused(path, "24 bytes from offset 16 run past the end of the 24-byte file")


def test_truncated_external_data_file_is_refused(tmp_path, model_dir):
    model_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(WEIGHTS.tobytes()[:10])
    path = write(add_model(external_weight("weights.bin")), model_dir)
    refused(path, "of 10 bytes, but its shape [2, 3] needs 24")


def test_huge_declared_shape_is_refused_before_anything_is_allocated(tmp_path, model_dir):
    model_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(WEIGHTS.tobytes())
    weight = external_weight("weights.bin")
    weight.dims[:] = [2**31, 2**31]
    path = write(add_model(weight), model_dir)
    refused(path, f"needs {2**62 * 4}")


# ---------------------------------------------------------------- operators from outside the standard


def custom_op_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Add", ["x", "w"], ["t"], name="add"),
        helper.make_node("FastGelu", ["t"], ["y"], name="gelu", domain="com.vendor"),
    ]
    return add_model(numpy_helper.from_array(WEIGHTS, "w"), nodes=nodes, extra_opsets=[helper.make_opsetid("com.vendor", 1)])


def test_node_in_a_custom_domain_is_refused(tmp_path, model_dir):
    path = write(custom_op_model(), model_dir)
    error = refused(path, "node 'gelu' in the main graph is FastGelu from domain 'com.vendor'")
    assert "add 'com.vendor' (or 'FastGelu') to the spec's 'plugins'" in str(error)


@pytest.mark.parametrize("plugin", ["com.vendor", "FastGelu"])
def test_node_in_a_custom_domain_loads_when_declared_as_a_plugin(model_dir, plugin):
    path = write(custom_op_model(), model_dir)
    model = load_onnx_safely(path, plugins=[plugin])
    assert [n.op_type for n in model.graph.node] == ["Add", "FastGelu"]


def test_custom_node_inside_a_model_local_function_is_refused(model_dir):
    function = helper.make_function(
        "local.fn",
        "Shift",
        ["a", "b"],
        ["c"],
        [helper.make_node("Smuggled", ["a", "b"], ["c"], domain="com.evil")],
        opset_imports=[OPSET, helper.make_opsetid("com.evil", 1)],
    )
    nodes = [helper.make_node("Shift", ["x", "w"], ["y"], name="call", domain="local.fn")]
    model = add_model(
        numpy_helper.from_array(WEIGHTS, "w"),
        nodes=nodes,
        extra_opsets=[helper.make_opsetid("local.fn", 1), helper.make_opsetid("com.evil", 1)],
        functions=[function],
    )
    path = write(model, model_dir)
    refused(path, "in function local.fn::Shift is Smuggled from domain 'com.evil'")


def test_model_local_function_of_standard_ops_loads(model_dir):
    function = helper.make_function(
        "local.fn", "Shift", ["a", "b"], ["c"], [helper.make_node("Add", ["a", "b"], ["c"])], opset_imports=[OPSET]
    )
    nodes = [helper.make_node("Shift", ["x", "w"], ["y"], name="call", domain="local.fn")]
    model = add_model(
        numpy_helper.from_array(WEIGHTS, "w"), nodes=nodes, extra_opsets=[helper.make_opsetid("local.fn", 1)], functions=[function]
    )
    loaded = load_onnx_safely(write(model, model_dir))
    assert loaded.graph.node[0].domain == "local.fn"


def test_standard_ml_domain_is_allowed(model_dir):
    nodes = [
        helper.make_node("Add", ["x", "w"], ["t"], name="add"),
        helper.make_node("Binarizer", ["t"], ["y"], name="binarize", domain="ai.onnx.ml", threshold=2.5),
    ]
    model = add_model(numpy_helper.from_array(WEIGHTS, "w"), nodes=nodes, extra_opsets=[helper.make_opsetid("ai.onnx.ml", 3)])
    loaded = load_onnx_safely(write(model, model_dir))
    assert loaded.graph.node[1].domain == "ai.onnx.ml"


# ---------------------------------------------------------------- malformed files


@pytest.fixture
def good_bytes() -> bytes:
    return add_model(numpy_helper.from_array(np.ones((2, 3), np.float32), "w")).SerializeToString()


def test_truncated_model_file_is_refused(model_dir, good_bytes):
    model_dir.mkdir()
    path = model_dir / "model.onnx"
    path.write_bytes(good_bytes[: len(good_bytes) // 2])
    refused(path, "cannot be parsed")


def test_random_bytes_are_refused(model_dir):
    model_dir.mkdir()
    path = model_dir / "model.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(OnnxModelError, match=r"model.onnx (cannot be parsed|holds no model|is not a valid ONNX model)"):
        load_onnx_safely(path)


def test_empty_file_is_refused(model_dir):
    model_dir.mkdir()
    path = model_dir / "model.onnx"
    path.write_bytes(b"")
    refused(path, "holds no model")


def test_model_that_fails_the_onnx_checker_is_refused(model_dir):
    model = add_model(numpy_helper.from_array(WEIGHTS, "w"), nodes=[helper.make_node("Add", ["x", "nowhere"], ["y"], name="add")])
    path = write(model, model_dir)
    refused(path, "is not a valid ONNX model")


def test_missing_model_file_is_refused(model_dir):
    refused(model_dir / "absent.onnx", "does not exist")


# ---------------------------------------------------------------- what is allowed


def test_external_data_inside_the_folder_loads_with_its_values(model_dir):
    (model_dir / "data").mkdir(parents=True)
    (model_dir / "data" / "weights.bin").write_bytes(b"\0" * 8 + WEIGHTS.tobytes())
    path = write(add_model(external_weight("data/weights.bin", offset=8, length=24)), model_dir)
    model = load_onnx_safely(path)
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), WEIGHTS)
    unread = load_onnx_safely(path, load_external_data=False)
    assert unread.graph.initializer[0].data_location == TensorProto.EXTERNAL


# ---------------------------------------------------------------- the stages that load ONNX


def test_simplify_checks_its_input_before_onnxsim_or_onnxruntime_read_it(tmp_path, model_dir, digits_spec):
    path = write(add_model(external_weight("../outside/secret.bin")), model_dir)
    out = tmp_path / "model" / "out"
    outside = Outside(tmp_path)
    with pytest.raises(
        OnnxModelError,
        match=r"^simplify: ONNX model .*model.onnx: initializer 'w' has external data at "
        r"'../outside/secret.bin', which leaves the model's folder",
    ):
        simplify_onnx(digits_spec, path, out)
    assert list(out.iterdir()) == []
    out.rmdir()
    outside.assert_untouched()


def test_convert_precision_checks_its_input(tmp_path, model_dir, digits_spec):
    path = write(custom_op_model(), model_dir)
    outside = Outside(tmp_path)
    with pytest.raises(TrtforgeError, match=r"model.onnx: node 'gelu' .* from domain 'com.vendor'"):
        convert_precision(path, Precision.FP32, None, PrecisionOptions(), spec=digits_spec, cache_dir=tmp_path / "cache")
    outside.assert_untouched()
