"""The restriction kinds of the operator tables: one handler per ``check.kind`` of the data files.

A table entry's restriction ``{"kind": K, **params}`` is judged by ``RULES[K](node, scope, schema,
version, **params)``, which returns a ``Finding`` when the node breaks or may break it, else None.
``version`` is the TensorRT release the table describes, for the messages. A new phrasing that
tools/tensorrt_ops_table.py learns becomes a new kind here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trtforge.onnxfacts import subgraphs
from trtforge.stages.check_ops.graph import Scope, attribute_value, has_attribute, input_of
from trtforge.stages.check_ops.report import Status

FOLD_FIX = (
    "fold it into an initializer: run the simplify stage (onnxsim folds constants) or "
    "`polygraphy surgeon sanitize --fold-constants`, or compute it from Python values, not tensors, in the model"
)
QDQ_FIX = (
    "quantize symmetrically, with zero points of 0 (the convert stage's ModelOpt int8/fp8 Q/DQ does; "
    "for onnxruntime's quantizer set ActivationSymmetric and WeightSymmetric)"
)
CONFIRM_FIX = "confirm with TensorRT's parser: run `trtforge check MODEL.onnx` where TensorRT is installed"
ATTRIBUTE_FIXES = {
    ("Resize", "antialias"): "resize without antialiasing (torch.nn.functional.interpolate(..., antialias=False))",
    ("Resize", "mode"): "resize with mode 'nearest' or 'linear' (bilinear/trilinear); TensorRT has no cubic resize",
    ("Resize", "coordinate_transformation_mode"): (
        "resize with align_corners=True/False in torch (half_pixel/align_corners); crop-and-resize is not supported"
    ),
    ("Resize", "keep_aspect_ratio_policy"): "give the output size explicitly instead of a keep-aspect-ratio policy",
    ("TopK", "sorted"): "use sorted=True (torch.topk's default)",
    ("ScatterND", "reduction"): "scatter without a reduction, or add the values with a separate op",
    ("LSTM", "layout"): "export the LSTM with batch_first=False (transpose around it)",
    ("LSTM", "input_forget"): "use an LSTM without coupled input and forget gates",
}


@dataclass(frozen=True)
class Finding:
    status: Status
    reason: str
    fix: str = ""


Rule = Callable[..., Finding | None]


def initializer_input(node, scope: Scope, schema, version: str, input: str, equals: bool | None = None):
    tensor = input_of(node, schema, input)
    if tensor is None:
        return None
    if not scope.is_constant(tensor):
        return Finding(
            "unsupported",
            f"input '{input}' (tensor '{tensor}') must be an initializer for TensorRT {version}, but it is computed in the graph",
            FOLD_FIX,
        )
    if equals is False:
        value = scope.value(tensor)
        if value is not None and bool(value.any()):
            return Finding(
                "unsupported",
                f"input '{input}' is True; TensorRT builds inference engines only",
                "export the model in eval mode (model.eval())",
            )
    return None


def zero_input(node, scope: Scope, schema, version: str, input: str):
    tensor = input_of(node, schema, input)
    if tensor is None:
        return None
    if not scope.is_constant(tensor):
        return Finding(
            "conditional",
            f"zero point '{input}' comes from tensor '{tensor}', computed in the graph: TensorRT requires it "
            "to be 0, which cannot be checked before the build",
            "make the zero point an initializer of zeros; " + QDQ_FIX,
        )
    value = scope.value(tensor)
    if value is None:
        return Finding(
            "conditional",
            f"zero point '{input}' (tensor '{tensor}') could not be read to check that it is 0",
            CONFIRM_FIX,
        )
    nonzero = value[value != 0]
    if nonzero.size:
        return Finding(
            "unsupported",
            f"zero point '{input}' (tensor '{tensor}') holds non-zero values (e.g. {nonzero.flat[0]}); "
            "TensorRT takes only symmetric quantization, zero point 0",
            QDQ_FIX,
        )
    return None


def attribute_in(node, scope: Scope, schema, version: str, attribute: str, values: list[Any]):
    value = attribute_value(node, attribute, schema)
    if value is None or value in values:
        return None
    allowed = ", ".join(repr(v) for v in values)
    return Finding(
        "unsupported",
        f"attribute {attribute}={value!r}; TensorRT {version} takes {node.op_type} only with {attribute} in ({allowed})",
        ATTRIBUTE_FIXES.get(
            (node.op_type, attribute),
            f"set {attribute} to one of ({allowed}) in the call that produces this {node.op_type}",
        ),
    )


def attributes_absent(node, scope: Scope, schema, version: str, attributes: list[str]):
    present = [a for a in attributes if has_attribute(node, a)]
    if not present:
        return None
    return Finding(
        "unsupported",
        f"attribute {', '.join(present)} is set; TensorRT takes {node.op_type} only with a dense numeric value",
        "keep strings and sparse tensors out of the model; give constants as dense numeric tensors",
    )


def all_ones(node, scope: Scope, schema, version: str, attribute: str):
    value = attribute_value(node, attribute, schema)
    if not value or all(v == 1 for v in value):
        return None
    return Finding(
        "unsupported",
        f"{attribute}={value}; TensorRT {version} takes {node.op_type} only with {attribute} all ones",
        f"use {attribute}=1 in the layer that produces this {node.op_type}",
    )


def _spatial_dims(node, scope: Scope) -> int | None:
    kernel = attribute_value(node, "kernel_shape", None)
    if kernel:
        return len(kernel)
    shape = scope.shape(node.input[0]) if node.input else None
    return None if shape is None else len(shape) - 2


def spatial_rank(node, scope: Scope, schema, version: str, ranks: list[int]):
    dims = _spatial_dims(node, scope)
    if dims is None:
        return Finding(
            "conditional",
            f"TensorRT {version} takes {node.op_type} only over {' or '.join(map(str, ranks))} spatial "
            "dimensions; the input's rank is unknown here",
            CONFIRM_FIX,
        )
    if dims in ranks:
        return None
    return Finding(
        "unsupported",
        f"{dims}D {node.op_type}; TensorRT {version} takes it only over {' or '.join(map(str, ranks))} spatial dimensions",
        "reshape around it so the operation runs in 2D or 3D (e.g. 1D as 2D with a dimension of 1)",
    )


def unused_output(node, scope: Scope, schema, version: str, output: str):
    names = [o.name for o in schema.outputs] if schema is not None else []
    index = names.index(output) if output in names else None
    if index is None or index >= len(node.output) or not node.output[index]:
        return None
    if node.output[index] not in scope.used:
        return None
    return Finding(
        "unsupported",
        f"output '{output}' (tensor '{node.output[index]}') is used, and TensorRT does not produce it",
        f"do not use {node.op_type}'s {output} output (e.g. max pooling without return_indices)",
    )


def only_first_output(node, scope: Scope, schema, version: str):
    used = [o for o in node.output[1:] if o and o in scope.used]
    if not used:
        return None
    return Finding(
        "unsupported",
        f"outputs after the first ({', '.join(used)}) are used; TensorRT produces only the first output of {node.op_type}",
        f"use only the normalized output of {node.op_type}",
    )


def input_below(node, scope: Scope, schema, version: str, input: str, limit: int):
    tensor = input_of(node, schema, input)
    if tensor is None:
        return None
    if not scope.is_constant(tensor):
        return Finding(
            "conditional",
            f"input '{input}' comes from tensor '{tensor}', computed at run time: TensorRT requires "
            f"{input} < {limit}, which cannot be checked before the engine runs",
            f"make {input} a constant (a Python int in the model, or folded by the simplify stage) so it is "
            "an initializer TensorRT checks when it builds the engine",
        )
    value = scope.value(tensor)
    if value is not None and value.size and int(value.max()) >= limit:
        return Finding(
            "unsupported",
            f"{input}={int(value.max())}; TensorRT {version} takes {node.op_type} only with {input} < {limit}",
            f"take fewer than {limit} elements, or sort with another op",
        )
    return None


def resize_axes_iota(node, scope: Scope, schema, version: str):
    axes = attribute_value(node, "axes", None)
    scales = input_of(node, schema, "scales")
    if not axes or scales is None or scope.is_constant(scales):
        return None
    shape = scope.shape(node.input[0])
    if shape is None:
        return Finding(
            "conditional",
            f"with scales from a tensor, TensorRT {version} needs Resize's axes to be 0..rank-1; the input's rank is unknown here",
            CONFIRM_FIX,
        )
    rank = len(shape)
    if [a % rank for a in axes] == list(range(rank)):
        return None
    return Finding(
        "unsupported",
        f"axes={axes} with scales from tensor '{scales}'; TensorRT {version} then needs axes 0..{rank - 1} in order",
        "give scales for every axis (no axes attribute), or make scales a constant",
    )


def static_shape(node, scope: Scope, schema, version: str, input: str):
    tensor = input_of(node, schema, input)
    shape = scope.shape(tensor) if tensor else None
    if shape is None:
        return Finding(
            "conditional",
            f"TensorRT {version} needs {input} of {node.op_type} to have static dimensions; its shape is unknown here",
            CONFIRM_FIX,
        )
    if all(isinstance(d, int) and d > 0 for d in shape):
        return None
    return Finding(
        "unsupported",
        f"input '{input}' (tensor '{tensor}') has dynamic dimensions {shape}; TensorRT {version} needs them static",
        "give that tensor a static shape (fixed sizes in the model, or a fixed input shape)",
    )


def input_rank(node, scope: Scope, schema, version: str, input: str, ranks: list[int]):
    tensor = input_of(node, schema, input)
    shape = scope.shape(tensor) if tensor else None
    if shape is None:
        return Finding(
            "conditional",
            f"TensorRT {version} takes {node.op_type} only with a rank-{' or '.join(map(str, ranks))} {input}; its rank is unknown here",
            CONFIRM_FIX,
        )
    if len(shape) in ranks:
        return None
    return Finding(
        "unsupported",
        f"input '{input}' has rank {len(shape)}; TensorRT {version} takes {node.op_type} only with rank {' or '.join(map(str, ranks))}",
        "reshape the input to a rank TensorRT takes before this node",
    )


def symmetric_pads(node, scope: Scope, schema, version: str, attribute: str):
    pads = attribute_value(node, attribute, schema)
    if not pads:
        return None
    half = len(pads) // 2
    if pads[:half] == pads[half:]:
        return None
    return Finding(
        "unsupported",
        f"{attribute}={pads} differ at the beginning and end; TensorRT {version} needs them equal",
        "pad symmetrically in the layer, or pad explicitly with a Pad node before it",
    )


def same_bidirectional_activations(node, scope: Scope, schema, version: str):
    if attribute_value(node, "direction", schema) != "bidirectional":
        return None
    activations = attribute_value(node, "activations", None)
    if not activations:
        return None
    half = len(activations) // 2
    if activations[:half] == activations[half:]:
        return None
    return Finding(
        "unsupported",
        f"bidirectional {node.op_type} with different forward and reverse activations {activations}",
        "use the same activations in both directions",
    )


def ignored_attribute(node, scope: Scope, schema, version: str, attribute: str):
    if not has_attribute(node, attribute):
        return None
    return Finding(
        "conditional",
        f"{attribute}={attribute_value(node, attribute, schema)} is ignored by TensorRT: its random values differ from other runtimes'",
        "do not rely on reproducible random values from the engine",
    )


def static_axis_dim(node, scope: Scope, schema, version: str, attribute: str):
    axis = attribute_value(node, attribute, schema)
    shape = scope.shape(node.input[0]) if node.input else None
    if shape is None or axis is None:
        return Finding(
            "conditional",
            f"TensorRT {version} needs the {attribute} dimension of {node.op_type}'s input to be static; it is unknown here",
            CONFIRM_FIX,
        )
    dim = shape[axis % len(shape)] if shape else None
    if isinstance(dim, int) and dim > 0:
        return None
    return Finding(
        "unsupported",
        f"the {attribute} dimension ({dim}) of {node.op_type}'s input is dynamic; TensorRT {version} needs it static",
        "make that dimension static in the model",
    )


def if_branch_outputs(node, scope: Scope, schema, version: str):
    branches = dict(subgraphs(node))
    then_branch, else_branch = branches.get("then_branch"), branches.get("else_branch")
    if then_branch is None or else_branch is None:
        return None
    then_names = [o.name for o in then_branch.output]
    shared = sorted(set(then_names) & {o.name for o in else_branch.output})
    if shared:
        return Finding(
            "unsupported",
            f"both branches name their outputs {shared}; TensorRT {version} needs different names",
            "rename one branch's outputs (e.g. with an Identity node)",
        )
    for then_out, else_out in zip(then_branch.output, else_branch.output):
        then_type, else_type = then_out.type, else_out.type
        if then_type.HasField("tensor_type") and else_type.HasField("tensor_type"):
            a, b = then_type.tensor_type, else_type.tensor_type
            if a.HasField("shape") and b.HasField("shape") and len(a.shape.dim) != len(b.shape.dim):
                return Finding(
                    "unsupported",
                    f"branch outputs '{then_out.name}' and '{else_out.name}' have ranks {len(a.shape.dim)} and "
                    f"{len(b.shape.dim)}; TensorRT {version} needs the same rank",
                    "make both branches return tensors of the same rank",
                )
    return None


def runtime_weights(node, scope: Scope, schema, version: str, input: str):
    tensor = input_of(node, schema, input)
    if tensor is None or scope.is_constant(tensor) or scope.is_dequantized_constant(tensor):
        return None
    producer = scope.producers.get(tensor)
    # Folding a DequantizeLinear's output into an initializer would remove the Q/DQ pair TensorRT quantizes by.
    constant_fix = (
        "keep the DequantizeLinear: quantize constant weights (an initializer into QuantizeLinear/DequantizeLinear, as "
        "the convert stage does)"
        if producer is not None and producer.op_type == "DequantizeLinear"
        else FOLD_FIX
    )
    shape = scope.shape(tensor)
    if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
        return Finding(
            "unsupported",
            f"weights '{input}' come from tensor '{tensor}' and their shape ({shape or 'unknown'}) is not static; "
            "TensorRT needs the output-channel and kernel dimensions when it builds the layer",
            "give the weights a static shape, or " + constant_fix,
        )
    return Finding(
        "conditional",
        f"weights '{input}' come from tensor '{tensor}', not an initializer: TensorRT {version} takes runtime "
        "weights of a static shape, but some 10.x parsers then also require the bias to be an initializer, and "
        "TensorRT 8.x refuses them",
        "if the weights are fixed, " + constant_fix + "; otherwise " + CONFIRM_FIX,
    )


RULES: dict[str, Rule] = {
    "initializer_input": initializer_input,
    "zero_input": zero_input,
    "attribute_in": attribute_in,
    "attributes_absent": attributes_absent,
    "all_ones": all_ones,
    "spatial_rank": spatial_rank,
    "unused_output": unused_output,
    "only_first_output": only_first_output,
    "input_below": input_below,
    "resize_axes_iota": resize_axes_iota,
    "static_shape": static_shape,
    "input_rank": input_rank,
    "symmetric_pads": symmetric_pads,
    "same_bidirectional_activations": same_bidirectional_activations,
    "ignored_attribute": ignored_attribute,
    "static_axis_dim": static_axis_dim,
    "if_branch_outputs": if_branch_outputs,
    "runtime_weights": runtime_weights,
}
