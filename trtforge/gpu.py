"""The NVIDIA GPUs of this machine, read through NVML (nvidia-ml-py), and the CUDA runtime that uses them.

NVML ships with the driver, so detection works on any GPU worker without CUDA, torch or TensorRT,
and answers plainly on machines without a GPU instead of failing. The CUDA runtime (libcudart)
is found here too, in the places pip, the CUDA toolkit and the system put it, and called
through ctypes for devices, streams, events and device memory. Compute capabilities are
written the way targets name them: ``sm_90`` for 9.0, ``sm_100`` for 10.0, ``sm_121`` for 12.1.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from trtforge.errors import TrtforgeError

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
    # The CUDA ordinal in this process, once ``cuda_visible`` has asked CUDA (NVML's index is not it).
    cuda_device: int | None = None


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


# --- the CUDA runtime (libcudart through ctypes: no torch, no cuda-python) ------------------------

# pip installs the CUDA 13 runtime as nvidia/cu13/lib/libcudart.so.13 and the CUDA 12 one as
# nvidia/cuda_runtime/lib/libcudart.so.12; polygraphy looks only in the second, so a pip-only
# TensorRT 11 worker has a runtime that polygraphy never finds.
CUDA_RUNTIME_SONAMES = ("libcudart.so.13", "libcudart.so.12")
_WHEEL_LAYOUTS = (("cu13", "lib", "libcudart.so.13"), ("cuda_runtime", "lib", "libcudart.so.12"))
_SYSTEM_DIRS = ("/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib")
CUDA_RUNTIME_HINT = (
    "install the CUDA runtime wheel of the TensorRT build (pip install nvidia-cuda-runtime for CUDA 13, "
    "nvidia-cuda-runtime-cu12 for CUDA 12) or the CUDA toolkit, or put the folder holding libcudart.so.13 on LD_LIBRARY_PATH"
)
_CUDA_ERROR_NO_DEVICE = 100
_CUDA_ERROR_INVALID_DEVICE = 101
_H2D, _D2H, _D2D = 1, 2, 3


def _nvidia_package_dirs() -> list[str]:
    """Every folder the ``nvidia`` namespace package of the pip wheels lives in."""
    roots = [os.path.join(entry, "nvidia") for entry in sys.path if entry and os.path.isdir(entry)]
    # The namespace package may be reachable through a .pth file without its folder on sys.path.
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        roots.extend(spec.submodule_search_locations)
    return list(dict.fromkeys(os.path.normpath(root) for root in roots))


def cuda_runtime_candidates() -> list[str]:
    """Where the CUDA runtime is looked for, in order: the CUDA 13 and 12 pip wheels, the sonames
    (the dynamic loader's own search: LD_LIBRARY_PATH, the ldconfig cache), then the system folders."""
    wheels = [
        os.path.join(root, *layout)
        for layout in _WHEEL_LAYOUTS
        for root in _nvidia_package_dirs()
        if os.path.isfile(os.path.join(root, *layout))
    ]
    system = [
        os.path.join(folder, name) for name in CUDA_RUNTIME_SONAMES for folder in _SYSTEM_DIRS if os.path.isfile(os.path.join(folder, name))
    ]
    return list(dict.fromkeys([*wheels, *CUDA_RUNTIME_SONAMES, *system]))


@dataclass(frozen=True)
class CudaRuntimeProbe:
    """The CUDA runtime library this process loads, or why there is none."""

    path: str | None
    version: str | None = None
    reason: str = ""

    @property
    def usable(self) -> bool:
        return not self.reason


class CudaError(TrtforgeError):
    """A CUDA runtime call failed, or there is no CUDA runtime to call."""


def probe_cuda_runtime() -> CudaRuntimeProbe:
    """The first CUDA runtime of ``cuda_runtime_candidates`` that loads; never raises."""
    try:
        runtime = cuda_runtime()
    except CudaError as err:
        return CudaRuntimeProbe(None, reason=str(err))
    return CudaRuntimeProbe(runtime.path, runtime.version)


_RUNTIME: CudaRuntime | None = None


def cuda_runtime() -> CudaRuntime:
    """The CUDA runtime of this process, loaded once; ``CudaError`` naming every place searched and the fix."""
    global _RUNTIME
    if _RUNTIME is None:
        failures = []
        for candidate in cuda_runtime_candidates():
            try:
                _RUNTIME = CudaRuntime(ctypes.CDLL(candidate), candidate)
                break
            except OSError as err:
                failures.append(f"{candidate} ({err})")
        else:
            searched = ", ".join(failures) or "nothing to try"
            raise CudaError(f"no CUDA runtime (libcudart.so.13 or .12) loads in this process; tried {searched}: {CUDA_RUNTIME_HINT}")
    return _RUNTIME


class CudaRuntime:
    """The few CUDA runtime calls trtforge makes: devices, streams, events, memory."""

    def __init__(self, lib: ctypes.CDLL, path: str):
        self.lib = lib
        self.path = path
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        for name in ("cudaMemcpyAsync",):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        lib.cudaFree.argtypes = [ctypes.c_void_p]
        lib.cudaDeviceGetByPCIBusId.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_char_p]
        lib.cudaDeviceGetPCIBusId.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        version = ctypes.c_int()
        self.check(lib.cudaRuntimeGetVersion(ctypes.byref(version)), "cudaRuntimeGetVersion")
        self.version = _cuda_version_string(version.value)

    def error_text(self, status: int) -> str:
        text = self.lib.cudaGetErrorString(status)
        return text.decode() if text else f"cudaError {status}"

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise CudaError(f"{what} failed with cudaError {status} ({self.error_text(status)}; CUDA runtime {self.path})")

    def device_count(self) -> int:
        count = ctypes.c_int()
        status = self.lib.cudaGetDeviceCount(ctypes.byref(count))
        if status == _CUDA_ERROR_NO_DEVICE:
            return 0
        self.check(status, "cudaGetDeviceCount")
        return count.value

    def device_of_pci_bus_id(self, pci_bus_id: str) -> int | None:
        """The CUDA ordinal of the GPU at ``pci_bus_id``, or None when this process cannot see it
        (CUDA_VISIBLE_DEVICES, the container's --gpus)."""
        device = ctypes.c_int()
        status = self.lib.cudaDeviceGetByPCIBusId(ctypes.byref(device), pci_bus_id.encode())
        if status in (_CUDA_ERROR_NO_DEVICE, _CUDA_ERROR_INVALID_DEVICE):
            return None
        self.check(status, f"cudaDeviceGetByPCIBusId({pci_bus_id})")
        return device.value

    def pci_bus_id_of(self, device: int) -> str:
        buffer = ctypes.create_string_buffer(64)
        self.check(self.lib.cudaDeviceGetPCIBusId(buffer, 64, device), f"cudaDeviceGetPCIBusId({device})")
        return buffer.value.decode()

    def set_device(self, device: int) -> None:
        self.check(self.lib.cudaSetDevice(device), f"cudaSetDevice({device})")

    def current_device(self) -> int:
        device = ctypes.c_int()
        self.check(self.lib.cudaGetDevice(ctypes.byref(device)), "cudaGetDevice")
        return device.value

    def use_gpu(self, pci_bus_id: str) -> int:
        """Make the GPU at ``pci_bus_id`` this thread's CUDA device; returns its CUDA ordinal."""
        device = self.device_of_pci_bus_id(pci_bus_id)
        if device is None:
            raise CudaError(
                f"the GPU at PCI bus id {pci_bus_id} is not visible to CUDA in this process "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): "
                f"run where that GPU is visible, or change CUDA_VISIBLE_DEVICES / the container's --gpus option"
            )
        self.set_device(device)
        return device

    def create_stream(self) -> int:
        stream = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(stream)), "cudaStreamCreate")
        return stream.value or 0

    def destroy_stream(self, stream: int) -> None:
        self.check(self.lib.cudaStreamDestroy(ctypes.c_void_p(stream)), "cudaStreamDestroy")

    def synchronize(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")

    def malloc(self, nbytes: int) -> int:
        pointer = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(pointer), max(nbytes, 1)), f"cudaMalloc({nbytes} bytes)")
        return pointer.value

    def free(self, pointer: int) -> None:
        self.check(self.lib.cudaFree(pointer), "cudaFree")

    def memcpy_async(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self.check(self.lib.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync")


class DeviceBuffer:
    """GPU memory for one tensor, grown (never shrunk) to the largest shape it has held."""

    def __init__(self, runtime: CudaRuntime, dtype: np.dtype):
        self.runtime = runtime
        self.dtype = np.dtype(dtype)
        self.ptr = 0
        self.capacity = 0
        self.shape: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def resize(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(int(d) for d in shape)
        if self.nbytes > self.capacity:
            self.free()
            self.ptr = self.runtime.malloc(self.nbytes)
            self.capacity = self.nbytes

    def copy_from(self, array: np.ndarray, stream: int) -> None:
        """Host to device; ``array`` must stay alive until the stream is synchronized."""
        if array.nbytes != self.nbytes or not array.flags.c_contiguous:
            raise CudaError(f"host array of {array.nbytes} bytes does not fit a device buffer of shape {list(self.shape)} {self.dtype}")
        self.runtime.memcpy_async(self.ptr, array.ctypes.data, self.nbytes, _H2D, stream)

    def copy_to(self, array: np.ndarray, stream: int) -> None:
        """Device to host; ``array`` holds the data once the stream is synchronized."""
        if array.nbytes != self.nbytes or not array.flags.c_contiguous:
            raise CudaError(f"host array of {array.nbytes} bytes does not fit a device buffer of shape {list(self.shape)} {self.dtype}")
        self.runtime.memcpy_async(array.ctypes.data, self.ptr, self.nbytes, _D2H, stream)

    def copy_device(self, source: DeviceBuffer, nbytes: int, stream: int) -> None:
        self.runtime.memcpy_async(self.ptr, source.ptr, nbytes, _D2D, stream)

    def free(self) -> None:
        if self.ptr:
            self.runtime.free(self.ptr)
        self.ptr = 0
        self.capacity = 0


def cuda_visible(local: LocalGpus, runtime: CudaRuntime) -> LocalGpus:
    """The GPUs of ``local`` that CUDA can use in this process, each with its CUDA ordinal.

    NVML lists every GPU of the machine; CUDA_VISIBLE_DEVICES and the container's --gpus hide
    some from CUDA and renumber the rest, so the PCI bus id is what ties the two together."""
    visible, hidden = [], []
    for gpu in local.gpus:
        device = runtime.device_of_pci_bus_id(gpu.pci_bus_id)
        if device is None:
            hidden.append(f"GPU {gpu.index} {gpu.name} ({gpu.pci_bus_id})")
        else:
            visible.append(replace(gpu, cuda_device=device))
    # CUDA's order (fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID), so "first" means what it means to torch.
    visible.sort(key=lambda gpu: gpu.cuda_device)
    notes = [local.reason] if local.reason else []
    if hidden:
        notes.append(
            f"hidden from CUDA in this process (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): "
            + ", ".join(hidden)
        )
    return replace(local, gpus=tuple(visible), reason="; ".join(notes))
