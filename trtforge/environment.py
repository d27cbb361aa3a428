"""The software environment a run used, recorded in every manifest, and the CPU it ran on."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

RECORDED_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxsim", "nvidia-modelopt", "tensorrt", "polygraphy", "prefect", "trtforge")


def environment() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def cpu_info(field: str) -> str | None:
    """The first value of ``field`` ("model name", "flags") in Linux's /proc/cpuinfo; None elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.partition(":")[2].strip() for line in text.splitlines() if line.split(":", 1)[0].strip() == field), None)


def cpu_model() -> str:
    return cpu_info("model name") or platform.processor() or platform.machine()


def worker_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
