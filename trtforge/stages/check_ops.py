"""Stage 'check-ops': can TensorRT take every node of an ONNX model, before anything is built?

Two sources of truth, chosen by ``use_tensorrt``:

* ``tensorrt-parser``: TensorRT's own ONNX parser, through polygraphy's loaders, where
  TensorRT is installed. The parser reports every node it rejects with its own message.
* ``static-table``: TensorRT's published ONNX operator table, kept in ``trtforge/data`` with
  the TensorRT version it describes. It checks the op type and domain, the opset range, the
  restrictions a static check can see (inputs that must be initializers, attribute values,
  Q/DQ zero points, ranks) and tensor element types TensorRT does not take. It cannot see what
  only the parser sees when it builds the network, and the report says so.

Every node gets ``supported``, ``conditional`` (supported only under a restriction this check
cannot confirm, or with a caveat) or ``unsupported``, with the reason and a fix. Parsing runs
in a child process: protobuf, onnx's shape inference and TensorRT's parser are native code
that can crash on hostile or unusual files.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from trtforge.errors import CompatibilityError, StageError

STAGE = "check-ops"
DATA_DIR = Path(__file__).resolve().parents[1] / "data"
TABLE_PREFIX = "tensorrt_onnx_ops_"
DEFAULT_DOMAINS = ("", "ai.onnx")
# Constant values are read only to check small inputs (zero points, K, flags); a larger
# tensor is treated as unknown rather than read from disk.
MAX_CONSTANT_ELEMENTS = 1 << 20
LARGE_INITIALIZER_BYTES = 1 << 16

Status = Literal["supported", "conditional", "unsupported"]
Source = Literal["tensorrt-parser", "static-table"]
SEVERITY: dict[str, int] = {"supported": 0, "conditional": 1, "unsupported": 2}

FOLD_FIX = (
    "fold it into an initializer: run the simplify stage (onnxsim folds constants) or "
    "`polygraphy surgeon sanitize --fold-constants`, or compute it from Python values, not tensors, in the model"
)
QDQ_FIX = (
    "quantize symmetrically, with zero points of 0 (the convert stage's ModelOpt int8/fp8 Q/DQ does; "
    "for onnxruntime's quantizer set ActivationSymmetric and WeightSymmetric)"
)
PLUGIN_FIX = (
    "replace {op} with standard ONNX operators TensorRT supports (change that part of the model before export), "
    "or implement it as a TensorRT plugin and declare it under `plugins` in the spec (`--plugin {name}`)"
)
CONFIRM_FIX = "confirm with TensorRT's parser: run `trtforge check MODEL.onnx` where TensorRT is installed"
NON_TENSOR_FIX = (
    "pass and return plain tensors, not lists, tuples of variable length or optionals "
    "(e.g. torch.stack/torch.cat a list), so the export has no sequence or optional values"
)
ELEMENT_TYPE_FIX = (
    "cast to a type TensorRT takes (float32, float16, bfloat16, int32, int64 or bool) inside the model; "
    "strings and complex numbers must be handled outside the engine"
)
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


class NodeReport(BaseModel):
    """The verdict on one node; ``name`` is the node's name, or ``node_of_<first output>`` like TensorRT's."""

    model_config = ConfigDict(frozen=True)

    name: str
    op_type: str
    domain: str = ""
    status: Status
    reason: str = ""
    fix: str = ""


class OpTypeSummary(BaseModel):
    count: int = 0
    supported: int = 0
    conditional: int = 0
    unsupported: int = 0


class ReportSummary(BaseModel):
    nodes: int
    supported: int
    conditional: int
    unsupported: int
    by_op_type: dict[str, OpTypeSummary]


class CompatibilityReport(BaseModel):
    """What TensorRT makes of one ONNX model. JSON-serialisable; ``ok`` is False when any node is unsupported."""

    model: str
    source: Source
    tensorrt_version: str
    opset: int | None
    nodes: list[NodeReport]
    summary: ReportSummary
    notes: list[str]

    @property
    def unsupported(self) -> list[NodeReport]:
        return [n for n in self.nodes if n.status == "unsupported"]

    @property
    def conditional(self) -> list[NodeReport]:
        return [n for n in self.nodes if n.status == "conditional"]

    @property
    def ok(self) -> bool:
        return not self.unsupported

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per op type with any node not supported, worst first: for tables in run reports."""
        rows = [
            {"op_type": op, **counts.model_dump()}
            for op, counts in self.summary.by_op_type.items()
            if counts.conditional or counts.unsupported
        ]
        return sorted(rows, key=lambda r: (-r["unsupported"], -r["conditional"], r["op_type"]))

    def format_table(self) -> str:
        """The report for a terminal: header, one line per node that is not supported, the notes."""
        s = self.summary
        lines = [
            f"{self.model}: opset {self.opset}, checked with {self.source} (TensorRT {self.tensorrt_version})",
            f"{s.nodes} nodes: {s.supported} supported, {s.conditional} conditional, {s.unsupported} unsupported",
        ]
        flagged = sorted(self.unsupported + self.conditional, key=lambda n: -SEVERITY[n.status])
        if flagged:
            headers = ("status", "node", "op", "reason", "fix")
            rows = [(n.status, n.name, _op_key(n.domain, n.op_type), n.reason, n.fix) for n in flagged]
            widths = [min(60, max(len(h), *(len(r[i]) for r in rows))) for i, h in enumerate(headers[:3])]
            lines.append("")
            lines.append("  ".join(h.ljust(w) for h, w in zip(headers[:3], widths)) + "  reason / fix")
            for row in rows:
                lines.append("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + f"  {row[3]}")
                if row[4]:
                    lines.append(" " * (sum(widths) + 6) + f"  fix: {row[4]}")
        lines += [""] + [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def failure_message(self) -> str:
        """Every unsupported node with reason and fix, for the error that stops a run."""
        lines = [
            f"{len(self.unsupported)} node(s) of {self.model} cannot run on TensorRT {self.tensorrt_version} (checked with {self.source}):"
        ]
        for node in self.unsupported:
            lines.append(f"  {node.name} [{_op_key(node.domain, node.op_type)}]: {node.reason}")
            if node.fix:
                lines.append(f"    fix: {node.fix}")
        return "\n".join(lines)

    def raise_if_unsupported(self) -> None:
        if not self.ok:
            raise CompatibilityError(STAGE, self.failure_message())


def _op_key(domain: str, op_type: str) -> str:
    return op_type if domain in DEFAULT_DOMAINS else f"{domain}::{op_type}"


def summarize(nodes: Sequence[NodeReport]) -> ReportSummary:
    by_op: dict[str, OpTypeSummary] = {}
    for node in nodes:
        counts = by_op.setdefault(_op_key(node.domain, node.op_type), OpTypeSummary())
        counts.count += 1
        setattr(counts, node.status, getattr(counts, node.status) + 1)
    return ReportSummary(
        nodes=len(nodes),
        supported=sum(1 for n in nodes if n.status == "supported"),
        conditional=sum(1 for n in nodes if n.status == "conditional"),
        unsupported=sum(1 for n in nodes if n.status == "unsupported"),
        by_op_type=dict(sorted(by_op.items())),
    )


# --------------------------------------------------------------------------- operator tables


@dataclass(frozen=True)
class OperatorTable:
    """TensorRT's ONNX operator support for one release, as written by tools/tensorrt_ops_table.py."""

    path: Path
    tensorrt_version: str
    opset_min: int
    opset_max: int
    data_types: tuple[str, ...]
    quantized_types: tuple[str, ...]
    io_only_types: tuple[str, ...]
    limited_types: tuple[str, ...]
    operators: dict[str, dict[str, Any]]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def available_tables() -> dict[str, Path]:
    """TensorRT version (major.minor) -> operator data file shipped with trtforge."""
    return {path.stem.removeprefix(TABLE_PREFIX): path for path in sorted(DATA_DIR.glob(f"{TABLE_PREFIX}*.json"))}


def load_table(tensorrt_version: str | None = None) -> tuple[OperatorTable, str | None]:
    """The table for ``tensorrt_version`` (newest when None), and a note when an older one stands in."""
    tables = available_tables()
    if not tables:
        raise StageError(STAGE, f"no TensorRT operator table in {DATA_DIR}: reinstall trtforge")
    ordered = sorted(tables, key=_version_key)
    note = None
    if tensorrt_version is None:
        chosen = ordered[-1]
    else:
        wanted = _version_key(tensorrt_version)
        if len(wanted) < 2:
            raise StageError(STAGE, f"TensorRT version {tensorrt_version!r} is not a version like 10.1 or 10.1.0")
        older = [v for v in ordered if _version_key(v) <= wanted]
        if not older:
            raise StageError(
                STAGE,
                f"no operator table for TensorRT {tensorrt_version} or older; trtforge has tables for "
                f"{', '.join(ordered)} (add one with tools/tensorrt_ops_table.py)",
            )
        chosen = older[-1]
        if _version_key(chosen) != wanted:
            note = (
                f"trtforge has no operator table for TensorRT {tensorrt_version}; checked against {chosen}'s, the "
                f"newest older one: operators added since are reported unsupported, restrictions lifted since still apply"
            )
    path = tables[chosen]
    data = json.loads(path.read_text())
    table = OperatorTable(
        path=path,
        tensorrt_version=data["tensorrt_version"],
        opset_min=data["opset_min"],
        opset_max=data["opset_max"],
        data_types=tuple(data["data_types"]),
        quantized_types=tuple(data["quantized_types"]),
        io_only_types=tuple(data["io_only_types"]),
        limited_types=tuple(data["limited_types"]),
        operators=data["operators"],
    )
    return table, note


# --------------------------------------------------------------------------- loading


def _load_model(path: Path):
    """Parse ``path`` without its external data, then validate it; external data must stay in its folder."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise StageError(
            STAGE,
            f"{path} is not a readable ONNX model ({type(err).__name__}: {err}); the file may be truncated or not "
            "an .onnx file: export it again",
        ) from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise StageError(STAGE, f"{path} holds no ONNX model (empty or not an .onnx file): export it again")
    try:
        # Given a path, the checker also refuses external data that is absolute, outside the model's
        # folder, a symbolic link or a hard link, before anything reads it.
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        message = str(err).strip().splitlines()[0]
        if "TensorProto" in message and ("external" in message.lower() or "stored in" in message or "inside" in message):
            raise StageError(
                STAGE,
                f"{path}: external data refused: {message}. External data must be regular files inside "
                f"{path.parent}, named by relative paths",
            ) from None
        raise StageError(STAGE, f"{path} is not a valid ONNX model: {message}") from None
    return model


def _infer_types(model) -> tuple[Any, str | None]:
    import onnx

    # Shape inference needs the values of small constants only; handing it hundreds of MB of
    # weights costs seconds of copying, so large initializers go in as data-less placeholders.
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
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (
            model,
            f"shape inference failed ({first}); element types and ranks come only from what the model declares",
        )


# --------------------------------------------------------------------------- graph facts


@dataclass
class _Scope:
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

    def child(self, graph, prefix: str) -> _Scope:
        scope = _Scope(
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
                tensor = _constant_node_tensor(node)
                if tensor is not None:
                    self.constants[node.output[0]] = tensor
            # TensorRT's parser passes weights through Identity unchanged, so they stay initializers.
            if node.op_type == "Identity" and node.domain in DEFAULT_DOMAINS and node.input and node.input[0] in self.constants:
                self.constants[node.output[0]] = self.constants[node.input[0]]

    def is_constant(self, name: str) -> bool:
        return name in self.constants

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


def _constant_node_tensor(node):
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


def _subgraphs(node) -> Iterator[tuple[str, Any]]:
    from onnx import AttributeProto

    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            yield attribute.name, attribute.g
        elif attribute.type == AttributeProto.GRAPHS:
            for index, graph in enumerate(attribute.graphs):
                yield f"{attribute.name}[{index}]", graph


def _used_names(graph) -> set[str]:
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(i for i in node.input if i)
        for _, subgraph in _subgraphs(node):
            used |= _used_names(subgraph)
    return used


def node_name(node) -> str:
    """The name TensorRT gives a node: its own, or ``node_of_<first output>`` when it has none."""
    if node.name:
        return node.name
    return f"node_of_{node.output[0]}" if node.output else node.op_type


# --------------------------------------------------------------------------- static check


@dataclass(frozen=True)
class _Finding:
    status: Status
    reason: str
    fix: str = ""


@functools.lru_cache(maxsize=4096)
def _schema(op_type: str, opset: int, domain: str = ""):
    import onnx.defs

    try:
        return onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return None


def _attribute(node, name: str, schema) -> Any:
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


def _has_attribute(node, name: str) -> bool:
    return any(a.name == name for a in node.attribute)


def _input(node, schema, name: str) -> str | None:
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


class _Checker:
    """Runs the table's restrictions and the element-type rules on nodes of one model."""

    def __init__(self, table: OperatorTable, opset: int, plugins: Sequence[str]):
        self.table = table
        self.version = table.tensorrt_version
        self.opset = opset
        self.plugins = frozenset(plugins)

    # -- entry points

    def check(self, node, scope: _Scope) -> list[_Finding]:
        domain = node.domain or ""
        if (domain, node.op_type) in scope.local_functions:
            return self._local_function(node, scope)
        if domain not in DEFAULT_DOMAINS:
            if domain in self.plugins or node.op_type in self.plugins:
                return [self._plugin_finding(node)]
            return [
                _Finding(
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
                _Finding(
                    "unsupported",
                    f"TensorRT {self.version}'s ONNX operator table {said} {node.op_type}",
                    PLUGIN_FIX.format(op=node.op_type, name=node.op_type),
                )
            ]
        schema = _schema(node.op_type, self.opset)
        findings = self._opset(node)
        for restriction in entry["restrictions"]:
            check = restriction["check"]
            if check is None:
                findings.append(
                    _Finding(
                        "conditional",
                        f"TensorRT {self.version} restricts {node.op_type}: {restriction['text']}; the static check cannot verify this",
                        CONFIRM_FIX,
                    )
                )
                continue
            handler = getattr(self, f"_check_{check['kind']}")
            finding = handler(node, scope, schema, **{k: v for k, v in check.items() if k != "kind"})
            if finding is not None:
                findings.append(finding)
        findings += self._element_types(node, scope, entry)
        return findings

    def _plugin_finding(self, node) -> _Finding:
        return _Finding(
            "supported",
            f"served by a declared TensorRT plugin ({node.op_type}); its library must be loaded where the engine is built",
        )

    def _local_function(self, node, scope: _Scope) -> list[_Finding]:
        function = scope.local_functions[(node.domain or "", node.op_type)]
        body = scope.child(_FunctionGraph(function), f"{scope.prefix}{node_name(node)}/")
        findings = []
        for inner in function.node:
            for finding in self.check(inner, body):
                if finding.status != "supported":
                    findings.append(
                        _Finding(
                            finding.status,
                            f"in local function {node.op_type}, node {node_name(inner)}: {finding.reason}",
                            finding.fix,
                        )
                    )
        return findings

    # -- the opset range

    def _opset(self, node) -> list[_Finding]:
        low, high = self.table.opset_min, self.table.opset_max
        if low <= self.opset <= high:
            return []
        clamped = min(max(self.opset, low), high)
        here, there = _schema(node.op_type, self.opset), _schema(node.op_type, clamped)
        if here is None or there is None or here.since_version == there.since_version:
            return []
        direction = "or lower" if self.opset > high else "or higher"
        return [
            _Finding(
                "unsupported",
                f"the model's opset {self.opset} gives {node.op_type} its version-{here.since_version} definition; "
                f"TensorRT {self.version} covers opsets {low}-{high} ({node.op_type}-{there.since_version} there)",
                f"export with opset {clamped} {direction} (export.opset in the spec)",
            )
        ]

    # -- restriction kinds, named as in the data file

    def _check_initializer_input(self, node, scope, schema, input: str, equals: bool | None = None):
        tensor = _input(node, schema, input)
        if tensor is None:
            return None
        if not scope.is_constant(tensor):
            return _Finding(
                "unsupported",
                f"input '{input}' (tensor '{tensor}') must be an initializer for TensorRT {self.version}, but it is computed in the graph",
                FOLD_FIX,
            )
        if equals is False:
            value = scope.value(tensor)
            if value is not None and bool(value.any()):
                return _Finding(
                    "unsupported",
                    f"input '{input}' is True; TensorRT builds inference engines only",
                    "export the model in eval mode (model.eval())",
                )
        return None

    def _check_zero_input(self, node, scope, schema, input: str):
        tensor = _input(node, schema, input)
        if tensor is None:
            return None
        if not scope.is_constant(tensor):
            return _Finding(
                "conditional",
                f"zero point '{input}' comes from tensor '{tensor}', computed in the graph: TensorRT requires it "
                "to be 0, which cannot be checked before the build",
                "make the zero point an initializer of zeros; " + QDQ_FIX,
            )
        value = scope.value(tensor)
        if value is None:
            return _Finding(
                "conditional",
                f"zero point '{input}' (tensor '{tensor}') could not be read to check that it is 0",
                CONFIRM_FIX,
            )
        nonzero = value[value != 0]
        if nonzero.size:
            return _Finding(
                "unsupported",
                f"zero point '{input}' (tensor '{tensor}') holds non-zero values (e.g. {nonzero.flat[0]}); "
                "TensorRT takes only symmetric quantization, zero point 0",
                QDQ_FIX,
            )
        return None

    def _check_attribute_in(self, node, scope, schema, attribute: str, values: list[Any]):
        value = _attribute(node, attribute, schema)
        if value is None or value in values:
            return None
        allowed = ", ".join(repr(v) for v in values)
        return _Finding(
            "unsupported",
            f"attribute {attribute}={value!r}; TensorRT {self.version} takes {node.op_type} only with {attribute} in ({allowed})",
            ATTRIBUTE_FIXES.get(
                (node.op_type, attribute),
                f"set {attribute} to one of ({allowed}) in the call that produces this {node.op_type}",
            ),
        )

    def _check_attributes_absent(self, node, scope, schema, attributes: list[str]):
        present = [a for a in attributes if _has_attribute(node, a)]
        if not present:
            return None
        return _Finding(
            "unsupported",
            f"attribute {', '.join(present)} is set; TensorRT takes {node.op_type} only with a dense numeric value",
            "keep strings and sparse tensors out of the model; give constants as dense numeric tensors",
        )

    def _check_all_ones(self, node, scope, schema, attribute: str):
        value = _attribute(node, attribute, schema)
        if not value or all(v == 1 for v in value):
            return None
        return _Finding(
            "unsupported",
            f"{attribute}={value}; TensorRT {self.version} takes {node.op_type} only with {attribute} all ones",
            f"use {attribute}=1 in the layer that produces this {node.op_type}",
        )

    def _spatial_dims(self, node, scope) -> int | None:
        kernel = _attribute(node, "kernel_shape", None)
        if kernel:
            return len(kernel)
        shape = scope.shape(node.input[0]) if node.input else None
        return None if shape is None else len(shape) - 2

    def _check_spatial_rank(self, node, scope, schema, ranks: list[int]):
        dims = self._spatial_dims(node, scope)
        if dims is None:
            return _Finding(
                "conditional",
                f"TensorRT {self.version} takes {node.op_type} only over {' or '.join(map(str, ranks))} spatial "
                "dimensions; the input's rank is unknown here",
                CONFIRM_FIX,
            )
        if dims in ranks:
            return None
        return _Finding(
            "unsupported",
            f"{dims}D {node.op_type}; TensorRT {self.version} takes it only over {' or '.join(map(str, ranks))} spatial dimensions",
            "reshape around it so the operation runs in 2D or 3D (e.g. 1D as 2D with a dimension of 1)",
        )

    def _check_unused_output(self, node, scope, schema, output: str):
        names = [o.name for o in schema.outputs] if schema is not None else []
        index = names.index(output) if output in names else None
        if index is None or index >= len(node.output) or not node.output[index]:
            return None
        if node.output[index] not in scope.used:
            return None
        return _Finding(
            "unsupported",
            f"output '{output}' (tensor '{node.output[index]}') is used, and TensorRT does not produce it",
            f"do not use {node.op_type}'s {output} output (e.g. max pooling without return_indices)",
        )

    def _check_only_first_output(self, node, scope, schema):
        used = [o for o in node.output[1:] if o and o in scope.used]
        if not used:
            return None
        return _Finding(
            "unsupported",
            f"outputs after the first ({', '.join(used)}) are used; TensorRT produces only the first output of {node.op_type}",
            f"use only the normalized output of {node.op_type}",
        )

    def _check_input_below(self, node, scope, schema, input: str, limit: int):
        tensor = _input(node, schema, input)
        if tensor is None:
            return None
        if not scope.is_constant(tensor):
            return _Finding(
                "conditional",
                f"input '{input}' comes from tensor '{tensor}', computed at run time: TensorRT requires "
                f"{input} < {limit}, which cannot be checked before the engine runs",
                f"make {input} a constant (a Python int in the model, or folded by the simplify stage) so it is "
                "an initializer TensorRT checks when it builds the engine",
            )
        value = scope.value(tensor)
        if value is not None and value.size and int(value.max()) >= limit:
            return _Finding(
                "unsupported",
                f"{input}={int(value.max())}; TensorRT {self.version} takes {node.op_type} only with {input} < {limit}",
                f"take fewer than {limit} elements, or sort with another op",
            )
        return None

    def _check_resize_axes_iota(self, node, scope, schema):
        axes = _attribute(node, "axes", None)
        scales = _input(node, schema, "scales")
        if not axes or scales is None or scope.is_constant(scales):
            return None
        shape = scope.shape(node.input[0])
        if shape is None:
            return _Finding(
                "conditional",
                f"with scales from a tensor, TensorRT {self.version} needs Resize's axes to be 0..rank-1; the input's rank is unknown here",
                CONFIRM_FIX,
            )
        rank = len(shape)
        if [a % rank for a in axes] == list(range(rank)):
            return None
        return _Finding(
            "unsupported",
            f"axes={axes} with scales from tensor '{scales}'; TensorRT {self.version} then needs axes 0..{rank - 1} in order",
            "give scales for every axis (no axes attribute), or make scales a constant",
        )

    def _check_static_shape(self, node, scope, schema, input: str):
        tensor = _input(node, schema, input)
        shape = scope.shape(tensor) if tensor else None
        if shape is None:
            return _Finding(
                "conditional",
                f"TensorRT {self.version} needs {input} of {node.op_type} to have static dimensions; its shape is unknown here",
                CONFIRM_FIX,
            )
        if all(isinstance(d, int) and d > 0 for d in shape):
            return None
        return _Finding(
            "unsupported",
            f"input '{input}' (tensor '{tensor}') has dynamic dimensions {shape}; TensorRT {self.version} needs them static",
            "give that tensor a static shape (fixed sizes in the model, or a fixed input shape)",
        )

    def _check_input_rank(self, node, scope, schema, input: str, ranks: list[int]):
        tensor = _input(node, schema, input)
        shape = scope.shape(tensor) if tensor else None
        if shape is None:
            return _Finding(
                "conditional",
                f"TensorRT {self.version} takes {node.op_type} only with a rank-{' or '.join(map(str, ranks))} "
                f"{input}; its rank is unknown here",
                CONFIRM_FIX,
            )
        if len(shape) in ranks:
            return None
        return _Finding(
            "unsupported",
            f"input '{input}' has rank {len(shape)}; TensorRT {self.version} takes {node.op_type} only with rank "
            f"{' or '.join(map(str, ranks))}",
            "reshape the input to a rank TensorRT takes before this node",
        )

    def _check_symmetric_pads(self, node, scope, schema, attribute: str):
        pads = _attribute(node, attribute, schema)
        if not pads:
            return None
        half = len(pads) // 2
        if pads[:half] == pads[half:]:
            return None
        return _Finding(
            "unsupported",
            f"{attribute}={pads} differ at the beginning and end; TensorRT {self.version} needs them equal",
            "pad symmetrically in the layer, or pad explicitly with a Pad node before it",
        )

    def _check_same_bidirectional_activations(self, node, scope, schema):
        if _attribute(node, "direction", schema) != "bidirectional":
            return None
        activations = _attribute(node, "activations", None)
        if not activations:
            return None
        half = len(activations) // 2
        if activations[:half] == activations[half:]:
            return None
        return _Finding(
            "unsupported",
            f"bidirectional {node.op_type} with different forward and reverse activations {activations}",
            "use the same activations in both directions",
        )

    def _check_ignored_attribute(self, node, scope, schema, attribute: str):
        if not _has_attribute(node, attribute):
            return None
        return _Finding(
            "conditional",
            f"{attribute}={_attribute(node, attribute, schema)} is ignored by TensorRT: its random values differ from other runtimes'",
            "do not rely on reproducible random values from the engine",
        )

    def _check_static_axis_dim(self, node, scope, schema, attribute: str):
        axis = _attribute(node, attribute, schema)
        shape = scope.shape(node.input[0]) if node.input else None
        if shape is None or axis is None:
            return _Finding(
                "conditional",
                f"TensorRT {self.version} needs the {attribute} dimension of {node.op_type}'s input to be static; it is unknown here",
                CONFIRM_FIX,
            )
        dim = shape[axis % len(shape)] if shape else None
        if isinstance(dim, int) and dim > 0:
            return None
        return _Finding(
            "unsupported",
            f"the {attribute} dimension ({dim}) of {node.op_type}'s input is dynamic; TensorRT {self.version} needs it static",
            "make that dimension static in the model",
        )

    def _check_if_branch_outputs(self, node, scope, schema):
        branches = dict(_subgraphs(node))
        then_branch, else_branch = branches.get("then_branch"), branches.get("else_branch")
        if then_branch is None or else_branch is None:
            return None
        then_names = [o.name for o in then_branch.output]
        shared = sorted(set(then_names) & {o.name for o in else_branch.output})
        if shared:
            return _Finding(
                "unsupported",
                f"both branches name their outputs {shared}; TensorRT {self.version} needs different names",
                "rename one branch's outputs (e.g. with an Identity node)",
            )
        for then_out, else_out in zip(then_branch.output, else_branch.output):
            then_type, else_type = then_out.type, else_out.type
            if then_type.HasField("tensor_type") and else_type.HasField("tensor_type"):
                a, b = then_type.tensor_type, else_type.tensor_type
                if a.HasField("shape") and b.HasField("shape") and len(a.shape.dim) != len(b.shape.dim):
                    return _Finding(
                        "unsupported",
                        f"branch outputs '{then_out.name}' and '{else_out.name}' have ranks {len(a.shape.dim)} and "
                        f"{len(b.shape.dim)}; TensorRT {self.version} needs the same rank",
                        "make both branches return tensors of the same rank",
                    )
        return None

    def _check_runtime_weights(self, node, scope, schema, input: str):
        tensor = _input(node, schema, input)
        if tensor is None or scope.is_constant(tensor):
            return None
        shape = scope.shape(tensor)
        if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
            return _Finding(
                "unsupported",
                f"weights '{input}' come from tensor '{tensor}' and their shape ({shape or 'unknown'}) is not static; "
                "TensorRT needs the output-channel and kernel dimensions when it builds the layer",
                "give the weights a static shape, or " + FOLD_FIX,
            )
        return _Finding(
            "conditional",
            f"weights '{input}' come from tensor '{tensor}', not an initializer: TensorRT {self.version} takes runtime "
            "weights of a static shape, but some 10.x parsers then also require the bias to be an initializer, and "
            "TensorRT 8.x refuses them",
            "if the weights are fixed, " + FOLD_FIX + "; otherwise " + CONFIRM_FIX,
        )

    # -- element types

    def _element_types(self, node, scope: _Scope, entry: dict[str, Any]) -> list[_Finding]:
        from onnx import TensorProto

        findings: list[_Finding] = []
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
                findings.append(_Finding("unsupported", f"{role} '{tensor}' is {what}; TensorRT takes only dense tensors", NON_TENSOR_FIX))
                continue
            elem = type_proto.tensor_type.elem_type
            if elem == TensorProto.UNDEFINED:
                continue
            onnx_name = TensorProto.DataType.Name(elem)
            name = ONNX_TO_TABLE_TYPE.get(onnx_name)
            if name is None or name not in self.table.data_types:
                findings.append(
                    _Finding(
                        "unsupported",
                        f"{role} '{tensor}' has element type {onnx_name}, which TensorRT {self.version} does not take",
                        ELEMENT_TYPE_FIX,
                    )
                )
            elif name in self.table.limited_types:
                findings.append(
                    _Finding(
                        "conditional",
                        f"{role} '{tensor}' is {onnx_name}: TensorRT casts it to FLOAT, clamping to +-FLT_MAX",
                        "use float32 in the model (e.g. .float() instead of .double())",
                    )
                )
            elif name in self.table.io_only_types and tensor not in scope.network_io:
                findings.append(
                    _Finding(
                        "unsupported",
                        f"{role} '{tensor}' is {onnx_name} inside the network; TensorRT takes {onnx_name} only as a "
                        "network input or output",
                        "cast to int32 or float before this node; quantize with INT8 Q/DQ, not UINT8",
                    )
                )
            elif name in self.table.quantized_types and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                findings.append(
                    _Finding(
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
                    _Finding(
                        "conditional",
                        f"input '{node.input[0]}' is {first_name}; TensorRT {self.version}'s table lists "
                        f"{node.op_type} for {', '.join(entry['types'])} only",
                        f"cast the input to one of {', '.join(entry['types'])} before this node, or " + CONFIRM_FIX,
                    )
                )
        return findings


class _FunctionGraph:
    """A local function seen as a graph: its nodes, no initializers, no declared types."""

    def __init__(self, function):
        self.node = function.node
        self.initializer: list[Any] = []
        self.input: list[Any] = []
        self.output: list[Any] = []
        self.value_info: list[Any] = []


def _verdict(findings: Iterable[_Finding]) -> tuple[Status, str, str]:
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
    typed, inference_note = _infer_types(model)
    graph = typed.graph
    network_io = frozenset([i.name for i in graph.input] + [o.name for o in graph.output])
    scope = _Scope(
        graph=graph,
        prefix="",
        model_dir=model_dir,
        constants={},
        types={},
        producers={},
        network_io=network_io,
        used=frozenset(_used_names(graph)),
        local_functions={(f.domain, f.name): f for f in model.functions},
    )
    scope.add_graph(graph)
    # A model without a default-domain import has no standard ops whose version could matter.
    checker = _Checker(table, opset if opset is not None else table.opset_max, plugins)
    nodes: list[NodeReport] = []
    raw_names: list[str] = []
    top_level: list[int] = []

    def visit(current: _Scope, is_top: bool) -> None:
        for node in current.graph.node:
            status, reason, fix = _verdict(checker.check(node, current))
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
            for attribute, subgraph in _subgraphs(node):
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


def default_opset(model) -> int | None:
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return entry.version
    return None


# --------------------------------------------------------------------------- TensorRT's parser


@dataclass(frozen=True)
class ParserError:
    """One error from TensorRT's ONNX parser; ``node_index`` is -1 when it names no node."""

    node_index: int
    node_name: str
    op_type: str
    message: str


def _run_parser(path: Path) -> tuple[bool, list[ParserError], str]:
    """Parse with TensorRT's ONNX parser (strongly typed network, as the build uses) and collect its errors."""
    import tensorrt as trt
    from polygraphy.backend.trt import create_network, get_trt_logger

    # The builder owns the network: it stays referenced until the parser's errors are read.
    builder, network = create_network(strongly_typed=True)
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
    """Node verdicts from the parser's result; the static table speaks only for nodes the parser never reached.

    TensorRT's parser imports nodes in order and stops importing at the first failure, so nodes
    before it are supported, nodes with an error are unsupported with the parser's message, and
    nodes after it keep the static check's verdict, marked as such.
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

    first_failure = min(failed, default=len(nodes))
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
        elif position < first_failure:
            merged.append(node.model_copy(update={"status": "supported", "reason": "", "fix": ""}))
        else:
            prefix = f"not imported: TensorRT's parser stops at the first failing node ({nodes[first_failure].name})"
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
    if first_failure < len(nodes):
        notes.append(f"nodes after {nodes[first_failure].name} were not imported by the parser; their verdicts come from the static table")
    return merged, notes


def _tensorrt_importable() -> bool:
    try:
        return importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------- the stage


def analyse(onnx_path: str, plugins: Sequence[str], tensorrt_version: str | None, use_tensorrt: bool | None) -> CompatibilityReport:
    """The whole check, in the current process; ``check_ops`` runs this in a child process."""
    path = Path(onnx_path)
    model = _load_model(path)
    opset = default_opset(model)
    notes: list[str] = []

    parser_outcome = None
    if use_tensorrt is not False:
        if not _tensorrt_importable():
            if use_tensorrt:
                raise StageError(
                    STAGE,
                    "TensorRT is not installed, so its parser cannot check the model; install TensorRT or check "
                    "against the static table (use_tensorrt=False / `trtforge check` without TensorRT)",
                )
        else:
            try:
                parser_outcome = _run_parser(path)
            except Exception as err:
                if use_tensorrt:
                    raise StageError(STAGE, f"TensorRT's parser could not start: {type(err).__name__}: {err}") from None
                notes.append(f"TensorRT is installed but its parser could not start ({type(err).__name__}: {err}); used the static table")
            if parser_outcome is not None and tensorrt_version and use_tensorrt is None:
                installed = parser_outcome[2]
                if _version_key(installed) != _version_key(tensorrt_version):
                    notes.append(
                        f"TensorRT {installed} is installed but the target wants {tensorrt_version}; checked against "
                        f"the static table for {tensorrt_version} instead of this parser"
                    )
                    parser_outcome = None

    if parser_outcome is None:
        table, table_note = load_table(tensorrt_version)
        static = static_check(model, path.parent, table, plugins)
        nodes = static.nodes
        notes = static.notes + ([table_note] if table_note else []) + notes
        source: Source = "static-table"
        version = table.tensorrt_version
    else:
        parsed, errors, version = parser_outcome
        try:
            table, table_note = load_table(version)
        except StageError:
            table, _ = load_table(None)
            table_note = f"trtforge has no operator table for TensorRT {version} or older; used {table.tensorrt_version}'s"
        static = static_check(model, path.parent, table, plugins)
        nodes, merge_notes = merge_parser_result(static, parsed, errors, plugins)
        source = "tensorrt-parser"
        notes = [f"source: TensorRT {version}'s ONNX parser (polygraphy, strongly typed network)"] + merge_notes + notes
        if merge_notes and table_note:
            notes.append(table_note)
        if tensorrt_version and _version_key(version) != _version_key(tensorrt_version):
            notes.append(f"the target wants TensorRT {tensorrt_version}; this parser is {version}")
    return CompatibilityReport(
        model=str(path),
        source=source,
        tensorrt_version=version,
        opset=opset,
        nodes=nodes,
        summary=summarize(nodes),
        notes=notes,
    )


def check_ops(
    onnx_path: Path,
    *,
    plugins: Sequence[str] = (),
    tensorrt_version: str | None = None,
    use_tensorrt: bool | None = None,
    timeout_s: float = 600,
) -> CompatibilityReport:
    """Check every node of ``onnx_path`` against TensorRT; never raises for unsupported nodes (see ``raise_if_unsupported``).

    ``use_tensorrt``: None uses TensorRT's parser when ``tensorrt`` is importable (and matches
    ``tensorrt_version``), else the static table; True requires the parser; False uses the table.
    ``plugins`` are op domains or op types served by TensorRT plugins (the spec's ``plugins``).
    """
    from trtforge.isolation import run_isolated

    path = Path(onnx_path)
    if not path.is_file():
        raise StageError(STAGE, f"ONNX model {path} does not exist: pass the path to an exported .onnx file")
    return run_isolated(STAGE, analyse, str(path), list(plugins), tensorrt_version, use_tensorrt, timeout_s=timeout_s)
