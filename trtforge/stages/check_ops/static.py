"""The static check: every node of a model against one operator table, without TensorRT.

It checks the op type and domain, the opset range, the table's restrictions (``rules.RULES``, by
kind) and the tensor element types TensorRT does not take. It cannot see what only the parser sees
when it builds the network, and its notes say so.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtforge.errors import StageError
from trtforge.onnxfacts import default_opset, infer_types, subgraphs
from trtforge.stages.check_ops.graph import FunctionGraph, Scope, node_name, schema_of, used_names
from trtforge.stages.check_ops.report import DEFAULT_DOMAINS, SEVERITY, STAGE, NodeReport, Status
from trtforge.stages.check_ops.rules import CONFIRM_FIX, RULES, Finding
from trtforge.stages.check_ops.table import OperatorTable

PLUGIN_FIX = (
    "replace {op} with standard ONNX operators TensorRT supports (change that part of the model before export), "
    "or implement it as a TensorRT plugin and declare it under `plugins` in the spec (`--plugin {name}`)"
)
NON_TENSOR_FIX = (
    "pass and return plain tensors, not lists, tuples of variable length or optionals "
    "(e.g. torch.stack/torch.cat a list), so the export has no sequence or optional values"
)
ELEMENT_TYPE_FIX = (
    "cast to a type TensorRT takes (float32, float16, bfloat16, int32, int64 or bool) inside the model; "
    "strings and complex numbers must be handled outside the engine"
)
ONNX_TO_TABLE_TYPE = {
    "FLOAT": "FP32",
    "FLOAT16": "FP16",
    "BFLOAT16": "BF16",
    "DOUBLE": "DOUBLE",
    "INT32": "INT32",
    "INT64": "INT64",
    "INT8": "INT8",
    "UINT8": "UINT8",
    "BOOL": "BOOL",
    "FLOAT8E4M3FN": "FP8",
    "INT4": "INT4",
}


class Checker:
    """Runs the table's restrictions and the element-type rules on nodes of one model."""

    def __init__(self, table: OperatorTable, opset: int, plugins: Sequence[str]):
        self.table = table
        self.version = table.tensorrt_version
        self.opset = opset
        self.plugins = frozenset(plugins)
        for op, entry in table.operators.items():
            for restriction in entry["restrictions"]:
                kind = (restriction["check"] or {}).get("kind")
                if kind is not None and kind not in RULES:
                    raise StageError(
                        STAGE,
                        f"operator table {table.path}: {op}'s restriction {restriction['text']!r} has check kind "
                        f"{kind!r}, which trtforge has no rule for; regenerate the table with the "
                        "tools/tensorrt_ops_table.py of this trtforge, or add that kind to RULES in "
                        "trtforge/stages/check_ops/rules.py",
                    )

    # -- entry points

    def check(self, node, scope: Scope) -> list[Finding]:
        domain = node.domain or ""
        if (domain, node.op_type) in scope.local_functions:
            return self._local_function(node, scope)
        if domain not in DEFAULT_DOMAINS:
            if domain in self.plugins or node.op_type in self.plugins:
                return [self._plugin_finding(node)]
            return [
                Finding(
                    "unsupported",
                    f"{node.op_type} is in domain '{domain}', which TensorRT's ONNX operator table does not cover, "
                    "and no plugin is declared for it",
                    PLUGIN_FIX.format(op=node.op_type, name=domain),
                )
            ]
        entry = self.table.operators.get(node.op_type)
        if entry is None or not entry["supported"]:
            if node.op_type in self.plugins:
                return [self._plugin_finding(node)]
            said = "does not support" if entry is not None else "does not list"
            return [
                Finding(
                    "unsupported",
                    f"TensorRT {self.version}'s ONNX operator table {said} {node.op_type}",
                    PLUGIN_FIX.format(op=node.op_type, name=node.op_type),
                )
            ]
        schema = schema_of(node.op_type, self.opset)
        findings = self._opset(node)
        for restriction in entry["restrictions"]:
            check = restriction["check"]
            if check is None:
                findings.append(
                    Finding(
                        "conditional",
                        f"TensorRT {self.version} restricts {node.op_type}: {restriction['text']}; the static check cannot verify this",
                        CONFIRM_FIX,
                    )
                )
                continue
            finding = RULES[check["kind"]](node, scope, schema, self.version, **{k: v for k, v in check.items() if k != "kind"})
            if finding is not None:
                findings.append(finding)
        findings += self._element_types(node, scope, entry)
        return findings

    def _plugin_finding(self, node) -> Finding:
        return Finding(
            "supported",
            f"served by a declared TensorRT plugin ({node.op_type}); its library must be loaded where the engine is built",
        )

    def _local_function(self, node, scope: Scope) -> list[Finding]:
        function = scope.local_functions[(node.domain or "", node.op_type)]
        body = scope.child(FunctionGraph(function), f"{scope.prefix}{node_name(node)}/")
        findings = []
        for inner in function.node:
            for finding in self.check(inner, body):
                if finding.status != "supported":
                    findings.append(
                        Finding(
                            finding.status,
                            f"in local function {node.op_type}, node {node_name(inner)}: {finding.reason}",
                            finding.fix,
                        )
                    )
        return findings

    # -- the opset range

    def _opset(self, node) -> list[Finding]:
        low, high = self.table.opset_min, self.table.opset_max
        if low <= self.opset <= high:
            return []
        clamped = min(max(self.opset, low), high)
        here, there = schema_of(node.op_type, self.opset), schema_of(node.op_type, clamped)
        if here is None or there is None or here.since_version == there.since_version:
            return []
        direction = "or lower" if self.opset > high else "or higher"
        return [
            Finding(
                "unsupported",
                f"the model's opset {self.opset} gives {node.op_type} its version-{here.since_version} definition; "
                f"TensorRT {self.version} covers opsets {low}-{high} ({node.op_type}-{there.since_version} there)",
                f"export with opset {clamped} {direction} (export.opset in the spec)",
            )
        ]

    # -- element types

    def _element_types(self, node, scope: Scope, entry: dict[str, Any]) -> list[Finding]:
        from onnx import TensorProto

        findings: list[Finding] = []
        # Each tensor is judged once: at the node that produces it, or at each consumer when it has no producer.
        tensors = [(o, "output") for o in node.output if o]
        tensors += [(i, "input") for i in node.input if i and i not in scope.producers]
        for tensor, role in tensors:
            type_proto = scope.types.get(tensor)
            if type_proto is None:
                continue
            kind = type_proto.WhichOneof("value")
            if kind != "tensor_type":
                what = {
                    "sequence_type": "a sequence of tensors",
                    "optional_type": "an optional value",
                    "map_type": "a map",
                    "sparse_tensor_type": "a sparse tensor",
                }.get(kind, f"a {kind}")
                findings.append(Finding("unsupported", f"{role} '{tensor}' is {what}; TensorRT takes only dense tensors", NON_TENSOR_FIX))
                continue
            elem = type_proto.tensor_type.elem_type
            if elem == TensorProto.UNDEFINED:
                continue
            onnx_name = TensorProto.DataType.Name(elem)
            name = ONNX_TO_TABLE_TYPE.get(onnx_name)
            if name is None or name not in self.table.data_types:
                findings.append(
                    Finding(
                        "unsupported",
                        f"{role} '{tensor}' has element type {onnx_name}, which TensorRT {self.version} does not take",
                        ELEMENT_TYPE_FIX,
                    )
                )
            elif name in self.table.limited_types:
                findings.append(
                    Finding(
                        "conditional",
                        f"{role} '{tensor}' is {onnx_name}: TensorRT casts it to FLOAT, clamping to +-FLT_MAX",
                        "use float32 in the model (e.g. .float() instead of .double())",
                    )
                )
            elif name in self.table.io_only_types and tensor not in scope.network_io:
                findings.append(
                    Finding(
                        "unsupported",
                        f"{role} '{tensor}' is {onnx_name} inside the network; TensorRT takes {onnx_name} only as a "
                        "network input or output",
                        "cast to int32 or float before this node; quantize with INT8 Q/DQ, not UINT8",
                    )
                )
            elif name in self.table.quantized_types and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                findings.append(
                    Finding(
                        "conditional",
                        f"{role} '{tensor}' is {onnx_name}: TensorRT takes {', '.join(self.table.quantized_types)} only "
                        "through quantization, between QuantizeLinear and DequantizeLinear",
                        "keep quantized values between QuantizeLinear and DequantizeLinear",
                    )
                )
        first = scope.types.get(node.input[0]) if node.input and node.input[0] else None
        if first is not None and first.WhichOneof("value") == "tensor_type" and entry["types"]:
            first_name = ONNX_TO_TABLE_TYPE.get(TensorProto.DataType.Name(first.tensor_type.elem_type))
            if first_name in self.table.data_types and first_name not in entry["types"]:
                findings.append(
                    Finding(
                        "conditional",
                        f"input '{node.input[0]}' is {first_name}; TensorRT {self.version}'s table lists "
                        f"{node.op_type} for {', '.join(entry['types'])} only",
                        f"cast the input to one of {', '.join(entry['types'])} before this node, or " + CONFIRM_FIX,
                    )
                )
        return findings


