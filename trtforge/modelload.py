"""Building the user's nn.Module from the spec and loading its weights safely.

Weights load only through safetensors or ``torch.load(weights_only=True)``: a checkpoint is
untrusted input, and a pickle that would run code is refused, never executed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trtforge.errors import CheckpointError, SpecError
from trtforge.spec import ModelSpec

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def import_callable(reference: str, base_dir: Path | None, field: str) -> Callable[..., Any]:
    """Resolve ``package.module:function`` or ``file.py:function`` (relative to the spec's folder).

    A file is imported with its folder on ``sys.path`` so it can import its siblings.
    """
    module_ref, sep, attr = reference.partition(":")
    if not sep or not module_ref or not attr:
        raise SpecError(f"{field}: {reference!r} must look like 'module:function' or 'file.py:function'")
    try:
        if module_ref.endswith(".py"):
            path = Path(module_ref)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if not path.is_file():
                raise SpecError(f"{field}: file {path} does not exist (paths are relative to the spec's folder)")
            folder = str(path.parent.resolve())
            if folder not in sys.path:
                sys.path.insert(0, folder)
            module = importlib.import_module(path.stem)
        else:
            module = importlib.import_module(module_ref)
    except SpecError:
        raise
    except Exception as err:
        raise SpecError(f"{field}: cannot import {module_ref!r}: {type(err).__name__}: {err}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise SpecError(f"{field}: {module_ref!r} has no callable {attr!r}")
    return function


def build_model(spec: ModelSpec):
    """The spec's nn.Module with freshly initialised weights."""
    import torch

    factory = import_callable(spec.model, spec.source, "model")
    try:
        module = factory(**spec.model_kwargs)
    except Exception as err:
        raise SpecError(f"model: factory {spec.model!r} failed: {type(err).__name__}: {err}") from None
    if not isinstance(module, torch.nn.Module):
        raise SpecError(f"model: factory {spec.model!r} returned {type(module).__name__}, expected a torch.nn.Module")
    return module


def read_state_dict(path: Path, allow_pickle: bool = True) -> dict[str, Any]:
    """Read weights without running code: safetensors, or a restricted unpickler for .pt files."""
    import torch

    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {err}") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"checkpoint {path}: unknown format {path.suffix!r}; use .safetensors (preferred) or .pt")
    if not allow_pickle:
        raise CheckpointError(
            f"checkpoint {path} is a pickle file and the spec sets allow_pickle_checkpoints: false; "
            "convert it to safetensors (safetensors.torch.save_file(model.state_dict(), ...))"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # weights_only refuses any global that is not a tensor/primitive: that is the code-running pickle.
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} was refused: it is not a plain weights file ({first_line}). "
            "Loading it would run code; save weights only, preferably as safetensors"
        ) from None
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return loaded


def load_model(spec: ModelSpec, checkpoint: Path):
    """The spec's model with the checkpoint's weights, in eval mode."""
    module = build_model(spec)
    state = read_state_dict(checkpoint, allow_pickle=spec.allow_pickle_checkpoints)
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing keys {sorted(result.missing_keys)}")
        if result.unexpected_keys:
            parts.append(f"unexpected keys {sorted(result.unexpected_keys)}")
        raise CheckpointError(
            f"checkpoint {checkpoint} does not match model {spec.model!r}: "
            + "; ".join(parts)
            + ". Check that the spec's model and model_kwargs are the ones the checkpoint was trained with"
        )
    return module.eval()
