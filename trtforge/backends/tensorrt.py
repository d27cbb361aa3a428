"""TensorRT backend: strongly typed engines built through polygraphy's loaders, and a runner for them.

Precision comes from the ONNX itself (AutoCast fp16/bf16, explicit Q/DQ for int8/fp8), so the
network is always strongly typed and no precision flag or calibrator is ever set: that is the
only way TensorRT 11 builds, and it works the same on TensorRT 10.

The engine file is a plain TensorRT plan, readable by trtexec and Triton. Everything about how
it was built goes beside it: ``build.json`` (versions, GPU, every builder setting, profiles,
timing, size) and ``layers.json`` (the engine inspector's layer information).

TensorRT, polygraphy and the CUDA runtime are imported only when a build or a runner needs
them, so this module imports (and reports why it cannot build) on any machine.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from trtforge.backends.base import Availability, BuildOptions, BuiltEngine, register_backend, target_tag
from trtforge.errors import SpecError, StageError, TrtforgeError
from trtforge.gpu import (
    CudaError,
    CudaRuntimeProbe,
    DeviceBuffer,
    GpuInfo,
    LocalGpus,
    capability_from_arch,
    cuda_runtime,
    cuda_visible,
    detect_gpus,
    probe_cuda_runtime,
)
from trtforge.hashing import sha256_file
from trtforge.onnxfacts import precision_facts
from trtforge.profiles import ShapeProfile, derive_profiles
from trtforge.safeio import OnnxModelError, atomic_write_bytes, atomic_write_json, atomic_write_text, load_onnx_safely
from trtforge.spec import GPU_ARCHS, ModelSpec, Precision, Target

STAGE = "build"
ENGINE_FILE = "engine.plan"
RECORD_FILE = "build.json"
LAYERS_FILE = "layers.json"
MIN_TENSORRT_MAJOR = 10
INSTALL_HINT = (
    "install it from NVIDIA's pip index (pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13) "
    "or run the NGC TensorRT container (see infra/worker/README.md)"
)
RuntimeKind = Literal["full", "lean"]


# --- what this process can do --------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRTProbe:
    """The TensorRT this process can import, or why it cannot."""

    version: str | None
    reason: str = ""

    @property
    def usable(self) -> bool:
        return not self.reason


def probe_tensorrt() -> TensorRTProbe:
    if importlib.util.find_spec("polygraphy") is None:
        return TensorRTProbe(None, "polygraphy is not installed on this worker: pip install 'trtforge[pipeline]'")
    if importlib.util.find_spec("tensorrt") is None:
        return TensorRTProbe(None, f"TensorRT is not installed on this worker: {INSTALL_HINT}")
    try:
        trt = importlib.import_module("tensorrt")
    except (ImportError, OSError) as err:
        return TensorRTProbe(None, f"TensorRT is installed on this worker but its libraries do not load ({err}): {INSTALL_HINT}")
    version = str(trt.__version__)
    if int(version.split(".")[0]) < MIN_TENSORRT_MAJOR:
        return TensorRTProbe(
            version,
            f"TensorRT {version} on this worker is too old: trtforge builds strongly typed networks, which need "
            f"TensorRT {MIN_TENSORRT_MAJOR} or newer; {INSTALL_HINT}",
        )
    return TensorRTProbe(version)


class TensorRTTarget(Target):
    """A TensorRT engine for one GPU architecture, with the builder options that apply to it."""

    backend: Literal["tensorrt"] = "tensorrt"
    device: Literal["gpu"] = "gpu"
    arch: str = Field(description="GPU architecture, e.g. sm_90; one of " + ", ".join(GPU_ARCHS))
    hardware_compatibility: Literal["none", "ampere_plus", "same_compute_capability"] = "none"
    version_compatible: bool = False
    exclude_lean_runtime: bool = False
    optimization_level: Annotated[int, Field(ge=0, le=5)] = 3
    workspace_mb: Annotated[int, Field(ge=1)] | None = None
    tiling_optimization_level: Literal["none", "fast", "moderate", "full"] | None = None

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if value not in GPU_ARCHS:
            raise ValueError(f"arch {value!r} is not one of " + ", ".join(GPU_ARCHS))
        return value

    @property
    def place(self) -> str:
        return self.arch.replace("_", "")

    @property
    def pool(self) -> str:
        return self.work_pool or f"gpu-{self.place}"


def timing_cache_key(tensorrt_version: str, gpu: GpuInfo) -> str:
    """One shared cache per (exact TensorRT version, GPU model, compute capability).

    ``ITimingCache.combine`` skips a cache written by any other TensorRT version, and
    ``set_timing_cache`` refuses one whose CUDA device properties differ (another GPU model of the
    same compute capability), so a coarser key would only share caches that cannot be used."""
    model = re.sub(r"[^a-z0-9]+", "-", gpu.name.lower()).strip("-")
    return f"trt{tensorrt_version}-{gpu.compute_capability.replace('_', '')}-{model}"


def _major(arch: str) -> int:
    return capability_from_arch(arch)[0]


def select_gpu(target: Target, gpus: LocalGpus) -> GpuInfo | None:
    """The local GPU that can build ``target``: one of its compute capability, or any Ampere-or-newer
    GPU when the target asks for an ``ampere_plus`` hardware-compatible engine."""
    exact = gpus.with_arch(target.arch)
    if exact is not None:
        return exact
    if target.hardware_compatibility == "ampere_plus" and _major(target.arch) >= 8:
        return next((gpu for gpu in gpus.gpus if _major(gpu.compute_capability) >= 8), None)
    return None


def usable_gpus(cuda: CudaRuntimeProbe) -> LocalGpus:
    """The GPUs this process can build on: NVML's list narrowed to those CUDA can see here."""
    local = detect_gpus()
    if not cuda.usable or not local.available:
        return local
    try:
        return cuda_visible(local, cuda_runtime())
    except CudaError as err:
        # NVML sees GPUs that this CUDA runtime cannot use (a driver older than the runtime, say).
        return LocalGpus(driver_version=local.driver_version, cuda_driver_version=local.cuda_driver_version, reason=str(err))


