"""A Triton Inference Server model repository from a published version.

``write_repository`` pulls the chosen targets of one version through the registry's verified
pull (SHA-256, and the signature where required), writes ``<model>/config.pbtxt`` and
``<model>/1/`` with one plan per GPU architecture (``cc_model_filenames``) or the onnxruntime
engine, and renames the finished folder into place, so a failure leaves nothing behind.

Where the facts come from: the manifest records neither the spec nor the model's inputs and
outputs, so names, data types and dims are read from the ONNX graph of one of the version's
onnxruntime targets (every target of a version is built from the same ONNX, with its I/O types
kept); TensorRT's build.json records the optimization profiles (min/opt/max per input), and
the spec (``spec``, checked against the version's lineage) gives the dynamic ranges where no
TensorRT profile does.

Every generated config is parsed back with protobuf's ``text_format`` into Triton's own
``ModelConfig`` (``tritonclient.grpc.model_config_pb2``) and checked for what the schema cannot
say: every compute capability has its plan, the dims match the engine and the spec.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from trtforge.errors import TrtforgeError
from trtforge.gpu import capability_from_arch
from trtforge.registry import RegistryReader, TargetEntry, choose_target
from trtforge.registry.pull import EngineFacts, normalize_arch
from trtforge.safeio import atomic_directory, atomic_write_text, load_onnx_safely

CONFIG = "config.pbtxt"
MODEL_VERSION = "1"
PLATFORMS = {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx"}
INSTANCE_KINDS = {"tensorrt": "KIND_GPU", "onnxruntime": "KIND_CPU"}
ONNX_FILE = "model.onnx"
# Triton's classification extension reads class names from this file beside config.pbtxt, one per line.
LABELS_FILE = "labels.txt"
ONNXRUNTIME_DOMAIN = "com.microsoft"
# ONNX TensorProto element type names -> Triton data types (model_config.proto's DataType).
_TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FLOAT16": "TYPE_FP16",
    "FLOAT": "TYPE_FP32",
    "DOUBLE": "TYPE_FP64",
    "STRING": "TYPE_STRING",
    "BFLOAT16": "TYPE_BF16",
}
_SPEC_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32", "bool": "TYPE_BOOL"}


class TritonConfigError(TrtforgeError):
    """A Triton model configuration that the schema, the engine or the spec refuses."""


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError) as err:
        raise TrtforgeError(f"'trtforge triton' needs the triton extra ({err}): pip install 'trtforge[triton]'") from None
    return model_config_pb2


@dataclass(frozen=True)
class TensorFacts:
    """One input or output as the engine declares it: ints for static dims, names for dynamic ones."""

    name: str
    data_type: str
    dims: tuple[int | str, ...]


@dataclass(frozen=True)
class ModelIO:
    inputs: tuple[TensorFacts, ...]
    outputs: tuple[TensorFacts, ...]
    source: str

    @property
    def batch_dim(self) -> str | None:
        """The leading dim when it is one dynamic dim shared by every input and dynamic in every output, else None."""
        leading = {t.dims[0] if t.dims else None for t in self.inputs}
        if len(leading) != 1:
            return None
        name = leading.pop()
        if not isinstance(name, str) or not all(t.dims and isinstance(t.dims[0], str) for t in self.outputs):
            return None
        return name


def onnx_io(path: Path, where: str) -> ModelIO:
    """Names, Triton data types and dims of an ONNX graph's inputs and outputs (initializers are not inputs)."""
    import onnx

    # An onnxruntime engine is the graph onnxruntime optimized, with fused nodes of its own contrib domain:
    # onnxruntime (and so Triton's onnxruntime backend) implements them natively.
    model = load_onnx_safely(path, plugins=(ONNXRUNTIME_DOMAIN,))
    initializers = {init.name for init in model.graph.initializer}

    def facts(value) -> TensorFacts:
        tensor = value.type.tensor_type
        type_name = onnx.TensorProto.DataType.Name(tensor.elem_type)
        if type_name not in _TRITON_TYPES:
            raise TritonConfigError(f"{where}: {value.name!r} has ONNX type {type_name}, which Triton has no data type for")
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or f"{value.name}:{i}") for i, d in enumerate(tensor.shape.dim)
        )
        return TensorFacts(value.name, _TRITON_TYPES[type_name], dims)

    return ModelIO(
        inputs=tuple(facts(v) for v in model.graph.input if v.name not in initializers),
        outputs=tuple(facts(v) for v in model.graph.output),
        source=where,
    )