def verdict(findings: Iterable[Finding]) -> tuple[Status, str, str]:
    findings = list(findings)
    if not findings:
        return "supported", "", ""
    worst = max(SEVERITY[f.status] for f in findings)
    status = next(s for s, rank in SEVERITY.items() if rank == worst)
    ordered = sorted(findings, key=lambda f: -SEVERITY[f.status])
    reasons = list(dict.fromkeys(f.reason for f in ordered if f.status != "supported" or status == "supported"))
    fixes = list(dict.fromkeys(f.fix for f in ordered if f.fix and SEVERITY[f.status] == worst))
    return status, "; ".join(reasons), "; ".join(fixes)


@dataclass(frozen=True)
class StaticResult:
    """The static verdicts, with each node's own name and where the top-level nodes (the parser's indices) are."""

    nodes: list[NodeReport]
    raw_names: list[str]
    top_level: list[int]
    notes: list[str]


def static_check(model, model_dir: Path, table: OperatorTable, plugins: Sequence[str]) -> StaticResult:
    """Judge every node (subgraph and local-function nodes included) against ``table``."""
    opset = default_opset(model)
    typed, inference_note = infer_types(model)
    graph = typed.graph
    network_io = frozenset([i.name for i in graph.input] + [o.name for o in graph.output])
    scope = Scope(
        graph=graph,
        prefix="",
        model_dir=model_dir,
        constants={},
        types={},
        producers={},
        network_io=network_io,
        used=frozenset(used_names(graph)),
        local_functions={(f.domain, f.name): f for f in model.functions},
    )
    scope.add_graph(graph)
    # A model without a default-domain import has no standard ops whose version could matter.
    checker = Checker(table, opset if opset is not None else table.opset_max, plugins)
    nodes: list[NodeReport] = []
    raw_names: list[str] = []
    top_level: list[int] = []

    def visit(current: Scope, is_top: bool) -> None:
        for node in current.graph.node:
            status, reason, fix = verdict(checker.check(node, current))
            if is_top:
                top_level.append(len(nodes))
            raw_names.append(node_name(node))
            nodes.append(
                NodeReport(
                    name=current.prefix + node_name(node),
                    op_type=node.op_type,
                    domain=node.domain or "",
                    status=status,
                    reason=reason,
                    fix=fix,
                )
            )
            for attribute, subgraph in subgraphs(node):
                visit(current.child(subgraph, f"{current.prefix}{node_name(node)}/{attribute}/"), False)

    visit(scope, True)
    notes = [
        f"source: TensorRT {table.tensorrt_version}'s published ONNX operator table ({table.path.name}), checked "
        "without TensorRT; a static check can miss restrictions only TensorRT's parser sees (shapes and values known "
        "only when the network is built, per-layer limits, whether a plugin is registered): "
        "run `trtforge check` where TensorRT is installed to confirm"
    ]
    if opset is not None and not table.opset_min <= opset <= table.opset_max:
        notes.append(
            f"the model's opset {opset} is outside TensorRT {table.tensorrt_version}'s range "
            f"{table.opset_min}-{table.opset_max}; nodes whose operator definition differs there are unsupported"
        )
    if inference_note:
        notes.append(inference_note)
    return StaticResult(nodes=nodes, raw_names=raw_names, top_level=top_level, notes=notes)