def availability_for(target: Target, tensorrt: TensorRTProbe, gpus: LocalGpus, cuda: CudaRuntimeProbe) -> Availability:
    """Whether a process with this TensorRT, CUDA runtime and these (CUDA-visible) GPUs can build and
    run ``target``, and if not, every reason why, each with what to do about it."""
    if not isinstance(target, TensorRTTarget):
        return Availability(False, f"target backend is {target.backend!r}, not 'tensorrt'")
    reasons = []
    if not tensorrt.usable:
        reasons.append(tensorrt.reason)
    if not cuda.usable:
        reasons.append(cuda.reason)
    if not gpus.available:
        reasons.append(f"{gpus.reason}: run this target on a worker of pool {target.pool}")
    elif select_gpu(target, gpus) is None:
        local = ", ".join(f"{gpu.name} ({gpu.compute_capability})" for gpu in gpus.gpus)
        hint = f"run it on a worker of pool {target.pool}"
        if target.hardware_compatibility != "ampere_plus" and _major(target.arch) >= 8:
            if any(_major(gpu.compute_capability) >= 8 for gpu in gpus.gpus):
                hint += ", or set hardware_compatibility: ampere_plus to build it on any Ampere or newer GPU"
        hidden = f" ({gpus.reason})" if gpus.reason else ""
        reasons.append(f"this worker's GPUs are {local}{hidden} but the target needs {target.arch}: {hint}")
    if reasons:
        return Availability(False, "; ".join(reasons))
    return Availability(True)


# --- build settings and the build record ---------------------------------------------------------


class TensorRTBuildSettings(BaseModel):
    """Every builder setting of one build, derived from the target; recorded in build.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    strongly_typed: bool
    tf32: bool
    builder_optimization_level: int
    workspace_bytes: int | None
    tiling_optimization_level: Literal["none", "fast", "moderate", "full"] | None
    hardware_compatibility_level: Literal["none", "ampere_plus", "same_compute_capability"]
    version_compatible: bool
    exclude_lean_runtime: bool
    profiling_verbosity: Literal["detailed"]
    profiles: list[dict[str, dict[str, list[int]]]]


def build_settings(spec: ModelSpec, target: Target) -> TensorRTBuildSettings:
    """The builder settings for ``target``, checked for combinations TensorRT would refuse."""
    where = f"targets[{spec.targets.index(target)}]" if target in spec.targets else "target"
    if not isinstance(target, TensorRTTarget):
        raise SpecError(f"spec {spec.name!r}: {where} has backend {target.backend!r}, not 'tensorrt'")
    if target.exclude_lean_runtime and not target.version_compatible:
        raise SpecError(
            f"spec {spec.name!r}: {where}.exclude_lean_runtime only applies to version-compatible engines: "
            f"set version_compatible: true, or remove exclude_lean_runtime"
        )
    if target.hardware_compatibility == "ampere_plus" and _major(target.arch) < 8:
        raise SpecError(
            f"spec {spec.name!r}: {where}.hardware_compatibility ampere_plus needs an Ampere or newer arch "
            f"(sm_80 and up), not {target.arch}: use 'none' or 'same_compute_capability'"
        )
    # TF32 stays off: the FP32 gate compares against PyTorch FP32, and TF32 matmuls would blur that.
    return TensorRTBuildSettings(
        strongly_typed=True,
        tf32=False,
        builder_optimization_level=target.optimization_level,
        workspace_bytes=target.workspace_mb * 1024 * 1024 if target.workspace_mb else None,
        tiling_optimization_level=target.tiling_optimization_level,
        hardware_compatibility_level=target.hardware_compatibility,
        version_compatible=target.version_compatible,
        exclude_lean_runtime=target.exclude_lean_runtime,
        profiling_verbosity="detailed",
        profiles=[profile.to_dict() for profile in derive_profiles(spec, target)],
    )


class TimingCacheUse(BaseModel):
    """What a build did with its timing cache.

    ``new``: there was none, this build's is saved. ``loaded``: TensorRT used it, and it is saved
    back with this build's tactics added. ``foreign``: TensorRT refused to load it, or to combine
    it with this build's (another TensorRT version or GPU model wrote it); it is left as it is.
    ``unreadable``: not a timing cache; replaced by this build's.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    status: Literal["new", "loaded", "foreign", "unreadable"]
    loaded_bytes: int
    saved_bytes: int