def check_spec_matches(spec, io: ModelIO) -> None:
    """The spec's inputs and outputs are the engine's: same names, data types and dims."""
    where = f"spec {spec.name!r}" + (f" ({spec.source})" if spec.source else "")
    engine_inputs = {t.name: t for t in io.inputs}
    if [i.name for i in spec.inputs] != list(engine_inputs):
        raise TritonConfigError(f"{where} has inputs {[i.name for i in spec.inputs]}, but {io.source} has {list(engine_inputs)}")
    if [o.name for o in spec.outputs] != [t.name for t in io.outputs]:
        raise TritonConfigError(f"{where} has outputs {[o.name for o in spec.outputs]}, but {io.source} has {[t.name for t in io.outputs]}")
    for inp in spec.inputs:
        engine = engine_inputs[inp.name]
        if _SPEC_TYPES[inp.dtype] != engine.data_type:
            raise TritonConfigError(f"{where}: input {inp.name!r} is {inp.dtype}, but {io.source} takes {engine.data_type}")
        static = [(d if isinstance(d, int) else None) for d in inp.shape]
        if static != [(d if isinstance(d, int) else None) for d in engine.dims]:
            raise TritonConfigError(f"{where}: input {inp.name!r} has shape {inp.shape}, but {io.source} has {list(engine.dims)}")


@dataclass(frozen=True)
class BatchRange:
    """The batch dim's largest size every plan serves, and the opt sizes of its profiles."""

    max: int
    opts: tuple[int, ...]


def _profile_batch(entry: TargetEntry, io: ModelIO) -> tuple[int, list[int]] | None:
    """(largest batch, opt batches) over the TensorRT profiles that build.json records, or None without profiles."""
    settings = entry.record.get("settings")
    profiles = settings.get("profiles") if isinstance(settings, dict) else None
    if not profiles:
        return None
    first_input = io.inputs[0].name
    try:
        shapes = [profile[first_input] for profile in profiles]
        return max(int(s["max"][0]) for s in shapes), [int(s["opt"][0]) for s in shapes]
    except (KeyError, IndexError, TypeError, ValueError):
        raise TritonConfigError(
            f"the build record of target {entry.tag} has profiles without min/opt/max shapes for input {first_input!r}: "
            "re-publish the target, or pass --spec"
        ) from None


def batch_range(entries: Sequence[TargetEntry], io: ModelIO, spec) -> BatchRange | None:
    """The batch dim's range from the plans' profiles, else the spec; None when the model has no batch dim."""
    dim = io.batch_dim
    if dim is None:
        return None
    recorded = [found for entry in entries if (found := _profile_batch(entry, io)) is not None]
    if recorded and len(recorded) == len(entries):
        largest = min(high for high, _ in recorded)
        opts = sorted({opt for _, opts in recorded for opt in opts if opt <= largest})
        return BatchRange(largest, tuple(opts))
    if spec is not None:
        declared = next(inp.dynamic[dim] for inp in spec.inputs if dim in inp.dynamic)
        return BatchRange(declared.max, (declared.opt,))
    raise TritonConfigError(
        f"{io.source} has a dynamic batch dim {dim!r}, and no build record of the chosen targets records its range: "
        "pass --spec with the spec the version was built from"
    )


def _dims(tensor: TensorFacts, batched: bool) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in (tensor.dims[1:] if batched else tensor.dims)]


@dataclass(frozen=True)
class ConfigOptions:
    max_queue_delay_us: int = 100
    cuda_graphs: bool = False
    instances: int = 1


