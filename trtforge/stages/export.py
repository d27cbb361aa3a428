"""Stage 'export': PyTorch checkpoint to a checked ONNX model with the spec's names and dynamic dims."""

from __future__ import annotations

import contextlib
import io
import re
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from trtforge.errors import SpecError, StageError
from trtforge.hashing import sha256_file
from trtforge.isolation import run_isolated
from trtforge.modelload import load_model
from trtforge.numeric import SHAPE_LEVELS, onnx_runner, random_inputs
from trtforge.safeio import OnnxModelError, atomic_output, load_onnx_safely
from trtforge.serving import check_class_count, serving_info, stamp_onnx
from trtforge.spec import ModelSpec

STAGE = "export"
EXPORTED_GRAPH = "model.onnx"


class ExportResult(BaseModel):
    onnx_path: Path
    sha256: str
    opset: int
    node_count: int
    max_abs_diff: dict[str, float]
    seconds: float


def frozen_dims(spec: ModelSpec, model) -> list[str]:
    """Each dim the spec names dynamic that the ONNX ``model`` has as a fixed size: 'input pixels dim 2 (height) is 224'."""
    graph_inputs = {value.name: value for value in model.graph.input}
    frozen = []
    for inp in spec.inputs:
        value = graph_inputs.get(inp.name)
        if value is None:
            continue
        for index, (declared, dim) in enumerate(zip(inp.shape, value.type.tensor_type.shape.dim)):
            if isinstance(declared, str) and dim.HasField("dim_value"):
                frozen.append(f"input {inp.name} dim {index} ({declared}) is {dim.dim_value}")
    return frozen


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


def _named_outputs(spec: ModelSpec, model, args):
    """The model as the exporter and the numeric check should see it: a tensor or a tuple of tensors, in the
    spec's output order. A dict (DeepLabV3's OrderedDict of 'out' and 'aux') is mapped by the spec's names.

    Also returns the dynamic shapes for it: a wrapper's ``forward(*inputs)`` is one variadic parameter
    to torch.export, so its inputs' shapes are one tuple inside the tuple."""
    import torch

    with torch.no_grad():
        sample = model(*args)
    names = [o.name for o in spec.outputs]
    if isinstance(sample, torch.Tensor):
        return model, _dynamic_shapes(spec)
    if isinstance(sample, Mapping):
        keys = [str(k) for k in sample]
        absent = [n for n in names if n not in sample]
        if absent:
            raise StageError(
                STAGE,
                f"{spec.model!r} returns a dict with keys {keys}, and the spec's outputs {absent} are not among them: "
                f"name the spec's outputs after the keys to export, in the order wanted (outputs: [{{name: {keys[0]}}}])",
            )

        class SelectOutputs(torch.nn.Module):
            """The wrapped model's dict outputs as a tuple in the spec's order."""

            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *inputs):
                out = self.model(*inputs)
                return tuple(out[name] for name in names)

        return SelectOutputs().eval(), (_dynamic_shapes(spec),)
    if isinstance(sample, (tuple, list)):
        kinds = [type(v).__name__ for v in sample]
        if not all(isinstance(v, torch.Tensor) for v in sample):
            raise StageError(
                STAGE,
                f"{spec.model!r} returns a {type(sample).__name__} of {kinds}: export needs tensors; return a tensor, a tuple "
                "of tensors or a dict of tensors from forward()",
            )
        if len(sample) != len(names):
            raise StageError(
                STAGE,
                f"{spec.model!r} returns {len(sample)} outputs and the spec names {len(names)} ({names}): list one name "
                "per output, in the order forward() returns them",
            )
        return model, _dynamic_shapes(spec)
    raise StageError(
        STAGE,
        f"{spec.model!r} returns a {type(sample).__name__}: export needs a tensor, a tuple of tensors or a dict of tensors from forward()",
    )


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
CAUSE_LINES = 6


def root_cause(err: BaseException) -> str:
    """The innermost exception of ``err``'s chain, as plain text: torch.onnx wraps the real failure
    in a "Failed to export ... Next steps:" error whose own text says nothing about the model."""
    seen = {id(err)}
    inner = err
    while True:
        nxt = inner.__cause__ or (None if inner.__suppress_context__ else inner.__context__)
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        inner = nxt
    lines = [line.rstrip() for line in _ANSI.sub("", str(inner)).strip().splitlines()]
    kept = []
    for line in lines:
        if line.strip().lower().startswith(("next steps", "from user code", "set torch_logs", "for more information")):
            break
        if line.strip():
            kept.append(line.strip())
    text = " / ".join(kept[:CAUSE_LINES]) or type(inner).__name__
    return f"{type(inner).__name__}: {text}"