class PluginLibrary(BaseModel):
    """A TensorRT plugin library loaded for the build (and needed by every runtime of the engine)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    sha256: str


class TensorRTBuildRecord(BaseModel):
    """Exactly how one engine was built (build.json)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["tensorrt"] = "tensorrt"
    tag: str
    model: str
    precision: str
    target_arch: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    pci_bus_id: str
    cuda_runtime_version: str | None
    driver_version: str | None
    cuda_driver_version: str | None
    settings: TensorRTBuildSettings
    timing_cache: TimingCacheUse | None
    plugin_libraries: list[PluginLibrary]
    onnx_file: str
    onnx_sha256: str
    engine_file: str
    engine_bytes: int
    engine_sha256: str
    build_seconds: float
    layer_count: int
    built_at: str


def check_onnx_precision(onnx_path: Path, precision: Precision, *, plugins: Sequence[str] = ()) -> None:
    """Refuse an ONNX model that does not carry ``precision``: a strongly typed network is built in
    the types the ONNX has, so an unconverted model would give an fp32 engine under another name
    (and a quantized one an int8 engine named fp32). ``plugins`` as for ``load_onnx_safely``."""
    try:
        model = load_onnx_safely(onnx_path, plugins=plugins, load_external_data=False)
    except OnnxModelError as err:
        raise StageError(STAGE, str(err)) from None
    facts = precision_facts(model)
    if precision is Precision.FP32:
        quantized = [p.value for p in facts.quantized]
        if quantized:
            raise StageError(
                STAGE,
                f"{onnx_path} has {'/'.join(quantized)} Q/DQ nodes, so the engine would not be fp32: "
                f"give this target the unquantized model, or set its precision to {quantized[0]}",
            )
        return
    if precision not in facts.precisions:
        missing = f"{precision.value} Q/DQ nodes" if precision.needs_calibration else f"{precision.value} tensors"
        raise StageError(
            STAGE,
            f"{onnx_path} has no {missing}: "
            f"TensorRT builds it in the types it carries, so the engine would not be {precision.value}; "
            f"convert it with the precision stage (ModelOpt) for this target first",
        )


# --- CUDA: the GPU a build or runner uses ------------------------------------------------------


def _use_gpu(pci_bus_id: str, what: str) -> None:
    try:
        cuda_runtime().use_gpu(pci_bus_id)
    except CudaError as err:
        raise StageError(what, str(err)) from None


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    warmup: int
    samples_ms: tuple[float, ...]