def build_config(
    model: str,
    backend: str,
    plans: dict[str, str],
    default: str,
    io: ModelIO,
    batch: BatchRange | None,
    options: ConfigOptions,
    labeled: Sequence[str] = (),
):
    """Triton's ModelConfig message for one model; ``plans`` maps compute capabilities ("9.0") to plan file names,
    ``labeled`` names the outputs whose class names are in LABELS_FILE."""
    pb = _model_config_pb2()
    config = pb.ModelConfig(name=model, platform=PLATFORMS[backend], max_batch_size=batch.max if batch else 0)
    for tensors, field in ((io.inputs, config.input), (io.outputs, config.output)):
        for tensor in tensors:
            added = field.add(name=tensor.name, data_type=pb.DataType.Value(tensor.data_type), dims=_dims(tensor, batch is not None))
            if tensor.name in labeled:
                added.label_filename = LABELS_FILE
    if batch is not None:
        config.dynamic_batching.preferred_batch_size.extend(batch.opts)
        config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    config.instance_group.add(count=options.instances, kind=pb.ModelInstanceGroup.Kind.Value(INSTANCE_KINDS[backend]))
    if options.cuda_graphs:
        config.optimization.cuda.graphs = True
    config.default_model_filename = default
    for capability, name in plans.items():
        config.cc_model_filenames[capability] = name
    return config


def parse_config(text: str, where: str):
    """``text`` parsed against Triton's schema; TritonConfigError with the parser's line and column otherwise."""
    from google.protobuf import text_format

    pb = _model_config_pb2()
    try:
        return text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as err:
        raise TritonConfigError(f"{where} does not follow Triton's model configuration schema: {err}") from None


def check_config(text: str, model_dir: Path, io: ModelIO, batch: BatchRange | None) -> None:
    """Schema first, then what the schema cannot check: the files it names exist, the tensors are the engine's."""
    where = str(model_dir / CONFIG)
    config = parse_config(text, where)
    pb = _model_config_pb2()
    if config.name != model_dir.name:
        raise TritonConfigError(f"{where} names model {config.name!r}, but Triton loads it from folder {model_dir.name!r}")
    version_dir = model_dir / MODEL_VERSION
    for capability, name in sorted(config.cc_model_filenames.items()):
        if not (version_dir / name).is_file():
            raise TritonConfigError(f"{where}: compute capability {capability} maps to {name}, which is not in {version_dir}")
    if not config.default_model_filename or not (version_dir / config.default_model_filename).is_file():
        raise TritonConfigError(f"{where}: default_model_filename {config.default_model_filename!r} is not in {version_dir}")
    expected_batch = batch.max if batch else 0
    if config.max_batch_size != expected_batch:
        raise TritonConfigError(
            f"{where}: max_batch_size is {config.max_batch_size}, but {io.source} serves batches up to {expected_batch}"
        )
    if batch is not None and any(size > batch.max for size in config.dynamic_batching.preferred_batch_size):
        raise TritonConfigError(
            f"{where}: preferred_batch_size {list(config.dynamic_batching.preferred_batch_size)} exceeds max_batch_size {batch.max}"
        )
    for output in config.output:
        if output.label_filename and not (model_dir / output.label_filename).is_file():
            raise TritonConfigError(
                f"{where}: output {output.name!r} has label_filename {output.label_filename!r}, which is not in {model_dir}"
            )
    for kind, declared, facts in (("input", config.input, io.inputs), ("output", config.output, io.outputs)):
        if [t.name for t in declared] != [t.name for t in facts]:
            raise TritonConfigError(f"{where}: {kind}s {[t.name for t in declared]} are not {io.source}'s {[t.name for t in facts]}")
        for tensor, fact in zip(declared, facts):
            if pb.DataType.Name(tensor.data_type) != fact.data_type:
                raise TritonConfigError(
                    f"{where}: {kind} {tensor.name!r} is {pb.DataType.Name(tensor.data_type)}, but {io.source} has {fact.data_type}"
                )
            if list(tensor.dims) != _dims(fact, batch is not None):
                raise TritonConfigError(
                    f"{where}: {kind} {tensor.name!r} has dims {list(tensor.dims)}, but {io.source} has {list(fact.dims)} "
                    f"({'batch dim first, left out' if batch else 'no batch dim'}: expected {_dims(fact, batch is not None)})"
                )


class RepositoryPlan(BaseModel):
    capability: str | None
    arch: str | None
    tag: str
    file: str
    sha256: str


