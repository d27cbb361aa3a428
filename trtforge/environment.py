"""The software environment a run used, recorded in every manifest."""

from __future__ import annotations

import platform
from importlib import metadata

RECORDED_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxsim", "nvidia-modelopt", "tensorrt", "polygraphy", "prefect", "trtforge")


def environment() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions
