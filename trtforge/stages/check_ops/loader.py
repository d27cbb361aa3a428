"""Reading the model to check: through the project's untrusted-ONNX loader, then onnx's type inference."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from trtforge.onnxfacts import imported_domains
from trtforge.safeio import STANDARD_DOMAINS, OnnxModelError, load_onnx_safely


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
    return imported_domains(model) - STANDARD_DOMAINS