def _compare(spec: ModelSpec, candidate, reference) -> tuple[dict[str, float], str | None]:
    """Max abs difference per shape level, and the worst element beyond atol + rtol * |reference|, if any."""
    atol, rtol = spec.export.tolerance, spec.export.rtol
    names = [o.name for o in spec.outputs]
    diffs: dict[str, float] = {}
    worst: tuple[float, str] | None = None
    for offset, level in enumerate(SHAPE_LEVELS):
        feeds = random_inputs(spec.inputs, level, spec.export.seed + offset)
        level_max = 0.0
        for name, got, want in zip(names, candidate(feeds), reference(feeds)):
            got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
            error = np.abs(got - want)
            level_max = max(level_max, float(error.max(initial=0.0)))
            excess = error / (atol + rtol * np.abs(want))
            if excess.size == 0:
                continue
            index = np.unravel_index(int(np.argmax(excess)), excess.shape)
            if excess[index] > 1 and (worst is None or excess[index] > worst[0]):
                magnitude = float(np.abs(want).max())
                worst = (
                    float(excess[index]),
                    f"output '{name}' at the {level} shape, element {tuple(int(i) for i in index)}: ONNX {got[index]:.6g}, "
                    f"PyTorch {want[index]:.6g}, abs error {error[index]:.3g}, relative {error[index] / max(abs(want[index]), 1e-30):.3g}, "
                    f"allowed {atol:g} + {rtol:g} x {abs(want[index]):.4g} = {atol + rtol * abs(want[index]):.3g} "
                    f"(export.tolerance + export.rtol x |PyTorch|); the output's values reach {magnitude:.4g}",
                )
        diffs[level] = level_max
    return diffs, None if worst is None else worst[1]


def _stamp_serving(spec: ModelSpec, path: Path) -> None:
    """Write the serving contract into the model's metadata_props, after checking its class names against the outputs."""
    import onnx

    info = serving_info(spec)
    model = onnx.load(str(path), load_external_data=False)
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        shape: list[int | str] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
        try:
            check_class_count(info, output.name, shape)
        except SpecError as err:
            raise StageError(STAGE, str(err)) from None
    stamp_onnx(model, info)
    onnx.save(model, str(path))


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
    target = out_dir / EXPORTED_GRAPH
    example = random_inputs(spec.inputs, "opt", spec.export.seed)
    args = tuple(torch.from_numpy(example[i.name]) for i in spec.inputs)
    try:
        model, dynamic_shapes = _named_outputs(spec, model, args)
    except StageError:
        raise
    except Exception as err:
        raise StageError(STAGE, f"{spec.model!r} failed on the spec's inputs at the opt shape: {root_cause(err)}") from None
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
                    dynamic_shapes=dynamic_shapes,
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                )
            onnx.checker.check_model(str(partial), full_check=True)
        except Exception as err:
            raise StageError(STAGE, f"torch.onnx.export of {spec.model!r} failed: {root_cause(err)}") from None
        _stamp_serving(spec, partial)

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
        frozen = frozen_dims(spec, graph)
        if frozen:
            raise StageError(
                STAGE,
                f"the exported graph fixed dims the spec declares dynamic: {'; '.join(frozen)}. The model's forward() "
                "turned them into constants (a position-embedding grid of one size, a reshape to literal sizes): make "
                "them static in the spec's shape, or change the model to compute them from the input",
            )
        try:
            diffs, worst = _compare(spec, onnx_runner(partial, [o.name for o in spec.outputs]), _torch_reference(model))
        except Exception as err:
            raise StageError(STAGE, f"running the exported model failed: {root_cause(err)}") from None
        if worst is not None:
            raise StageError(
                STAGE,
                f"ONNX output differs from PyTorch beyond export.tolerance {spec.export.tolerance:g} + export.rtol "
                f"{spec.export.rtol:g} x |PyTorch| at {worst}. An error that grows with the values is float rounding "
                "(raise export.rtol); one far beyond it on small values points at an op the export changed",
            )
    return ExportResult(
        onnx_path=target,
        sha256=sha256_file(target),
        opset=spec.export.opset,
        node_count=len(graph.graph.node),
        max_abs_diff=diffs,
        seconds=time.perf_counter() - started,
    )
