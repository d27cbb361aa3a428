"""Building the user's nn.Module from the spec and loading its weights safely.

Weights load only through safetensors or ``torch.load(weights_only=True)``: a checkpoint is
untrusted input, and a pickle that would run code is refused, never executed.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
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
    """Read weights without running code: safetensors, or a restricted unpickler for .pt files.

    Trainer checkpoints are unwrapped: the state dict under ``state_dict``, ``model_state_dict``,
    ``model``, ``ema`` or ``module``, and the ``module.`` prefix DataParallel and DDP add.
    """
    import torch

    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _strip_prefix(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {err}") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"checkpoint {path}: unknown format {path.suffix!r}; use .safetensors (preferred) or .pt")
    if not allow_pickle:
        raise CheckpointError(f"checkpoint {path} is a pickle file and the spec sets allow_pickle_checkpoints: false; " + CONVERT_ADVICE)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(_refusal(path, err)) from None
    return _strip_prefix(_unwrap(loaded, path))


CONVERT_ADVICE = (
    "convert it to safetensors where the model was trained: "
    "safetensors.torch.save_file(model.state_dict(), 'model.safetensors'), and point the spec's checkpoint at that file"
)
# Where trainers (Lightning, timm, torchvision references, DDP scripts) keep the weights, most usual first.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "ema", "model_ema", "state_dict_ema", "module")
_BLOCKED_GLOBAL = re.compile(r"unsupported GLOBAL (\S+)")
_PREFIXES = ("module.", "_orig_mod.")


def _refusal(path: Path, err: Exception) -> str:
    """Why torch's weights-only loader refused ``path``, without torch's advice to turn it off."""
    text = str(err)
    blocked = _BLOCKED_GLOBAL.search(text)
    if blocked is not None or "Weights only load failed" in text:
        what = f"the Python object {blocked.group(1)}" if blocked else "Python objects other than tensors"
        return (
            f"checkpoint {path} was refused: it is not a plain weights file. It is a pickle that names {what}, and "
            "unpickling it could run code, so trtforge does not load it. Save weights only: " + CONVERT_ADVICE
        )
    first_line = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"checkpoint {path} is not a readable PyTorch file ({first_line}); save it again, or {CONVERT_ADVICE}"


def _is_state_dict(value: Any) -> bool:
    import torch

    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _unwrap(loaded: Any, path: Path) -> dict[str, Any]:
    if _is_state_dict(loaded):
        return loaded
    if isinstance(loaded, dict):
        for key in STATE_DICT_KEYS:
            inner = loaded.get(key)
            if _is_state_dict(inner):
                return inner
            # timm and torchvision keep an EMA copy as {"module": state dict} or {"state_dict": ...}.
            if isinstance(inner, dict):
                nested = next((inner[k] for k in STATE_DICT_KEYS if _is_state_dict(inner.get(k))), None)
                if nested is not None:
                    return nested
        candidates = [str(k) for k, v in loaded.items() if _is_state_dict(v)]
        found = ", ".join(f"{k!r} ({_kind(v)})" for k, v in list(loaded.items())[:LISTED_KEYS])
        more = f" and {len(loaded) - LISTED_KEYS} more" if len(loaded) > LISTED_KEYS else ""
        if candidates:
            hint = f"the weights look to be under {candidates[0]!r}: re-save that entry alone, or {CONVERT_ADVICE}"
        else:
            hint = f"none of them is a dict of tensors; save model.state_dict() itself: {CONVERT_ADVICE}"
        raise CheckpointError(
            f"checkpoint {path} does not hold a state dict of tensors: it is a dict with keys {found}{more}, and none "
            f"of the usual weight entries ({', '.join(STATE_DICT_KEYS)}) holds only tensors; {hint}"
        )
    raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors: it holds a {_kind(loaded)}; {CONVERT_ADVICE}")


def _kind(value: Any) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return f"tensor {list(value.shape)}"
    if isinstance(value, dict):
        tensors = sum(isinstance(v, torch.Tensor) for v in value.values())
        return f"dict of {len(value)} entries, {tensors} of them tensors"
    return type(value).__name__


def _strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    for prefix in _PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


LISTED_KEYS = 5
# Key patterns of well-known architectures, to say what a checkpoint that fits nothing looks like.
ARCHITECTURE_HINTS = (
    ("a torchvision Faster/Mask R-CNN", ("backbone.body.", "rpn.head.", "roi_heads.")),
    ("a torchvision DeepLabV3/FCN", ("backbone.layer1.", "classifier.0.")),
    ("a ResNet (layer1..layer4, fc)", ("layer1.0.", "fc.weight")),
    ("a Vision Transformer (torchvision ViT)", ("conv_proj.", "encoder.layers.")),
    ("a Swin Transformer", ("relative_position_bias_table",)),
    ("a DenseNet", ("features.denseblock1.",)),
    ("a ConvNeXt", ("features.1.0.block.", "layer_scale")),
    ("an EfficientNet or MobileNet (features.N.M.block, classifier)", ("features.1.0.block.",)),
    ("an Ultralytics YOLO (model.N.*)", ("model.0.conv.",)),
    ("a Hugging Face BERT-style encoder", ("encoder.layer.0.attention.",)),
    ("a VGG or AlexNet (features.N, classifier.N)", ("features.0.weight", "classifier.0.weight")),
)


def looks_like(keys: list[str]) -> str | None:
    """The well-known architecture whose key names these are, if any."""
    for name, markers in ARCHITECTURE_HINTS:
        if all(any(marker in key for key in keys) for marker in markers):
            return name
    return None


def _some(keys: list[str]) -> str:
    listed = ", ".join(keys[:LISTED_KEYS])
    return listed + (f", ... ({len(keys) - LISTED_KEYS} more)" if len(keys) > LISTED_KEYS else "")


def _shape(value: Any) -> str:
    return "[" + ", ".join(str(d) for d in value.shape) + "]"


def _kwargs_hint(spec: ModelSpec, mismatched: list[tuple[str, Any, Any]]) -> str:
    classes = spec.model_kwargs.get("num_classes")
    heads = [(key, a) for key, a, b in mismatched if a.ndim >= 1 and b.ndim >= 1 and b.shape[0] == classes != a.shape[0]]
    if classes is not None and heads:
        key, trained = heads[0]
        return (
            f"model_kwargs sets num_classes: {classes}, but the checkpoint's {key} has {trained.shape[0]} outputs; "
            f"set num_classes: {trained.shape[0]} in model_kwargs (or drop it), or use a checkpoint trained with {classes} classes"
        )
    return "set the spec's model_kwargs to the training ones (a 1000-class checkpoint needs num_classes: 1000, for example)"


def load_model(spec: ModelSpec, checkpoint: Path):
    """The spec's model with the checkpoint's weights, in eval mode."""
    module = build_model(spec)
    state = read_state_dict(checkpoint, allow_pickle=spec.allow_pickle_checkpoints)
    expected = module.state_dict()
    described = f"model {spec.model!r} ({type(module).__name__}, model_kwargs {spec.model_kwargs})"
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        common = len(set(expected) & set(state))
        parts = [f"the checkpoint has {len(state)} tensors, the model {len(expected)}, {common} names in common"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_some(unexpected)}")
        theirs, ours = looks_like(list(state)), looks_like(list(expected))
        if theirs is not None and theirs != ours:
            parts.append(f"the checkpoint's keys look like {theirs}")
        raise CheckpointError(
            f"checkpoint {checkpoint} does not match {described}: "
            + "; ".join(parts)
            + ". Check that the spec's model and model_kwargs are the ones the checkpoint was trained with"
        )
    mismatched = [
        (key, state[key], expected[key]) for key in expected if hasattr(state[key], "shape") and state[key].shape != expected[key].shape
    ]
    if mismatched:
        listed = "; ".join(f"{key}: checkpoint {_shape(a)}, model {_shape(b)}" for key, a, b in mismatched[:LISTED_KEYS])
        more = f"; and {len(mismatched) - LISTED_KEYS} more" if len(mismatched) > LISTED_KEYS else ""
        raise CheckpointError(
            f"checkpoint {checkpoint} does not fit {described}: {len(mismatched)} parameter(s) have other shapes: "
            f"{listed}{more}. The model was built with other settings than the checkpoint was trained with: "
            + _kwargs_hint(spec, mismatched)
        )
    module.load_state_dict(state, strict=True)
    return module.eval()