class TritonRepository(BaseModel):
    """What ``write_repository`` wrote: the body of ``trtforge triton --json``."""

    model: str
    version: int
    repository: str
    model_dir: str
    platform: str
    max_batch_size: int
    preferred_batch_size: list[int]
    default_model_filename: str
    plans: list[RepositoryPlan]
    io_source: str
    config: str


def _choose_entries(manifest, backend: str | None, archs: Sequence[str] | None, all_archs: bool, precision: str | None) -> tuple[str, dict]:
    """The backend and, per compute capability (None for onnxruntime), the target serving it."""
    trt = [e for e in manifest.targets.values() if EngineFacts.of(e.record).backend == "tensorrt"]
    if archs and all_archs:
        raise TrtforgeError("give --arch or --all-archs, not both")
    if backend is None:
        backend = "tensorrt" if archs or all_archs or trt else "onnxruntime"
    if backend not in PLATFORMS:
        raise TrtforgeError(f"backend {backend!r} has no Triton platform here; use one of {', '.join(PLATFORMS)}")
    if backend == "onnxruntime":
        if archs or all_archs:
            raise TrtforgeError("--arch and --all-archs choose TensorRT plans: leave them out for --backend onnxruntime")
        return backend, {None: choose_target(manifest, backend="onnxruntime", precision=precision)}
    if not archs:
        facts = [EngineFacts.of(e.record) for e in trt]
        archs = sorted({f.arch for f in facts if f.arch and (precision is None or f.precision == precision)}, key=capability_from_arch)
        if not archs:
            raise TrtforgeError(
                f"{manifest.model} version {manifest.version} has no TensorRT target{f' of precision {precision}' if precision else ''}: "
                "pass --backend onnxruntime for its CPU engine"
            )
    chosen = {}
    for arch in dict.fromkeys(normalize_arch(a) for a in archs):
        major, minor = capability_from_arch(arch)
        chosen[f"{major}.{minor}"] = choose_target(manifest, arch=arch, precision=precision, backend="tensorrt")
    return backend, chosen


def _io_target(manifest, entries: dict) -> TargetEntry:
    """The onnxruntime target whose ONNX graph gives the model's inputs and outputs: fp32 where there is one."""
    onnx_targets = sorted(
        (e for e in manifest.targets.values() if EngineFacts.of(e.record).backend == "onnxruntime"),
        key=lambda e: (EngineFacts.of(e.record).precision != "fp32", e.tag),
    )
    chosen = [e for e in entries.values() if EngineFacts.of(e.record).backend == "onnxruntime"]
    if chosen:
        return chosen[0]
    if not onnx_targets:
        raise TritonConfigError(
            f"{manifest.model} version {manifest.version} has no onnxruntime target, and TensorRT's build.json records input "
            "shapes but not data types or outputs: publish the model with an onnxruntime target (every CPU run builds one) "
            "so its ONNX graph gives the inputs and outputs"
        )
    return onnx_targets[0]


