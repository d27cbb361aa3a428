"""Reading the model to check: through the project's untrusted-ONNX loader, then onnx's type inference."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trtforge.safeio import STANDARD_DOMAINS, OnnxModelError, load_onnx_safely

LARGE_INITIALIZER_BYTES = 1 << 16


def load_model(path: Path, plugins: Sequence[str]):
    """``path`` checked by ``load_onnx_safely``, its external data checked but left unread.

    The loader refuses nodes of an undeclared custom domain. Check-ops runs no operator code and
    reports such nodes one by one (unsupported, with the plugin fix), so when the loader refuses
    the model and it imports custom domains, it is loaded again with those domains let through:
    every other refusal (external data, tensor sizes, the ONNX checker) still stands.
    """
    try:
        return load_onnx_safely(path, plugins=plugins, load_external_data=False)
    except OnnxModelError:
        undeclared = _custom_domains(path) - set(plugins)
        if not undeclared:
            raise
    return load_onnx_safely(path, plugins=[*plugins, *sorted(undeclared)], load_external_data=False)


def _custom_domains(path: Path) -> set[str]:
    """The non-standard domains ``path`` imports, or none when it does not even parse (the loader said why)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return set()
    imports = list(model.opset_import) + [entry for function in model.functions for entry in function.opset_import]
    return {entry.domain for entry in imports} - STANDARD_DOMAINS


def infer_types(model) -> tuple[Any, str | None]:
    """The model with inferred value types, and a note when inference failed (the declared types are all there is)."""
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
