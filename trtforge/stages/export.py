"""Stage 'export': PyTorch checkpoint to a checked ONNX model with the spec's names and dynamic dims."""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

from pydantic import BaseModel

from trtforge.errors import StageError
from trtforge.hashing import sha256_file
from trtforge.isolation import run_isolated
from trtforge.modelload import load_model
from trtforge.numeric import max_abs_diff_by_level, onnx_runner, random_inputs
from trtforge.safeio import OnnxModelError, atomic_output, load_onnx_safely
from trtforge.spec import ModelSpec

STAGE = "export"


class ExportResult(BaseModel):
    onnx_path: Path
    sha256: str
    opset: int
    node_count: int
    max_abs_diff: dict[str, float]
    seconds: float


def _dynamic_shapes(spec: ModelSpec):
    """One ``torch.export.Dim`` per dynamic dim name, shared by every input that uses it."""
    import torch

    dims = {}
    per_input = []
    for inp in spec.inputs:
        axes = {}
        for axis, dim in enumerate(inp.shape):
            if isinstance(dim, str):
                if dim not in dims:
                    bounds = inp.dynamic[dim]
                    dims[dim] = torch.export.Dim(dim, min=bounds.min, max=bounds.max)
                axes[axis] = dims[dim]
        per_input.append(axes or None)
    return tuple(per_input)


def _torch_reference(model):
    import torch

    def run(feeds):
        with torch.no_grad():
            out = model(*(torch.from_numpy(v) for v in feeds.values()))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().numpy() for o in outs]

    return run


def export_onnx(spec: ModelSpec, checkpoint: Path, out_dir: Path) -> ExportResult:
    """Export with torch.onnx (dynamo), check fully with onnx.checker, compare with PyTorch at min/opt/max.

    Runs in a child process under the spec's isolation limits: the exporter and the user's
    model code are native-heavy, and a crash there must fail only this stage.
    """
    return run_isolated(
        STAGE,
        _export_onnx_impl,
        spec,
        checkpoint,
        out_dir,
        timeout_s=spec.isolation.timeout_s,
        memory_mb=spec.isolation.memory_mb,
    )


def _export_onnx_impl(spec: ModelSpec, checkpoint: Path, out_dir: Path) -> ExportResult:
    import onnx
    import torch

    started = time.perf_counter()
    model = load_model(spec, checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "model.onnx"
    example = random_inputs(spec.inputs, "opt", spec.export.seed)
    args = tuple(torch.from_numpy(example[i.name]) for i in spec.inputs)
    with atomic_output(target) as partial:
        try:
            # The exporter prints its progress to stdout; keep the CLI's output (and --json) clean.
            with contextlib.redirect_stdout(io.StringIO()):
                torch.onnx.export(
                    model,
                    args,
                    str(partial),
                    input_names=[i.name for i in spec.inputs],
                    output_names=[o.name for o in spec.outputs],
                    opset_version=spec.export.opset,
                    dynamic_shapes=_dynamic_shapes(spec),
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                )
            onnx.checker.check_model(str(partial), full_check=True)
        except Exception as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise StageError(STAGE, f"torch.onnx.export of {spec.model!r} failed: {type(err).__name__}: {message}") from None

        try:
            graph = load_onnx_safely(partial, plugins=spec.plugins, load_external_data=False)
        except OnnxModelError as err:
            raise StageError(STAGE, str(err)) from None
        declared = [i.name for i in graph.graph.input]
        expected = [i.name for i in spec.inputs]
        if declared != expected:
            raise StageError(
                STAGE, f"exported inputs {declared} differ from the spec's {expected}: the model's forward() must take them in order"
            )
        try:
            diffs = max_abs_diff_by_level(spec, onnx_runner(partial, [o.name for o in spec.outputs]), _torch_reference(model))
        except Exception as err:
            raise StageError(STAGE, f"running the exported model failed: {type(err).__name__}: {err}") from None
        worst = max(diffs.values())
        if worst > spec.export.tolerance:
            level = max(diffs, key=diffs.get)
            raise StageError(
                STAGE,
                f"ONNX output differs from PyTorch by {worst:.3g} at the {level} shape, over export.tolerance "
                f"{spec.export.tolerance:g}; check for non-deterministic or data-dependent ops, or raise the tolerance",
            )
    return ExportResult(
        onnx_path=target,
        sha256=sha256_file(target),
        opset=spec.export.opset,
        node_count=len(graph.graph.node),
        max_abs_diff=diffs,
        seconds=time.perf_counter() - started,
    )