def time_on_stream(enqueue: Callable[[], None], stream_ptr: int, runs: int = 200, warmup: int = 20) -> LatencyStats:
    """Latency of ``enqueue`` (work it puts on the stream) measured with CUDA events, one run at a time."""
    if runs < 1 or warmup < 0:
        raise TrtforgeError(f"latency measurement needs runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    runtime = cuda_runtime()
    cudart, check = runtime.lib, runtime.check
    stream = ctypes.c_void_p(stream_ptr)
    start, end = ctypes.c_void_p(), ctypes.c_void_p()
    check(cudart.cudaEventCreate(ctypes.byref(start)), "cudaEventCreate")
    try:
        check(cudart.cudaEventCreate(ctypes.byref(end)), "cudaEventCreate")
        try:
            for _ in range(warmup):
                enqueue()
            runtime.synchronize(stream_ptr)
            times = []
            elapsed = ctypes.c_float()
            for _ in range(runs):
                check(cudart.cudaEventRecord(start, stream), "cudaEventRecord")
                enqueue()
                check(cudart.cudaEventRecord(end, stream), "cudaEventRecord")
                check(cudart.cudaEventSynchronize(end), "cudaEventSynchronize")
                check(cudart.cudaEventElapsedTime(ctypes.byref(elapsed), start, end), "cudaEventElapsedTime")
                times.append(elapsed.value)
        finally:
            cudart.cudaEventDestroy(end)
    finally:
        cudart.cudaEventDestroy(start)
    samples = np.asarray(times, dtype=np.float64)
    return LatencyStats(
        median_ms=float(np.median(samples)),
        p99_ms=float(np.percentile(samples, 99)),
        mean_ms=float(samples.mean()),
        min_ms=float(samples.min()),
        runs=runs,
        warmup=warmup,
        samples_ms=tuple(times),
    )


# --- the runner ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileLatency:
    profile: int
    shapes: dict[str, list[int]]
    stats: LatencyStats

    def to_dict(self) -> dict[str, Any]:
        """The figures without the per-run samples, for reports."""
        record = asdict(self)
        del record["stats"]["samples_ms"]
        return record


def _runtime_module(kind: RuntimeKind):
    # The lean runtime ships as its own package (tensorrt_lean); its bindings-only wheel names it tensorrt_lean_bindings.
    candidates = {"full": ("tensorrt",), "lean": ("tensorrt_lean", "tensorrt_lean_bindings")}[kind]
    errors = []
    for name in candidates:
        try:
            return importlib.import_module(name)
        except (ImportError, OSError) as err:
            errors.append(f"{name}: {err}")
    package = "tensorrt-lean-cu13 (NVIDIA's pip index)" if kind == "lean" else "TensorRT"
    raise StageError("load", f"the {kind} TensorRT runtime is not importable here ({'; '.join(errors)}): install {package}")


def plugin_libraries(spec: ModelSpec) -> list[Path]:
    """The spec's ``plugins`` entries that name a plugin library (a ``.so`` file), resolved beside the
    spec; the other entries are op domains or op types, served by TensorRT's own plugins."""
    base = spec.source.parent if spec.source is not None else Path.cwd()
    libraries = []
    for entry in spec.plugins:
        if ".so" not in Path(entry).suffixes:
            continue
        path = Path(entry) if Path(entry).is_absolute() else base / entry
        if not path.is_file():
            raise SpecError(f"spec {spec.name!r}: plugins names the library {entry!r}, but {path} is not a file: build it or fix the path")
        libraries.append(path.resolve())
    return libraries


def load_plugin_libraries(trt, libraries: Sequence[Path], what: str) -> None:
    """Register each library's plugin creators with TensorRT's plugin registry of this process."""
    registry = trt.get_plugin_registry()
    for library in libraries:
        if registry.load_library(str(library)) is None:
            raise StageError(
                what,
                f"TensorRT {trt.__version__} could not load the plugin library {library} (its log above says why): rebuild it for this TensorRT",
            )


def _record_beside(engine_path: Path) -> dict[str, Any]:
    """The build record written beside the engine, or {} for a bare plan."""
    path = engine_path.parent / RECORD_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _recorded_plugins(engine_path: Path, record: dict[str, Any]) -> list[Path]:
    """The plugin libraries build.json names, each checked against its recorded sha256."""
    libraries = []
    for entry in record.get("plugin_libraries") or []:
        path = Path(entry["path"])
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise StageError(
                "load",
                f"{engine_path} was built with the plugin library {path} (sha256 {entry['sha256']}), which is missing or "
                f"different here: install that exact library, or pass plugins= with its path on this host",
            )
        libraries.append(path)
    return libraries


def _build_gpu_here(record: dict[str, Any]) -> str | None:
    """The PCI bus id of the GPU that built the engine, when this process sees that same GPU model there."""
    bus_id = record.get("pci_bus_id")
    if not bus_id:
        return None
    local = next((g for g in detect_gpus().gpus if g.pci_bus_id == bus_id), None)
    if local is None or local.name != record.get("gpu_name") or cuda_runtime().device_of_pci_bus_id(bus_id) is None:
        return None
    return bus_id


def _output_allocator(trt, cuda, dtypes: dict[str, np.dtype]):
    """Device memory for outputs whose shape the engine learns only while it runs (NMS, NonZero): TensorRT asks
    for it through ``reallocate_output_async`` and reports the shape through ``notify_shape``. The same
    protocol as polygraphy's TrtRunner, on the runner's own CUDA runtime."""

    class OutputAllocator(trt.IOutputAllocator):
        def __init__(self):
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, DeviceBuffer] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def _reallocate(self, name: str, size: int) -> int:
            buffer = self.buffers.get(name)
            if buffer is None:
                buffer = self.buffers[name] = DeviceBuffer(cuda, dtypes[name])
            # Room for ``size`` bytes (TensorRT's upper bound), at least one element, as the output's dtype.
            buffer.resize((max(1, -(-int(size) // buffer.dtype.itemsize)),))
            return buffer.ptr

        def reallocate_output(self, tensor_name, memory, size, alignment):
            return self._reallocate(tensor_name, size)

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            return self._reallocate(tensor_name, size)

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(int(d) for d in shape)

        def copy_out(self, name: str, stream: int) -> np.ndarray:
            """The output TensorRT wrote, at the shape it reported (the buffer may be larger)."""
            if name not in self.shapes:
                raise StageError("run", f"TensorRT ran but reported no shape for the data-dependent output {name!r}")
            array = np.empty(self.shapes[name], dtype=dtypes[name])
            buffer = self.buffers[name]
            buffer.resize(array.shape)
            buffer.copy_to(array, stream)
            return array

        def free(self) -> None:
            for buffer in self.buffers.values():
                buffer.free()
            self.buffers.clear()

    return OutputAllocator()


class TensorRTRunner:
    """Runs a TensorRT plan on one GPU: one execution context, one stream.

    ``pci_bus_id`` picks the GPU (the gate passes the build GPU's, from build.json); without one
    the runner uses the process's current CUDA device. ``plugins`` are loaded before the plan is
    read. Each ``run`` picks the first optimization profile whose min..max covers the batch's shapes.
    """

    def __init__(self, engine_path: Path, runtime: RuntimeKind = "full", *, pci_bus_id: str | None = None, plugins: Sequence[Path] = ()):
        self._cuda = None
        self._stream = 0
        self._buffers: dict[str, DeviceBuffer] = {}
        self._pending: list[np.ndarray] = []
        self._allocator = None
        self._context = None
        self._engine = None
        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise StageError("load", f"engine file {self.engine_path} does not exist: build the target first")
        trt = self._trt = _runtime_module(runtime)
        try:
            self._cuda = cuda_runtime()
        except CudaError as err:
            raise StageError("load", str(err)) from None
        if pci_bus_id is not None:
            _use_gpu(pci_bus_id, "load")
        self.device = self._cuda.current_device()
        self.pci_bus_id = self._cuda.pci_bus_id_of(self.device)
        self.runtime_kind = runtime
        self._logger = trt.Logger(trt.Logger.WARNING)
        if hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(self._logger, "")
        if plugins:
            load_plugin_libraries(trt, plugins, "load")
        self._runtime = trt.Runtime(self._logger)
        # Version-compatible engines carry the lean runtime that runs them as host code.
        self._runtime.engine_host_code_allowed = True
        self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise StageError(
                "load",
                f"TensorRT {trt.__version__} ({runtime} runtime) could not deserialize {self.engine_path}: it is not "
                f"a TensorRT plan, or it was built by another TensorRT version or for another GPU (TensorRT's log "
                f"above says which); rebuild it on a worker of its pool, or build it version_compatible / hardware "
                f"compatible",
            )
        self._context = self._engine.create_execution_context()
        self._stream = self._cuda.create_stream()
        try:
            self._describe_io(trt)
        except BaseException:
            # The caller never gets this runner to close: free the stream here.
            self.close()
            raise

    def _describe_io(self, trt) -> None:
        names = [self._engine.get_tensor_name(index) for index in range(self._engine.num_io_tensors)]
        self.input_names = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        shape_inputs = [n for n in self.input_names if self._engine.is_shape_inference_io(n)]
        if shape_inputs:
            raise StageError("load", f"{self.engine_path} has shape-tensor inputs {shape_inputs}, which trtforge does not feed")
        self._dtypes = {}
        for name in names:
            try:
                self._dtypes[name] = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            except TypeError:
                raise StageError(
                    "load",
                    f"{self.engine_path}: tensor {name!r} is {self._engine.get_tensor_dtype(name)}, which numpy cannot "
                    f"hold; convert the model keeping its input/output types (keep_io_types) and rebuild",
                ) from None
        self.profiles: list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]] = [
            {
                name: tuple(tuple(int(d) for d in shape) for shape in self._engine.get_tensor_profile_shape(name, index))
                for name in self.input_names
            }
            for index in range(self._engine.num_optimization_profiles)
        ]
        self._active_profile = 0

    def __enter__(self) -> TensorRTRunner:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Free the device memory and the stream; safe to call twice, and after a failed __init__."""
        self._context = None
        self._engine = None
        for buffer in self._buffers.values():
            buffer.free()
        self._buffers.clear()
        if self._allocator is not None:
            self._allocator.free()
            self._allocator = None
        if self._stream:
            self._cuda.destroy_stream(self._stream)
            self._stream = 0

    def _profile_for(self, shapes: dict[str, tuple[int, ...]]) -> int:
        for index, profile in enumerate(self.profiles):
            if all(
                len(shapes[name]) == len(low) and all(lo <= d <= hi for d, lo, hi in zip(shapes[name], low, high, strict=True))
                for name, (low, _, high) in profile.items()
            ):
                return index
        allowed = "; ".join(
            ", ".join(f"{name} {list(low)}..{list(high)}" for name, (low, _, high) in profile.items()) for profile in self.profiles
        )
        raise TrtforgeError(
            f"input shapes {dict((n, list(s)) for n, s in shapes.items())} fit no optimization profile of "
            f"{self.engine_path} (profiles: {allowed}): split the batch, or add a profile covering it to the target"
        )

    def _as_input(self, name: str, value: np.ndarray) -> np.ndarray:
        expected = self._dtypes[name]
        array = np.asarray(value)
        if array.dtype != expected and array.dtype.kind != expected.kind:
            raise TrtforgeError(f"input {name!r} of {self.engine_path} takes {expected}, got {array.dtype}: convert the data first")
        return np.ascontiguousarray(array, dtype=expected)

    def _device_buffer(self, name: str, shape: tuple[int, ...]) -> DeviceBuffer:
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = self._buffers[name] = DeviceBuffer(self._cuda, self._dtypes[name])
        buffer.resize(shape)
        if not self._context.set_tensor_address(name, buffer.ptr):
            raise StageError(
                "run", f"TensorRT refused the device address of tensor {name!r} of {self.engine_path} (its log above says why)"
            )
        return buffer

    def _prepare(self, arrays: dict[str, np.ndarray], profile: int) -> dict[str, tuple[int, ...] | None]:
        """Bind inputs (copied to the GPU) and output buffers; returns the output shapes, None where the data decides it."""
        if profile != self._active_profile:
            # The bindings raise RuntimeError for a refused profile rather than returning False.
            try:
                accepted = self._context.set_optimization_profile_async(profile, self._stream)
            except RuntimeError as err:
                raise StageError("run", f"TensorRT refused optimization profile {profile} of {self.engine_path}: {err}") from None
            if not accepted:
                raise StageError("run", f"TensorRT refused optimization profile {profile} of {self.engine_path}")
            self._active_profile = profile
        for name, array in arrays.items():
            if not self._context.set_input_shape(name, array.shape):
                raise TrtforgeError(f"TensorRT refused shape {list(array.shape)} for input {name!r} of {self.engine_path}")
            self._device_buffer(name, array.shape).copy_from(array, self._stream)
            # The copy is asynchronous: the host array must outlive it.
            self._pending.append(array)
        output_shapes: dict[str, tuple[int, ...] | None] = {}
        for name in self.output_names:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                self._allocate_on_demand(name)
                output_shapes[name] = None
                continue
            self._device_buffer(name, shape)
            output_shapes[name] = shape
        return output_shapes

    def _allocate_on_demand(self, name: str) -> None:
        if self._allocator is None:
            self._allocator = _output_allocator(self._trt, self._cuda, self._dtypes)
        if not self._context.set_output_allocator(name, self._allocator):
            raise StageError("run", f"TensorRT refused an output allocator for the data-dependent output {name!r} of {self.engine_path}")

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._stream):
            raise StageError("run", f"TensorRT failed to run {self.engine_path} (its log above says why)")

    def _validated(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise TrtforgeError(f"missing inputs {missing} for {self.engine_path}; it takes {self.input_names}")
        return {name: self._as_input(name, feeds[name]) for name in self.input_names}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = self._validated(feeds)
        output_shapes = self._prepare(arrays, self._profile_for({n: a.shape for n, a in arrays.items()}))
        self._enqueue()
        outputs = {}
        for name, shape in output_shapes.items():
            if shape is None:
                # TensorRT has reported the shape by the time the enqueue returns (it waits for it).
                outputs[name] = self._allocator.copy_out(name, self._stream)
                continue
            outputs[name] = np.empty(shape, dtype=self._dtypes[name])
            self._buffers[name].copy_to(outputs[name], self._stream)
        self._cuda.synchronize(self._stream)
        self._pending.clear()
        return outputs

    def time_ms(self, feeds: dict[str, np.ndarray], *, warmup: int, iterations: int) -> list[float]:
        """GPU milliseconds of each inference on ``feeds``, by CUDA events on the runner's stream."""
        arrays = self._validated(feeds)
        self._prepare(arrays, self._profile_for({n: a.shape for n, a in arrays.items()}))
        samples = time_on_stream(self._enqueue, self._stream, runs=iterations, warmup=warmup).samples_ms
        self._pending.clear()
        return list(samples)

    def measure_latency(self, runs: int = 200, warmup: int = 20, seed: int = 0) -> list[ProfileLatency]:
        """GPU latency of one inference at each profile's opt shapes: median and p99 over ``runs``."""
        rng = np.random.default_rng(seed)
        results = []
        for index, profile in enumerate(self.profiles):
            arrays = {}
            for name, (_, opt, _) in profile.items():
                dtype = self._dtypes[name]
                # Random values for float inputs; zeros for integer ones, which are valid ids and masks.
                arrays[name] = rng.random(opt).astype(dtype) if dtype.kind == "f" else np.zeros(opt, dtype=dtype)
            self._prepare(arrays, index)
            stats = time_on_stream(self._enqueue, self._stream, runs=runs, warmup=warmup)
            self._pending.clear()
            results.append(ProfileLatency(index, {n: list(a.shape) for n, a in arrays.items()}, stats))
        return results


# --- the backend ---------------------------------------------------------------------------------


class TensorRTBackend:
    name = "tensorrt"
    tag_prefix = "trt"
    target_model = TensorRTTarget

    def runtime_version(self) -> str | None:
        return probe_tensorrt().version

    def availability(self, target: Target) -> Availability:
        cuda = probe_cuda_runtime()
        return availability_for(target, probe_tensorrt(), usable_gpus(cuda), cuda)

    def build(
        self,
        onnx_path: Path,
        target: Target,
        spec: ModelSpec,
        out_dir: Path,
        options: BuildOptions = BuildOptions(),
    ) -> BuiltEngine:
        """Build ``onnx_path`` for ``target`` into ``out_dir``: engine.plan, build.json and layers.json.

        ``options.timing_cache`` is loaded before the build when it exists and saved (merged with
        whatever another build wrote there meanwhile) once the engine is written.
        """
        settings = build_settings(spec, target)
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise StageError(STAGE, f"ONNX model {onnx_path} does not exist: run the export and precision stages first")
        check_onnx_precision(onnx_path, target.precision, plugins=spec.plugins)
        libraries = plugin_libraries(spec)
        probe = probe_tensorrt()
        cuda = probe_cuda_runtime()
        gpus = usable_gpus(cuda)
        availability = availability_for(target, probe, gpus, cuda)
        if not availability.available:
            raise StageError(STAGE, f"cannot build the {target.arch} target on this worker: {availability.reason}")
        gpu = select_gpu(target, gpus)
        _use_gpu(gpu.pci_bus_id, STAGE)

        trt = importlib.import_module("tensorrt")
        from polygraphy.exception import PolygraphyException

        load_plugin_libraries(trt, libraries, STAGE)
        try:
            built = _build_serialized(trt, onnx_path, settings, options.timing_cache)
            layers = _layer_information(trt, built.engine_bytes)
        except PolygraphyException as err:
            raise StageError(STAGE, f"TensorRT could not build {onnx_path} for {target.arch}: {err}") from None

        out_dir = Path(out_dir)
        engine_path = out_dir / ENGINE_FILE
        engine_bytes = built.engine_bytes
        atomic_write_bytes(engine_path, engine_bytes)
        # Only a build whose engine is safely written adds its tactics to the shared cache.
        cache_use = built.save_timing_cache()

        layers_path = out_dir / LAYERS_FILE
        atomic_write_json(layers_path, layers)
        tag = target_tag(target, spec, probe.version)
        record = TensorRTBuildRecord(
            tag=tag,
            model=spec.name,
            precision=target.precision.value,
            target_arch=target.arch,
            tensorrt_version=probe.version,
            gpu_name=gpu.name,
            compute_capability=gpu.compute_capability,
            pci_bus_id=gpu.pci_bus_id,
            cuda_runtime_version=cuda.version,
            driver_version=gpus.driver_version,
            cuda_driver_version=gpus.cuda_driver_version,
            settings=settings,
            timing_cache=cache_use,
            plugin_libraries=[PluginLibrary(path=str(lib), sha256=sha256_file(lib)) for lib in libraries],
            onnx_file=onnx_path.name,
            onnx_sha256=sha256_file(onnx_path),
            engine_file=ENGINE_FILE,
            engine_bytes=len(engine_bytes),
            engine_sha256=sha256_file(engine_path),
            build_seconds=round(built.build_seconds, 3),
            layer_count=len(layers.get("Layers", [])),
            built_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        record_path = out_dir / RECORD_FILE
        atomic_write_text(record_path, record.model_dump_json(indent=2))
        return BuiltEngine(
            tag=tag,
            engine_path=engine_path,
            record=record.model_dump(mode="json"),
            extra_files={RECORD_FILE: record_path, LAYERS_FILE: layers_path},
        )

    def load_runner(
        self, engine_path: Path, *, runtime: RuntimeKind = "full", pci_bus_id: str | None = None, plugins: Sequence[Path] | None = None
    ) -> TensorRTRunner:
        """A runner for a plan; ``runtime="lean"`` loads it with the lean runtime (version-compatible engines).

        With build.json beside the plan (as after a build, for the gate), the runner uses the GPU
        that built it when this process sees that GPU model at that PCI bus id, and loads the plugin
        libraries it names after checking their sha256; ``pci_bus_id`` and ``plugins`` override both."""
        engine_path = Path(engine_path)
        record = _record_beside(engine_path)
        if plugins is None:
            plugins = _recorded_plugins(engine_path, record)
        if pci_bus_id is None and record:
            try:
                pci_bus_id = _build_gpu_here(record)
            except CudaError as err:
                raise StageError("load", str(err)) from None
        return TensorRTRunner(engine_path, runtime=runtime, pci_bus_id=pci_bus_id, plugins=plugins)

    def timing_cache_key(self, target: Target) -> str | None:
        """The shared cache of the GPU this worker would build ``target`` on, or None where it cannot build it."""
        version = self.runtime_version()
        cuda = probe_cuda_runtime()
        gpu = select_gpu(target, usable_gpus(cuda)) if version is not None and cuda.usable else None
        return timing_cache_key(version, gpu) if gpu is not None else None


def _enum_member(enum: Any, value: str, setting: str, version: str) -> Any:
    try:
        return getattr(enum, value.upper())
    except AttributeError:
        raise StageError(
            STAGE, f"TensorRT {version} has no {setting} {value!r}: upgrade TensorRT on this worker or change the target"
        ) from None


@dataclass
class _Built:
    """A serialized engine and the builder config it came from, whose timing cache is saved once the engine is written."""

    engine_bytes: bytes
    build_seconds: float
    config: Any
    timing_cache: Path | None
    cache_status: str
    loaded_bytes: int

    def save_timing_cache(self) -> TimingCacheUse | None:
        if self.timing_cache is None:
            return None
        status, saved = self.cache_status, 0
        if status != "foreign":
            status, saved = _save_timing_cache(self.config, self.timing_cache, status)
        return TimingCacheUse(path=str(self.timing_cache), status=status, loaded_bytes=self.loaded_bytes, saved_bytes=saved)


def _build_serialized(trt, onnx_path: Path, settings: TensorRTBuildSettings, timing_cache: Path | None) -> _Built:
    """The serialized engine, the seconds the builder took, and what happened to the timing cache."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    version = trt.__version__
    profiles = []
    for shape_profile in (ShapeProfile.from_dict(p) for p in settings.profiles):
        profile = Profile()
        for shapes in shape_profile.inputs:
            profile.add(shapes.name, min=shapes.min, opt=shapes.opt, max=shapes.max)
        profiles.append(profile)
    if not hasattr(trt, "TilingOptimizationLevel") and settings.tiling_optimization_level is not None:
        raise StageError(
            STAGE,
            f"TensorRT {version} has no tiling optimization level (TensorRT 10.8 added it): "
            f"remove tiling_optimization_level from the target or upgrade TensorRT",
        )
    create_config = CreateConfig(
        profiles=profiles,
        tf32=settings.tf32,
        builder_optimization_level=settings.builder_optimization_level,
        memory_pool_limits=({trt.MemoryPoolType.WORKSPACE: settings.workspace_bytes} if settings.workspace_bytes is not None else None),
        tiling_optimization_level=(
            _enum_member(trt.TilingOptimizationLevel, settings.tiling_optimization_level, "tiling optimization level", version)
            if settings.tiling_optimization_level is not None
            else None
        ),
        hardware_compatibility_level=(
            _enum_member(trt.HardwareCompatibilityLevel, settings.hardware_compatibility_level, "hardware compatibility level", version)
            if settings.hardware_compatibility_level != "none"
            else None
        ),
        version_compatible=settings.version_compatible,
        exclude_lean_runtime=settings.exclude_lean_runtime,
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
    )
    builder, network, parser = NetworkFromOnnxPath(str(onnx_path), strongly_typed=settings.strongly_typed)()
    config = create_config(builder, network)
    status, loaded_bytes = _load_timing_cache(config, timing_cache) if timing_cache is not None else ("new", 0)
    started = time.perf_counter()
    engine_bytes = EngineBytesFromNetwork((builder, network, parser), config=config)()
    build_seconds = time.perf_counter() - started
    return _Built(bytes(memoryview(engine_bytes)), build_seconds, config, timing_cache, status, loaded_bytes)


def _load_timing_cache(config, path: Path) -> tuple[str, int]:
    """Give the builder the cache at ``path`` (CreateConfig set an empty one); returns the
    ``TimingCacheUse.status`` and the bytes read. Caches are replaced atomically, so reading needs no lock."""
    data = path.read_bytes() if path.is_file() else b""
    if not data:
        return "new", 0
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # TensorRT's bindings raise their own error types for a blob that is not a cache
        cache = None
    if cache is None:
        return "unreadable", len(data)
    # A cache from another GPU model is refused (False, or an error from the bindings): build without it.
    try:
        accepted = config.set_timing_cache(cache, ignore_mismatch=False)
    except (RuntimeError, TypeError):
        accepted = False
    if not accepted:
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
        return "foreign", len(data)
    return "loaded", len(data)


def _save_timing_cache(config, path: Path, status: str) -> tuple[str, int]:
    """Save the build's timing cache to ``path``, merged with whatever another build saved there
    meanwhile; returns the status (``foreign`` when TensorRT would not combine that cache with
    this build's, which then stays as it is) and the bytes saved."""
    from polygraphy import util

    cache = config.get_timing_cache()
    path.parent.mkdir(parents=True, exist_ok=True)
    with util.LockFile(str(path)):
        if status != "unreadable" and path.is_file() and path.stat().st_size:
            try:
                stored = config.create_timing_cache(path.read_bytes())
            except Exception:  # TensorRT's bindings raise their own error types for a blob that is not a cache
                stored = None
            if stored is not None and not cache.combine(stored, ignore_mismatch=False):
                return "foreign", 0
        # IHostMemory's context manager is deprecated: copy the bytes out, then let it go.
        data = bytes(memoryview(cache.serialize()))
        atomic_write_bytes(path, data)
    return status, len(data)


def _layer_information(trt, engine_bytes: bytes) -> dict[str, Any]:
    """The engine inspector's JSON: ``Layers`` (one entry per layer), and the I/O tensors (``I/O Tensors``
    in TensorRT 11, ``Bindings`` in 10) as TensorRT names them."""
    from polygraphy.backend.trt import EngineFromBytes

    engine = EngineFromBytes(engine_bytes)()
    inspector = engine.create_engine_inspector()
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON) if inspector is not None else ""
    return json.loads(text) if text else {"Layers": []}


register_backend(TensorRTBackend())
