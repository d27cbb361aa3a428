"""TensorRT's own ONNX parser, through polygraphy, where TensorRT is installed; its errors placed on the nodes."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trtforge.errors import StageError
from trtforge.gpu import detect_gpus
from trtforge.stages.check_ops.report import STAGE, NodeReport
from trtforge.stages.check_ops.static import StaticResult


@dataclass(frozen=True)
class ParserError:
    """One error from TensorRT's ONNX parser; ``node_index`` is -1 when it names no node."""

    node_index: int
    node_name: str
    op_type: str
    message: str


NOT_INSTALLED = "TensorRT is not installed"
GPU_NEEDED = "TensorRT's ONNX parser needs a GPU worker: creating a TensorRT builder needs a CUDA GPU"


def parser_unavailable_reason() -> str | None:
    """Why TensorRT's parser cannot run in this process, or None when it can."""
    if not tensorrt_importable():
        return NOT_INSTALLED
    gpus = detect_gpus()
    if not gpus.available:
        return f"{GPU_NEEDED}, and none is visible here ({gpus.reason or 'NVML lists no GPU'})"
    return None


def run_parser(path: Path) -> tuple[bool, list[ParserError], str]:
    """Parse with TensorRT's ONNX parser (strongly typed network, as the build uses) and collect its errors."""
    import tensorrt as trt
    from polygraphy.backend.trt import create_network, get_trt_logger

    try:
        # The builder owns the network: it stays referenced until the parser's errors are read.
        builder, network = create_network(strongly_typed=True)
    except TypeError as err:
        # trt.Builder returns no builder without a usable CUDA device, which pybind reports as a TypeError.
        raise StageError(STAGE, f"{GPU_NEEDED}, and TensorRT could not create one here ({err})") from None
    logger = get_trt_logger()
    trt.init_libnvinfer_plugins(logger, "")
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(path))
    errors = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        errors.append(
            ParserError(
                node_index=int(error.node()),
                node_name=str(getattr(error, "node_name", lambda: "")()),
                op_type=str(getattr(error, "node_operator", lambda: "")()),
                message=str(error.desc()),
            )
        )
    return bool(parsed) and not errors, errors, trt.__version__


def merge_parser_result(
    static: StaticResult, parsed: bool, errors: Sequence[ParserError], plugins: Sequence[str]
) -> tuple[list[NodeReport], list[str]]:
    """Node verdicts from the parser's result; the static table speaks only for nodes the parser did not import.

    onnx-tensorrt visits the nodes in topological order (for a valid ONNX graph, the order of its
    node list) and static-checks every one of them, but imports a node only while no error has
    been recorded: after the first error, in a network input or at a node, the remaining nodes are
    static-checked and not imported. ``errors`` come in the order the parser recorded them. So
    nodes with an error are unsupported with the parser's message, nodes before the first error
    were imported and are supported, and the others passed the parser's static checks and keep the
    static table's verdict, marked as such.
    """
    nodes = list(static.nodes)
    if parsed:
        return [n.model_copy(update={"status": "supported", "reason": "", "fix": ""}) for n in nodes], []

    by_raw_name: dict[str, list[int]] = {}
    for position, raw in enumerate(static.raw_names):
        by_raw_name.setdefault(raw, []).append(position)
    failed: dict[int, list[str]] = {}
    unplaced: list[ParserError] = []
    for error in errors:
        positions = by_raw_name.get(error.node_name) if error.node_name else None
        if not positions and 0 <= error.node_index < len(static.top_level):
            positions = [static.top_level[error.node_index]]
        if positions:
            for position in positions:
                failed.setdefault(position, []).append(error.message)
        else:
            unplaced.append(error)
    if errors and errors[0] in unplaced:
        # Network inputs are imported before any node, so an error that names no node and comes first stopped them all.
        imported_until, first_error = 0, f"outside any node: {errors[0].message}"
    elif failed:
        imported_until = min(failed)
        first_error = f"at {nodes[imported_until].name}"
    else:
        imported_until, first_error = 0, "none was reported, but the parse failed"

    declared = frozenset(plugins)
    merged = []
    for position, node in enumerate(nodes):
        if position in failed:
            message = " | ".join(dict.fromkeys(failed[position]))
            if node.op_type in declared or node.domain in declared:
                merged.append(
                    node.model_copy(
                        update={
                            "status": "conditional",
                            "reason": f"declared as a plugin, but TensorRT's parser found none registered here: {message}",
                            "fix": "load the plugin's library where the engine is built (trt.get_plugin_registry().load_library)",
                        }
                    )
                )
                continue
            fix = node.fix if node.status != "supported" else ""
            merged.append(
                node.model_copy(
                    update={
                        "status": "unsupported",
                        "reason": f"TensorRT's parser: {message}",
                        "fix": fix or "change or replace this node as the parser's message says, or serve the op with a declared plugin",
                    }
                )
            )
        elif position < imported_until:
            merged.append(node.model_copy(update={"status": "supported", "reason": "", "fix": ""}))
        else:
            prefix = (
                "passed TensorRT's static checks, but its import is not confirmed: the parser imports nodes only until "
                f"its first error ({first_error})"
            )
            reason = f"{prefix}; static table: {node.reason}" if node.reason else f"{prefix}; the static table finds nothing"
            merged.append(node.model_copy(update={"reason": reason}))
    for error in unplaced:
        merged.append(
            NodeReport(
                name=error.node_name or "(model)",
                op_type=error.op_type or "(model)",
                status="unsupported",
                reason=f"TensorRT's parser: {error.message}",
                fix="change the model as the parser's message says",
            )
        )
    notes = []
    if imported_until < len(nodes):
        notes.append(
            f"TensorRT's parser static-checked every node but imported only those before its first error ({first_error}); "
            "the verdicts of the others come from its static checks and the static table"
        )
    return merged, notes


def tensorrt_importable() -> bool:
    try:
        return importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        return False
