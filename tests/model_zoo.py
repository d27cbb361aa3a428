"""Exported torchvision models, each exported once per test session (random weights, no downloads).

A pytest plugin module, registered in tests/conftest.py. Every fixture returns the path of an
ONNX file (opset 18, input ``input`` of shape (batch, 3, 224, 224) with a dynamic batch
dimension, output ``logits``), exported from a batch-1 example.

They use the TorchScript exporter (``dynamo=False``): on two CPU cores it exports Swin-T in a
quarter of the dynamo exporter's time, and from a batch-1 example the dynamo exporter keeps
Swin-T's batch dynamic only with ``Dim.DYNAMIC``. The weights are stored inside the .onnx file.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import pytest

OPSET = 18
IMAGE_SIZE = 224


def export_torchvision(name: str, destination: Path) -> Path:
    """Export ``torchvision.models.<name>(weights=None)`` with a dynamic batch to ``destination``."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    example = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    partial = destination.with_name(destination.name + ".partial")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(partial),
            input_names=["input"],
            output_names=["logits"],
            opset_version=OPSET,
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    partial.replace(destination)
    return destination


@pytest.fixture(scope="session")
def resnet18_onnx(tmp_path_factory) -> Path:
    return export_torchvision("resnet18", tmp_path_factory.mktemp("resnet18") / "resnet18.onnx")


@pytest.fixture(scope="session")
def vit_b16_onnx(tmp_path_factory) -> Path:
    return export_torchvision("vit_b_16", tmp_path_factory.mktemp("vit_b16") / "vit_b16.onnx")


@pytest.fixture(scope="session")
def swin_t_onnx(tmp_path_factory) -> Path:
    return export_torchvision("swin_t", tmp_path_factory.mktemp("swin_t") / "swin_t.onnx")
