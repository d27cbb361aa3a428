"""The NVIDIA GPUs of this machine, read through NVML (nvidia-ml-py).

NVML ships with the driver, so this works on any GPU worker without CUDA, torch or TensorRT,
and answers plainly on machines without a GPU instead of failing. Compute capabilities are
written the way targets name them: ``sm_90`` for 9.0, ``sm_100`` for 10.0, ``sm_121`` for 12.1.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

_ARCH = re.compile(r"^sm_(\d+)(\d)$")


def arch_from_capability(major: int, minor: int) -> str:
    """``(9, 0)`` -> ``"sm_90"``."""
    return f"sm_{major}{minor}"


def capability_from_arch(arch: str) -> tuple[int, int]:
    """``"sm_90"`` -> ``(9, 0)``, ``"sm_120"`` -> ``(12, 0)``; the last digit is always the minor version."""
    match = _ARCH.match(arch)
    if match is None:
        raise ValueError(f"{arch!r} is not a GPU architecture like 'sm_90'")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str
    memory_mb: int
    pci_bus_id: str
    uuid: str


@dataclass(frozen=True)
class LocalGpus:
    """What NVML reports; ``reason`` says why ``gpus`` is empty (or why some fields are missing)."""

    gpus: tuple[GpuInfo, ...] = ()
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    reason: str = ""

    @property
    def available(self) -> bool:
        return bool(self.gpus)

    def with_arch(self, arch: str) -> GpuInfo | None:
        return next((gpu for gpu in self.gpus if gpu.compute_capability == arch), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nvml_failure_reason(err: Exception) -> str:
    import pynvml

    if isinstance(err, pynvml.NVMLError_LibraryNotFound):
        return "no NVIDIA GPU: the NVIDIA driver's NVML library (libnvidia-ml.so.1) is not on this machine"
    if isinstance(err, pynvml.NVMLError_DriverNotLoaded):
        return "no NVIDIA GPU: the NVIDIA kernel driver is not loaded (check nvidia-smi)"
    if isinstance(err, pynvml.NVMLError_NoPermission):
        return "no NVIDIA GPU usable: no permission to open the GPU device files (/dev/nvidia*)"
    return f"no NVIDIA GPU: NVML failed to start ({err})"


def _cuda_version_string(packed: int) -> str:
    """NVML packs the CUDA driver version as 1000*major + 10*minor, e.g. 13000 -> "13.0"."""
    return f"{packed // 1000}.{(packed % 1000) // 10}"


def detect_gpus() -> LocalGpus:
    """Every NVIDIA GPU NVML can see, with the driver and CUDA driver versions; never raises."""
    try:
        import pynvml
    except ImportError:
        return LocalGpus(reason="no NVIDIA GPU detection: nvidia-ml-py is not installed (pip install nvidia-ml-py)")

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        return LocalGpus(reason=_nvml_failure_reason(err))
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = _cuda_version_string(pynvml.nvmlSystemGetCudaDriverVersion_v2())
        gpus = []
        skipped = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                gpus.append(
                    GpuInfo(
                        index=index,
                        name=pynvml.nvmlDeviceGetName(handle),
                        compute_capability=arch_from_capability(major, minor),
                        memory_mb=pynvml.nvmlDeviceGetMemoryInfo(handle).total // (1024 * 1024),
                        pci_bus_id=pynvml.nvmlDeviceGetPciInfo(handle).busId,
                        uuid=pynvml.nvmlDeviceGetUUID(handle),
                    )
                )
            # A GPU that has fallen off the bus or is held by another container must not hide the others.
            except pynvml.NVMLError as err:
                skipped.append(f"GPU {index} could not be read ({err})")
    except pynvml.NVMLError as err:
        return LocalGpus(reason=_nvml_failure_reason(err))
    finally:
        pynvml.nvmlShutdown()

    if not gpus:
        reason = "; ".join(skipped) or "no NVIDIA GPU: the driver is loaded but NVML lists no GPU"
        return LocalGpus(driver_version=driver, cuda_driver_version=cuda, reason=reason)
    return LocalGpus(tuple(gpus), driver, cuda, reason="; ".join(skipped))
