"""Turn TensorRT's published ONNX operator table (Markdown) into trtforge's operator data file.

    python tools/tensorrt_ops_table.py trtforge/data/tensorrt-10.1-onnx-operator-support.md --tensorrt-version 10.1
    python tools/tensorrt_ops_table.py trtforge/data/tensorrt-10.1-onnx-operator-support.md --tensorrt-version 10.1 --check
    python tools/tensorrt_ops_table.py --check

The table is onnx-tensorrt's ``docs/operators.md`` for that release, saved in trtforge/data as
``tensorrt-<version>-onnx-operator-support.md``. Each restriction sentence is matched against the
phrasings below and turned into a machine check that ``trtforge.stages.check_ops`` runs (one rule
per kind, ``trtforge/stages/check_ops/rules.py``); a sentence no phrasing matches is kept with
``"check": null`` and makes every node of that operator "conditional" until a phrasing is added
here. The document's own "TensorRT X.Y supports operators" sentence must name the major version
given with ``--tensorrt-version``. ``--check`` exits 1 when a committed data file differs from what
this script would write; without a source it checks every table committed in trtforge/data (the
test suite runs it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import onnx.defs

DATA_DIR = Path(__file__).resolve().parents[1] / "trtforge" / "data"
TABLE_PREFIX = "tensorrt_onnx_ops_"
SOURCE_NAME = r"tensorrt-(\d+\.\d+)-onnx-operator-support\.md"

TYPE_NAMES = {
    "FLOAT32": "FP32",
    "FLOAT16": "FP16",
    "BFLOAT16": "BF16",
}
KNOWN_TYPES = {"DOUBLE", "FP32", "FP16", "BF16", "INT32", "INT64", "FP8", "INT8", "INT4", "UINT8", "BOOL"}

# Slips in the published table, read as what the parser means. Each one is listed in the data file.
TYPE_CORRECTIONS = {"INF64": "INT64"}
NAME_CORRECTIONS = {("Dropout", "is_traning"): "training_mode", ("DeformConv", "input"): "X"}

# Restrictions TensorRT's parser enforces that the 10.x table does not state. TensorRT 8.x's table
# required Conv/ConvTranspose weights to be initializers; the 10.x parser accepts them as a tensor
# but builds the layer from their output-channel and kernel dimensions, so those must be static.
PARSER_RESTRICTIONS: dict[str, list[dict[str, Any]]] = {
    op: [
        {
            "text": "Weights `W` that are not an initializer must have a static shape; some 10.x parsers then "
            "also require the bias `B` to be an initializer",
            "check": {"kind": "runtime_weights", "input": "W"},
            "origin": "parser",
        }
    ]
    for op in ("Conv", "ConvTranspose")
}


def _backticked(text: str) -> list[str]:
    return re.findall(r"`(\w+)`", text)


def _schema(op: str, opset_max: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op, opset_max, "")
    except onnx.defs.SchemaError:
        return None


def _role(schema: onnx.defs.OpSchema | None, name: str) -> str | None:
    if schema is None:
        return None
    if name in [i.name for i in schema.inputs]:
        return "input"
    if name in [o.name for o in schema.outputs]:
        return "output"
    if name in schema.attributes:
        return "attribute"
    return None


def _attribute_default(schema: onnx.defs.OpSchema, name: str) -> Any:
    default = schema.attributes[name].default_value
    value = onnx.helper.get_attribute_value(default) if default.type else None
    return value.decode() if isinstance(value, bytes) else value


def _check_for(op: str, sentence: str, schema: onnx.defs.OpSchema | None) -> dict[str, Any] | None:
    """The machine check for one restriction sentence, or None where no phrasing matches."""

    def name(raw: str) -> str:
        return NAME_CORRECTIONS.get((op, raw), raw)

    def require(raw: str, role: str) -> str:
        resolved = name(raw)
        if _role(schema, resolved) != role:
            raise SystemExit(f"{op}: restriction {sentence!r} names {resolved!r}, which is not an ONNX {role} of {op}")
        return resolved

    if m := re.fullmatch(
        r"`(\w+)`(?: input)? must be (?:an initializer|a constant tensor|a build-time constant)"
        r"( and evaluate to False)?",
        sentence,
    ):
        check: dict[str, Any] = {"kind": "initializer_input", "input": require(m[1], "input")}
        if m[2]:
            check["equals"] = False
        return check
    if m := re.fullmatch(r"`(\w+)`(?: attribute)? must be (\d+)", sentence):
        if _role(schema, name(m[1])) == "input" and m[2] == "0":
            return {"kind": "zero_input", "input": require(m[1], "input")}
        return {"kind": "attribute_in", "attribute": require(m[1], "attribute"), "values": [int(m[2])]}
    if m := re.fullmatch(r"`(\w+)` must be zero", sentence):
        return {"kind": "zero_input", "input": require(m[1], "input")}
    if m := re.fullmatch(r"`(\w+)` must be empty or all ones", sentence):
        return {"kind": "all_ones", "attribute": require(m[1], "attribute")}
    if re.fullmatch(r"2D or 3D pooling only", sentence, flags=re.IGNORECASE):
        return {"kind": "spatial_rank", "ranks": [2, 3]}
    if m := re.fullmatch(r"`(\w+)` output tensor unsupported", sentence):
        return {"kind": "unused_output", "output": require(m[1], "output")}
    if re.fullmatch(r"Only the first output `\w+` is supported", sentence):
        return {"kind": "only_first_output"}
    if m := re.fullmatch(r"`(\w+)` input must be less than (\d+)", sentence):
        return {"kind": "input_below", "input": require(m[1], "input"), "limit": int(m[2])}
    if m := re.fullmatch(r"`(\w+)` is not supported", sentence):
        attribute = require(m[1], "attribute")
        return {"kind": "attribute_in", "attribute": attribute, "values": [_attribute_default(schema, attribute)]}
    if m := re.fullmatch(r"((?:`\w+`(?:, and |, | and )?)+) attributes are unsupported", sentence):
        return {"kind": "attributes_absent", "attributes": [require(a, "attribute") for a in _backticked(m[1])]}
    resize_lists = {
        "Supported resize transformation modes": "coordinate_transformation_mode",
        "Supported resize modes": "mode",
        "Supported nearest modes": "nearest_mode",
        "Supported aspect ratio policy": "keep_aspect_ratio_policy",
    }
    if m := re.fullmatch(r"([\w ]+): (.+)", sentence):
        if m[1] in resize_lists:
            return {
                "kind": "attribute_in",
                "attribute": require(resize_lists[m[1]], "attribute"),
                "values": _backticked(m[2]),
            }
    if re.fullmatch(r"When `scales` is a tensor input, `axes` must be an iota vector of length rank\(input\)", sentence):
        return {"kind": "resize_axes_iota"}
    if sentence == "Antialiasing is not supported":
        return {"kind": "attribute_in", "attribute": require("antialias", "attribute"), "values": [0]}
    if m := re.fullmatch(r"`(\w+)` must have static dimensions", sentence):
        return {"kind": "static_shape", "input": require(m[1], "input")}
    if m := re.fullmatch(r"Input must be (\d)D input", sentence):
        return {"kind": "input_rank", "input": schema.inputs[0].name, "ranks": [int(m[1])]}
    if m := re.fullmatch(r"`(\w+)` must have 1D or 2D spatial dimensions", sentence):
        return {"kind": "input_rank", "input": require(m[1], "input"), "ranks": [3, 4]}
    if sentence == "`pads` for the beginning and end along each spatial axis must be the same":
        return {"kind": "symmetric_pads", "attribute": require("pads", "attribute")}
    if re.fullmatch(r"For bidirectional \w+, activation functions must be the same for both the forward and reverse pass", sentence):
        return {"kind": "same_bidirectional_activations"}
    if m := re.fullmatch(r"`(\w+)` value is ignored by TensorRT", sentence):
        return {"kind": "ignored_attribute", "attribute": require(m[1], "attribute")}
    if sentence == "`axis` dimension of input must be a build-time constant":
        return {"kind": "static_axis_dim", "attribute": require("axis", "attribute")}
    if sentence == "Output tensors of the two conditional branches must have the same rank and must have different names":
        return {"kind": "if_branch_outputs"}
    return None


def _sentences(text: str) -> list[str]:
    text = text.replace("<br />", "\n").replace("\\.", ".")
    parts = []
    for line in text.splitlines():
        parts += re.split(r"(?<=\.)\s+(?=[A-Z`])", line)
    return [p.strip().rstrip(".").strip() for p in parts if p.strip().rstrip(".").strip()]


def _types(cell: str, op: str, corrections: list[str]) -> list[str]:
    types = []
    for raw in (t.strip() for t in cell.split(",")):
        if not raw:
            continue
        name = TYPE_CORRECTIONS.get(raw, raw)
        if name != raw:
            corrections.append(f"{op}: type {raw!r} read as {name!r}")
        if name not in KNOWN_TYPES:
            raise SystemExit(f"{op}: unknown type {raw!r} in the table; add it to KNOWN_TYPES or TYPE_CORRECTIONS")
        types.append(name)
    return types


def build_table(source: Path, tensorrt_version: str) -> dict[str, Any]:
    text = source.read_text()
    range_match = re.search(r"range of opset (\d+) to opset (\d+)", text)
    if range_match is None:
        raise SystemExit(f"{source}: no 'range of opset N to opset M' sentence")
    opset_min, opset_max = int(range_match[1]), int(range_match[2])
    statement = re.search(r"^TensorRT ([\d.]+) supports operators[^\n]*", text, flags=re.MULTILINE)
    if statement is not None and statement[1].split(".")[0] != tensorrt_version.split(".")[0]:
        raise SystemExit(
            f"{source} says {statement[0].split(' supports')[0]!r}, not TensorRT {tensorrt_version}'s major version: "
            "pass the docs/operators.md of that release"
        )
    types_match = re.search(r"supports the following ONNX data types: ([^\n]+)", text)
    data_types = [TYPE_NAMES.get(t, t) for t in re.findall(r"[A-Z0-9]+", types_match[1].replace(" and ", " "))]
    notes = [n.strip() for n in re.findall(r"^> Note: (.+)$", text, flags=re.MULTILINE)]
    quantized: list[str] = []
    io_only: list[str] = []
    limited: list[str] = []
    for note in notes:
        if m := re.match(r"(.+?) are treated as `Quantized Types`", note):
            quantized = re.findall(r"[A-Z0-9]+", m[1].replace(" and ", " "))
        if m := re.match(r"(\w+) is only supported as network input or output", note):
            io_only.append(m[1])
        if m := re.match(r"There is limited support for (\w+) type", note):
            limited.append(m[1])

    corrections: list[str] = []
    operators: dict[str, Any] = {}
    in_matrix = False
    for line in text.splitlines():
        if line.startswith("## Operator Support Matrix"):
            in_matrix = True
            continue
        if not in_matrix or not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in ("Operator", "") or set(cells[0]) <= {"-"}:
            continue
        op = cells[0]
        supported = cells[1].startswith("Y")
        schema = _schema(op, opset_max)
        restrictions = []
        for sentence in _sentences(cells[3] if len(cells) > 3 else ""):
            restrictions.append({"text": sentence, "check": _check_for(op, sentence, schema), "origin": "table"})
        for raw in _backticked(cells[3] if len(cells) > 3 else ""):
            if (op, raw) in NAME_CORRECTIONS:
                corrections.append(f"{op}: `{raw}` read as `{NAME_CORRECTIONS[(op, raw)]}`")
        if supported:
            restrictions += PARSER_RESTRICTIONS.get(op, [])
        operators[op] = {
            "supported": supported,
            "types": _types(cells[2], op, corrections) if len(cells) > 2 else [],
            "restrictions": restrictions,
        }
    if not operators:
        raise SystemExit(f"{source}: no rows under '## Operator Support Matrix'")
    return {
        "tensorrt_version": tensorrt_version,
        "source": source.name,
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "source_statement": statement[0] if statement else None,
        "generated_by": "tools/tensorrt_ops_table.py",
        "opset_min": opset_min,
        "opset_max": opset_max,
        "data_types": data_types,
        "quantized_types": quantized,
        "io_only_types": io_only,
        "limited_types": limited,
        "notes": notes,
        "corrections": sorted(set(corrections)),
        "operators": operators,
    }


def render(table: dict[str, Any]) -> str:
    return json.dumps(table, indent=1, ensure_ascii=False) + "\n"


def _out_of_date(source: Path, tensorrt_version: str, output: Path) -> bool:
    current = output.read_text() if output.is_file() else ""
    if current == render(build_table(source, tensorrt_version)):
        return False
    print(
        f"{output} is out of date with {source}; regenerate it with:\n"
        f"  python tools/tensorrt_ops_table.py {source} --tensorrt-version {tensorrt_version}",
        file=sys.stderr,
    )
    return True


def check_committed() -> int:
    """Every committed operator table against the Markdown it was generated from: 0 when all match."""
    sources = {m[1]: path for path in sorted(DATA_DIR.glob("*.md")) if (m := re.fullmatch(SOURCE_NAME, path.name))}
    tables = {path.stem.removeprefix(TABLE_PREFIX): path for path in sorted(DATA_DIR.glob(f"{TABLE_PREFIX}*.json"))}
    failed = False
    for version in sorted(set(tables) - set(sources)):
        print(
            f"{tables[version]} has no source beside it: save that release's docs/operators.md as {DATA_DIR}/tensorrt-{version}-onnx-operator-support.md",
            file=sys.stderr,
        )
        failed = True
    for version, source in sources.items():
        failed |= _out_of_date(source, version, DATA_DIR / f"{TABLE_PREFIX}{version}.json")
    if not sources:
        print(f"no tensorrt-<version>-onnx-operator-support.md in {DATA_DIR}", file=sys.stderr)
        failed = True
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, nargs="?", help="onnx-tensorrt docs/operators.md of one TensorRT release")
    parser.add_argument("--tensorrt-version", help="the release the table describes, e.g. 10.1 (required with a source)")
    parser.add_argument("--output", type=Path, help="default: trtforge/data/tensorrt_onnx_ops_<version>.json")
    parser.add_argument("--check", action="store_true", help="exit 1 if the data file is not what this script writes")
    args = parser.parse_args(argv)
    if args.source is None:
        if not args.check:
            parser.error("give a source, or --check alone to check every committed table")
        return check_committed()
    if args.tensorrt_version is None:
        parser.error("--tensorrt-version is required with a source")
    output = args.output or DATA_DIR / f"{TABLE_PREFIX}{args.tensorrt_version}.json"
    if args.check:
        return 1 if _out_of_date(args.source, args.tensorrt_version, output) else 0
    rendered = render(build_table(args.source, args.tensorrt_version))
    partial = output.with_name(output.name + ".partial")
    partial.write_text(rendered)
    partial.replace(output)
    unchecked = sorted(
        f"{op}: {r['text']}" for op, entry in json.loads(rendered)["operators"].items() for r in entry["restrictions"] if r["check"] is None
    )
    print(f"wrote {output}: {len(json.loads(rendered)['operators'])} operators")
    if unchecked:
        print("restrictions without a machine check (their nodes report 'conditional'):")
        print("\n".join(f"  {line}" for line in unchecked))
    return 0


if __name__ == "__main__":
    sys.exit(main())