def write_repository(
    reader: RegistryReader,
    model: str,
    repository: Path,
    *,
    version: int | None = None,
    alias: str | None = None,
    archs: Sequence[str] | None = None,
    all_archs: bool = False,
    backend: str | None = None,
    precision: str | None = None,
    spec_path: Path | None = None,
    options: ConfigOptions = ConfigOptions(),
    replace: bool = False,
    cache_dir: Path | None = None,
    require_signature: bool | None = None,
    trust: Any = None,
) -> TritonRepository:
    """Write ``repository/<model>/`` (config.pbtxt and 1/) for one published version, atomically."""
    repository = Path(repository).absolute()
    if repository.exists() and not replace:
        raise TrtforgeError(f"{repository} already exists: give a new folder, or pass --replace to swap it for the new repository")
    if options.instances < 1:
        raise TrtforgeError(f"--instances must be at least 1, not {options.instances}")
    if options.max_queue_delay_us < 0:
        raise TrtforgeError(f"--max-queue-delay-us must be 0 or more, not {options.max_queue_delay_us}")
    number = reader.resolve(model, version=version, alias=alias)
    manifest = reader.manifest(model, number)
    backend, entries = _choose_entries(manifest, backend, archs, all_archs, precision)
    if options.cuda_graphs and backend != "tensorrt":
        raise TrtforgeError("--cuda-graphs applies to TensorRT plans only; Triton's onnxruntime backend does not take it")
    spec = None
    if spec_path is not None:
        from trtforge.spec import load_spec

        spec = load_spec(spec_path)
        recorded = manifest.lineage.spec_sha256
        if recorded and spec.sha256() != recorded:
            raise TritonConfigError(
                f"spec {spec_path} (sha256 {spec.sha256()}) is not the spec {model} version {number} was built from "
                f"(sha256 {recorded}): pass that spec, or leave --spec out"
            )
    io_entry = _io_target(manifest, entries)
    pull = {"version": number, "cache_dir": cache_dir, "require_signature": require_signature, "trust": trust}

    with atomic_directory(repository, replace=replace) as staging:
        model_dir = staging / model
        version_dir = model_dir / MODEL_VERSION
        version_dir.mkdir(parents=True)
        # Pulled beside the repository's content, then moved in: the same filesystem, so a rename.
        pulls = staging / ".pulls"
        pulled: dict[str, Path] = {}
        for entry in {e.tag: e for e in [*entries.values(), io_entry]}.values():
            result = reader.pull(model, pulls / entry.tag, tag=entry.tag, **pull)
            pulled[entry.tag] = Path(result.path)
        io = onnx_io(pulled[io_entry.tag], f"the ONNX graph of {model} version {number} target {io_entry.tag}")
        if spec is not None:
            check_spec_matches(spec, io)
        batch = batch_range(list(entries.values()), io, spec)

        files: dict[str, str] = {}
        plans = []
        for capability, entry in entries.items():
            name = ONNX_FILE if backend == "onnxruntime" else f"{entry.tag}.plan"
            if not (version_dir / name).exists():
                os.replace(pulled[entry.tag], version_dir / name)
            files[capability or ""] = name
            facts = EngineFacts.of(entry.record)
            plans.append(
                RepositoryPlan(
                    capability=capability,
                    arch=facts.arch if capability else None,
                    tag=entry.tag,
                    file=name,
                    sha256=entry.files[entry.primary_file].sha256,
                )
            )
        shutil.rmtree(pulls)
        cc_files = {cc: name for cc, name in files.items() if cc}
        default = _default_plan(entries, files)
        labeled = _write_labels(manifest, model_dir)
        config = build_config(model, backend, cc_files, default, io, batch, options, labeled)
        from google.protobuf import text_format

        text = text_format.MessageToString(config)
        check_config(text, model_dir, io, batch)
        atomic_write_text(model_dir / CONFIG, text)

    return TritonRepository(
        model=model,
        version=number,
        repository=str(repository),
        model_dir=str(repository / model),
        platform=PLATFORMS[backend],
        max_batch_size=config.max_batch_size,
        preferred_batch_size=list(config.dynamic_batching.preferred_batch_size),
        default_model_filename=default,
        plans=plans,
        io_source=io.source,
        config=text,
    )


def _write_labels(manifest, model_dir: Path) -> list[str]:
    """The class-score outputs of a classifier whose manifest names its classes, after writing LABELS_FILE for them."""
    serving = manifest.serving
    if serving is None or serving.class_names is None:
        return []
    labeled = [o.name for o in serving.outputs if o.meaning == "class_scores"]
    if labeled:
        broken = [name for name in serving.class_names if "\n" in name or "\r" in name]
        if broken:
            raise TritonConfigError(f"class names {broken} hold line breaks, which Triton's one-name-per-line {LABELS_FILE} cannot")
        atomic_write_text(model_dir / LABELS_FILE, "".join(f"{name}\n" for name in serving.class_names))
    return labeled


def _default_plan(entries: dict, files: dict[str, str]) -> str:
    """The file Triton loads on a GPU missing from cc_model_filenames: a plan built to run on every Ampere-or-newer GPU
    where there is one, else the first architecture asked for."""
    for capability, entry in entries.items():
        if EngineFacts.of(entry.record).hardware_compatibility == "ampere_plus":
            return files[capability or ""]
    return files[next(iter(entries)) or ""]
