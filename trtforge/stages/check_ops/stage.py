"""The check-ops stage: load the model safely, then judge every node with TensorRT's parser or the static table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from trtforge.errors import StageError
from trtforge.onnxfacts import default_opset
from trtforge.stages.check_ops.loader import load_model
from trtforge.stages.check_ops.parser import NOT_INSTALLED, merge_parser_result, parser_unavailable_reason, run_parser
from trtforge.stages.check_ops.report import STAGE, CompatibilityReport, Source, summarize
from trtforge.stages.check_ops.static import static_check
from trtforge.stages.check_ops.table import load_table, version_key


def analyse(onnx_path: str, plugins: Sequence[str], tensorrt_version: str | None, use_tensorrt: bool | None) -> CompatibilityReport:
    """The whole check, in the current process; ``check_ops`` runs this in a child process."""
    path = Path(onnx_path)
    model = load_model(path, plugins)
    opset = default_opset(model)
    notes: list[str] = []

    parser_outcome = None
    unavailable = None
    if use_tensorrt is not False:
        unavailable = parser_unavailable_reason()
        if unavailable is None:
            try:
                parser_outcome = run_parser(path)
            except StageError as err:
                unavailable = str(err).removeprefix(f"{STAGE}: ")
            except Exception as err:
                unavailable = f"TensorRT is installed but its parser could not start ({type(err).__name__}: {err})"
        if unavailable is not None and use_tensorrt:
            raise StageError(
                STAGE,
                f"{unavailable}, so its parser cannot check the model: run the check on a GPU worker with TensorRT "
                "installed, or check against the static table (use_tensorrt=False)",
            )
        if unavailable not in (None, NOT_INSTALLED):
            notes.append(f"{unavailable}; checked against the static table instead of TensorRT's parser")
        if parser_outcome is not None and tensorrt_version and use_tensorrt is None:
            installed = parser_outcome[2]
            if version_key(installed) != version_key(tensorrt_version):
                notes.append(
                    f"TensorRT {installed} is installed but the target wants {tensorrt_version}; checked against "
                    f"the static table for {tensorrt_version} instead of this parser"
                )
                parser_outcome = None

    if parser_outcome is None:
        try:
            table, table_note = load_table(tensorrt_version)
        except StageError as err:
            if unavailable in (None, NOT_INSTALLED):
                raise
            raise StageError(STAGE, f"{unavailable}; and {str(err).removeprefix(f'{STAGE}: ')}") from None
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
            table_note = (
                f"trtforge has no operator table for TensorRT {version}'s major version; the nodes the parser did not "
                f"import were judged against TensorRT {table.tensorrt_version}'s table"
            )
        static = static_check(model, path.parent, table, plugins)
        nodes, merge_notes = merge_parser_result(static, parsed, errors, plugins)
        source = "tensorrt-parser"
        notes = [f"source: TensorRT {version}'s ONNX parser (polygraphy, strongly typed network)"] + merge_notes + notes
        if merge_notes and table_note:
            notes.append(table_note)
        if tensorrt_version and version_key(version) != version_key(tensorrt_version):
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

    ``use_tensorrt``: None uses TensorRT's parser where it can run (TensorRT installed, and a GPU:
    creating a TensorRT builder needs one, so the parser runs on GPU workers) and is the release
    ``tensorrt_version`` names, else the static table, with a note saying why; True requires the
    parser; False uses the table. The table is the one ``table_version_for(tensorrt_version)``
    picks: a TensorRT major version without a table is a ``StageError``. ``plugins`` are op
    domains or op types served by TensorRT plugins (the spec's ``plugins``).

    Check the graph the engine is built from: for a precision target, the converted ONNX (its
    int8/fp8 Q/DQ or fp16/bf16 casts), not the fp32 export.
    """
    from trtforge.isolation import run_isolated

    path = Path(onnx_path)
    if not path.is_file():
        raise StageError(STAGE, f"ONNX model {path} does not exist: pass the path to an exported .onnx file")
    return run_isolated(STAGE, analyse, str(path), list(plugins), tensorrt_version, use_tensorrt, timeout_s=timeout_s)
