"""Stage 'convert-precision': the ONNX a target's engine is built from, at the target's precision.

TensorRT 10 (strongly typed) and 11 take precision from the ONNX itself, so this stage puts it there:

- fp32: the input model as it is;
- fp16, bf16: ModelOpt AutoCast mixed precision, graph inputs and outputs kept in fp32, with
  nodes whose values overflow the low-precision range (seen on calibration samples) kept in fp32;
- int8, fp8: ModelOpt explicit Q/DQ post-training quantization, calibrated on onnxruntime's CPU
  execution provider with the calibration set cut into batches at the spec's opt shape.

ModelOpt places Q/DQ for TensorRT; onnxruntime's CPU kernels do not fuse that placement into
integer kernels. So int8 for a backend whose ``quantizer`` is ``onnxruntime`` (the onnxruntime
CPU backend) is made by onnxruntime's own static quantizer instead: its pre-processing, then
QDQ with per-channel weights, and the activation type and ``reduce_range`` that onnxruntime's
documentation gives for the converting machine's instructions (VNNI or not, x86 or ARM),
calibrated on the same batches. Both are separate cache entries; the quantizer, its version and
its settings are part of the key, of the result, and of the converted model's metadata
(``trtforge.quantizer``), from which the build records them.

The conversion runs in a child process: ModelOpt and onnxruntime's quantizer drive native code
(onnxruntime sessions over rewritten graphs) that can crash on unusual models, and they log to
stdout, which belongs to the CLI's output. Results are cached by the content of everything that
decides them; an entry is assembled in a hidden folder and renamed into place, so a cache entry
is always complete.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import platform
import re
import shutil
import tempfile
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from trtforge.calibration import content_sha256
from trtforge.environment import cpu_info
from trtforge.errors import StageError
from trtforge.hashing import sha256_file
from trtforge.isolation import run_isolated
from trtforge.lineage import stage_cache_key
from trtforge.localcache import mark_used
from trtforge.numeric import NUMPY_DTYPES
from trtforge.onnxfacts import DEFAULT_DOMAINS, PrecisionFacts, constant_value, precision_facts
from trtforge.safeio import OnnxModelError, atomic_directory, atomic_write_text, external_data_files, load_arrays, load_onnx_safely
from trtforge.serving import carry_metadata
from trtforge.spec import InputSpec, ModelSpec, Precision, PrecisionOptions
from trtforge.stages.runner import Stage

STAGE = "convert-precision"
MODEL_FILE = "model.onnx"
RESULT_FILE = "result.json"
# AutoCast only needs value ranges to decide which nodes overflow fp16/bf16: a few batches do.
REFERENCE_BATCHES = 4
DEFAULT_TIMEOUT_S = 3600.0
METHOD_AS_IS = "as-is"
METHOD_AUTOCAST = "autocast"
# The precision options each conversion reads, and so its cache key: a change to an int8 option
# must not re-run fp16's AutoCast, and the ladder's settings decide no conversion at all.
_AUTOCAST_OPTIONS = {"keep_fp32_op_types", "keep_fp32_nodes"}
_QUANTIZE_OPTIONS = {"calibration_method", "exclude_op_types", "exclude_nodes", "high_precision_dtype"}
OPTIONS_READ: dict[Precision, set[str]] = {
    Precision.FP32: set(),
    Precision.FP16: _AUTOCAST_OPTIONS,
    Precision.BF16: _AUTOCAST_OPTIONS,
    Precision.INT8: _QUANTIZE_OPTIONS,
    Precision.FP8: _QUANTIZE_OPTIONS,
}
# onnxruntime's quantizer keeps excluded nodes in fp32: it has no other high precision on CPU.
ONNXRUNTIME_OPTIONS_READ = _QUANTIZE_OPTIONS - {"high_precision_dtype"}
QUANTIZER_METADATA_KEY = "trtforge.quantizer"
# CPU flags (Linux /proc/cpuinfo names) of the 8-bit dot-product instructions that accumulate without saturating.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
ONNXRUNTIME_CALIBRATION_METHODS = {"entropy": "Entropy", "max": "MinMax"}
# The ops whose int8 kernels are the speed-up. onnxruntime's quantizer also quantizes the ops between them (Add,
# Relu, pooling, Reshape): int8 then flows from one compute op to the next, where quantizing the compute ops alone
# puts a DequantizeLinear/QuantizeLinear pair around each of the others. On a 16-core Xeon with AVX512-VNNI and AMX,
# ResNet-18 at batch 32 ran 2.78x fp32 that way, 1.42x with the compute ops alone. What follows the last compute op
# (a detector's box decoding and Concat of pixels with 0-1 scores, a softmax) gains nothing from int8 and loses
# precision at the outputs: it stays fp32. On the shapes detector, quantizing it too cost 2.65 points of mAP.
ONNXRUNTIME_COMPUTE_OP_TYPES = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


class Quantizer(StrEnum):
    """Who makes an int8 model: ModelOpt (Q/DQ placed for TensorRT) or onnxruntime's quantizer (for its CPU kernels)."""

    MODELOPT = "modelopt"
    ONNXRUNTIME = "onnxruntime"


def quantizer_for(backend) -> Quantizer:
    """The quantizer a backend's int8 engines want: its ``quantizer`` attribute; ModelOpt where it names none (TensorRT)."""
    return Quantizer(getattr(backend, "quantizer", Quantizer.MODELOPT))


class ConversionResult(BaseModel):
    """What the conversion produced. ``seconds`` is the time the conversion itself took, also for a cache hit."""

    onnx_path: Path
    precision: Precision
    method: str
    qdq_node_count: int
    quantized_op_types: dict[str, int]
    kept_op_types: dict[str, int]
    modelopt_version: str | None
    # The library that converted the model (ModelOpt also for fp16/bf16, through AutoCast), its version and
    # the settings it was given; None for fp32, which is not converted.
    quantizer: Quantizer | None = None
    quantizer_version: str | None = None
    quantizer_settings: dict[str, Any] = {}
    calibration_samples: int
    seconds: float
    sha256: str
    cache_key: str | None
    cached: bool


@dataclass(frozen=True)
class BatchPlan:
    """How the calibration set is cut: ``batches`` batches of ``batch_size`` samples, the remainder left out."""

    batch_size: int
    batches: int

    @property
    def samples(self) -> int:
        return self.batch_size * self.batches


def convert_precision(
    onnx_path: Path,
    precision: Precision,
    calibration: Mapping[str, np.ndarray] | None,
    options: PrecisionOptions,
    *,
    spec: ModelSpec,
    cache_dir: Path,
    calibration_sha256: str | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    quantizer: Quantizer = Quantizer.MODELOPT,
) -> ConversionResult:
    """Convert ``onnx_path`` to ``precision``; ``calibration`` holds one array per model input, samples on axis 0.

    int8 and fp8 need calibration data; fp16 and bf16 use it (when given) to find values that
    overflow the low precision. ``calibration_sha256`` identifies the data for the cache key;
    without it the arrays themselves are hashed. ``quantizer`` decides int8 only (see
    ``quantizer_for``): fp16, bf16 and fp8 are ModelOpt's, whichever it names.
    """
    started = time.perf_counter()
    precision = Precision(precision)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise StageError(STAGE, f"ONNX model {onnx_path} does not exist: run the export and simplify stages first")
    model = load_onnx_safely(onnx_path, plugins=spec.plugins, load_external_data=False)

    if precision is Precision.FP32:
        facts = precision_facts(model)
        return ConversionResult(
            onnx_path=onnx_path,
            precision=precision,
            method=METHOD_AS_IS,
            qdq_node_count=facts.qdq_nodes,
            quantized_op_types=facts.reduced_op_types,
            kept_op_types=facts.fp32_op_types,
            modelopt_version=None,
            calibration_samples=0,
            seconds=time.perf_counter() - started,
            sha256=sha256_file(onnx_path),
            cache_key=None,
            cached=False,
        )

    if precision.needs_calibration and calibration is None:
        raise StageError(
            STAGE,
            f"{precision.value} conversion of {onnx_path} needs calibration data: add a 'calibration' section "
            "with 'data: PATH' to the spec (or choose fp32, fp16 or bf16 for this target)",
        )
    _check_options(options, model.graph, onnx_path, precision)
    model_inputs = _model_inputs(model.graph, spec, onnx_path)
    plan = None
    if calibration is not None:
        plan = plan_batches(calibration, model_inputs, onnx_path)
    quantizer = Quantizer(quantizer) if precision is Precision.INT8 else Quantizer.MODELOPT
    stamp = quantizer_stamp(quantizer)

    key = _cache_key(onnx_path, model, precision, calibration, calibration_sha256, options, model_inputs, plan, stamp)
    entry = cache_dir / key
    hit = _read_entry(entry)
    if hit is not None:
        return hit

    try:
        with atomic_directory(entry) as partial:
            work = partial / "work"
            work.mkdir()
            source = _stage_input(onnx_path, model, work)
            batch_dir = None
            if calibration is not None:
                batch_dir = work / "calibration"
                limit = REFERENCE_BATCHES if not precision.needs_calibration else None
                _write_batches(calibration, model_inputs, plan, batch_dir, limit)
            destination = partial / MODEL_FILE
            facts = run_isolated(
                STAGE,
                convert_file,
                str(source),
                str(destination),
                precision.value,
                str(batch_dir) if batch_dir else None,
                options.model_dump(mode="json"),
                list(spec.plugins),
                stamp,
                timeout_s=timeout_s,
            )
            shutil.rmtree(work)
            result = ConversionResult(
                onnx_path=entry / MODEL_FILE,
                precision=precision,
                method=METHOD_AUTOCAST if precision in (Precision.FP16, Precision.BF16) else options.calibration_method,
                qdq_node_count=facts.qdq_nodes,
                quantized_op_types=facts.reduced_op_types,
                kept_op_types=facts.fp32_op_types,
                modelopt_version=modelopt_version() if quantizer is Quantizer.MODELOPT else None,
                quantizer=quantizer,
                quantizer_version=stamp["version"],
                quantizer_settings=stamp["settings"],
                calibration_samples=_used_samples(precision, plan),
                seconds=time.perf_counter() - started,
                sha256=sha256_file(destination),
                cache_key=key,
                cached=False,
            )
            atomic_write_text(partial / RESULT_FILE, result.model_dump_json(indent=2))
    except FileExistsError:
        # Another run finished the same conversion first; its entry is equivalent to ours.
        concurrent = _read_entry(entry)
        if concurrent is None:
            raise StageError(STAGE, f"cannot write the cache entry {entry}: remove it and run again") from None
        return concurrent
    return result


def modelopt_version() -> str:
    return importlib.metadata.version("nvidia-modelopt")


def quantizer_stamp(quantizer: Quantizer) -> dict[str, Any]:
    """What the converted model records of its making: the quantizer, its version, and the settings that decide its output."""
    if quantizer is Quantizer.MODELOPT:
        return {"name": quantizer.value, "version": modelopt_version(), "settings": {}}
    import onnxruntime

    return {"name": quantizer.value, "version": onnxruntime.__version__, "settings": onnxruntime_int8_settings()}


def onnxruntime_int8_settings(machine: str | None = None, cpu_flags: frozenset[str] | None = None) -> dict[str, Any]:
    """onnxruntime's documented choice for CPU inference (quantize_static's "Choosing parameters for CPU inference"),
    for ``machine`` and ``cpu_flags`` (default: this one's): QDQ, per-channel int8 weights; uint8 activations on x86,
    with weights reduced to 7 bits where the CPU lacks VNNI (its 8-bit multiply-add saturates 16-bit sums); int8
    activations on ARM."""
    machine = (machine or platform.machine()).lower()
    if machine in ("arm64", "aarch64"):
        return {
            "format": "QDQ",
            "per_channel": True,
            "activation_type": "QInt8",
            "weight_type": "QInt8",
            "reduce_range": False,
            "cpu": "arm",
        }
    flags = cpu_flags if cpu_flags is not None else _cpu_flags()
    vnni = sorted(flags & VNNI_FLAGS)
    return {
        "format": "QDQ",
        "per_channel": True,
        "activation_type": "QUInt8",
        "weight_type": "QInt8",
        "reduce_range": not vnni,
        "cpu": f"x86 with {', '.join(vnni)}" if vnni else "x86 without VNNI",
    }


def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them; none elsewhere, which chooses the settings that are safe without VNNI."""
    return frozenset((cpu_info("flags") or "").split())


def plan_batches(calibration: Mapping[str, np.ndarray], model_inputs: list[InputSpec], onnx_path: Path) -> BatchPlan:
    """Check the calibration arrays against the model's inputs and cut them into opt-shape batches.

    Axis 0 of every array holds the samples; the other axes must equal the input's opt shape.
    """
    expected_names = [inp.name for inp in model_inputs]
    missing = [name for name in expected_names if name not in calibration]
    extra = sorted(name for name in calibration if name not in expected_names)
    if missing:
        inp = next(i for i in model_inputs if i.name == missing[0])
        raise StageError(
            STAGE,
            f"calibration data has no array for input {inp.name!r} of {onnx_path} (expected shape "
            f"{_expected_shape(inp)}, {inp.dtype}); the data holds {sorted(calibration)}: "
            "key the calibration arrays by the model's input names",
        )
    if extra:
        raise StageError(
            STAGE,
            f"calibration data has arrays {extra} that are not inputs of {onnx_path} (its inputs: {expected_names}): "
            "remove them or rename them to the model's input names",
        )
    counts = {}
    for inp in model_inputs:
        array = calibration[inp.name]
        opt = inp.shape_at("opt")
        if array.ndim != len(opt) or tuple(array.shape[1:]) != opt[1:]:
            raise StageError(
                STAGE,
                f"calibration array {inp.name!r} has shape {tuple(array.shape)}, but input {inp.name!r} of "
                f"{onnx_path} expects {_expected_shape(inp)} (samples on axis 0, the rest at the spec's opt shape): "
                "regenerate the calibration set at that shape",
            )
        if array.dtype != np.dtype(NUMPY_DTYPES[inp.dtype]):
            raise StageError(
                STAGE,
                f"calibration array {inp.name!r} is {array.dtype}, but input {inp.name!r} of {onnx_path} takes "
                f"{inp.dtype}: convert the calibration data to {inp.dtype}",
            )
        counts[inp.name] = array.shape[0]
    if len(set(counts.values())) > 1:
        raise StageError(STAGE, f"calibration arrays hold different sample counts {counts}: every input needs one array entry per sample")
    samples = next(iter(counts.values()))
    batch_sizes = {inp.shape_at("opt")[0] for inp in model_inputs}
    if len(batch_sizes) > 1:
        raise StageError(
            STAGE, f"the inputs of {onnx_path} have different opt sizes on axis 0 {sorted(batch_sizes)}: calibration needs one batch size"
        )
    batch_size = batch_sizes.pop()
    if samples >= batch_size:
        return BatchPlan(batch_size=batch_size, batches=samples // batch_size)
    first = model_inputs[0]
    if samples >= 1 and isinstance(first.shape[0], str) and samples >= first.dynamic[first.shape[0]].min:
        return BatchPlan(batch_size=samples, batches=1)
    raise StageError(
        STAGE,
        f"calibration data holds {samples} samples, fewer than one batch of {batch_size} for {onnx_path}: "
        "add calibration samples (calibration.min_samples in the spec sets the floor)",
    )


def convert_file(
    source: str, destination: str, precision: str, batch_dir: str | None, options: dict, plugins: list[str], stamp: dict[str, Any]
) -> PrecisionFacts:
    """Runs in the child process: the quantizer ``stamp`` names on ``source``, the result checked and written to ``destination``."""
    import onnx

    settings = PrecisionOptions.model_validate(options)
    batch_files = sorted(Path(batch_dir).glob("*.npz")) if batch_dir else []
    try:
        if stamp["name"] == Quantizer.ONNXRUNTIME.value:
            _quantize_with_onnxruntime(source, destination, batch_files, settings, stamp["settings"])
        elif precision in (Precision.FP16.value, Precision.BF16.value):
            from modelopt.onnx.autocast import convert_to_mixed_precision

            converted = convert_to_mixed_precision(
                onnx_path=source,
                low_precision_type=precision,
                nodes_to_exclude=settings.keep_fp32_nodes,
                op_types_to_exclude=settings.keep_fp32_op_types,
                keep_io_types=True,
                calibration_data=batch_dir,
                providers=["cpu"],
            )
            onnx.save(converted, destination)
        else:
            from modelopt.onnx.quantization import quantize

            quantize(
                onnx_path=source,
                quantize_mode=precision,
                calibration_data_reader=_batch_reader(batch_files),
                calibration_method=settings.calibration_method,
                calibration_eps=["cpu"],
                op_types_to_exclude=settings.exclude_op_types or None,
                nodes_to_exclude=settings.exclude_nodes or None,
                high_precision_dtype=settings.high_precision_dtype,
                output_path=destination,
                log_level="WARNING",
            )
        if not Path(destination).is_file():
            raise RuntimeError(f"{stamp['name']} finished without writing a model")
        carry_metadata(Path(source), Path(destination))
        _stamp_quantizer(Path(destination), stamp)
        onnx.checker.check_model(destination, full_check=True)
    except StageError:
        raise
    except Exception as err:
        raise StageError(STAGE, _describe_failure(err, source, precision, plugins, stamp["name"])) from None
    return precision_facts(load_onnx_safely(Path(destination), plugins=plugins, load_external_data=False))


def _quantize_with_onnxruntime(source: str, destination: str, batch_files: list[Path], options: PrecisionOptions, settings: dict) -> None:
    """onnxruntime's static quantizer after its pre-processing (shape inference and the graph optimizations that make
    quantization's patterns), with the spec's exclusions resolved to the pre-processed graph's node names."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = str(Path(source).resolve())
    preprocessed = Path(source).with_name("preprocessed.onnx")
    # Where symbolic shape inference gives up it saves its partial model into the working directory: a scratch
    # folder (this runs in its own child process), not the user's.
    with tempfile.TemporaryDirectory(prefix="trtforge-quant-") as scratch, contextlib.chdir(scratch):
        try:
            quant_pre_process(source, str(preprocessed))
        except Exception as err:
            # Symbolic shape inference gives up on some graphs (the shapes segmenter's Resize): onnx's own shape
            # inference then still runs, and what it cannot infer stays unquantized rather than failing the target.
            if "symbolic shape inference" not in str(err).lower():
                raise
            quant_pre_process(source, str(preprocessed), skip_symbolic_shape=True)
    model = onnx.load(str(preprocessed), load_external_data=False)
    if global_means_as_global_average_pools(model.graph):
        onnx.save(model, str(preprocessed))
    nodes = model.graph.node
    excluded = [node.name for node in nodes if node.op_type in options.exclude_op_types] + output_tail(nodes)
    for pattern in options.exclude_nodes:
        regex = re.compile(pattern)
        matched = [node.name for node in nodes if regex.match(node.name)]
        if not matched:
            raise StageError(
                STAGE,
                f"precision.exclude_nodes pattern {pattern!r} matches no node of {source} after onnxruntime's quantization "
                "pre-processing, which fused or renamed the node: name a node that pre-processing keeps",
            )
        excluded += matched
    quantize_static(
        str(preprocessed),
        destination,
        _batch_reader(batch_files),
        quant_format=QuantFormat[settings["format"]],
        per_channel=settings["per_channel"],
        reduce_range=settings["reduce_range"],
        activation_type=QuantType[settings["activation_type"]],
        weight_type=QuantType[settings["weight_type"]],
        nodes_to_exclude=sorted(set(excluded)) or None,
        calibrate_method=CalibrationMethod[ONNXRUNTIME_CALIBRATION_METHODS[options.calibration_method]],
        calibration_providers=["CPUExecutionProvider"],
    )


def global_means_as_global_average_pools(graph) -> list[str]:
    """Rewrite, in ``graph``, each ReduceMean over every spatial axis that keeps its dimensions as the GlobalAveragePool
    it equals, and return the rewritten nodes' names (kept, so that exclusions still match them).

    torch's exporter writes a global average pooling (ResNet's, EfficientNet's) as ReduceMean. onnxruntime's int8
    convolutions run NHWC, and its NHWC layout has an int8 GlobalAveragePool but no ReduceMean, so before a ReduceMean
    it transposes the last feature map back to NCHW: 1.6 ms of a 33 ms int8 ResNet-18 batch of 32 on 16 cores."""
    from onnx import helper, numpy_helper

    ranks = {
        info.name: len(info.type.tensor_type.shape.dim)
        for info in [*graph.input, *graph.value_info, *graph.output]
        if info.type.tensor_type.HasField("shape")
    }
    constants = {init.name: init for init in graph.initializer}
    constants |= {
        node.output[0]: constant_value(node) for node in graph.node if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS
    }
    rewritten = []
    axes_read = set()
    for index, node in enumerate(graph.node):
        if node.op_type != "ReduceMean" or node.domain not in DEFAULT_DOMAINS:
            continue
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        if len(node.input) > 1 and node.input[1]:
            if constants.get(node.input[1]) is None:
                continue
            axes = numpy_helper.to_array(constants[node.input[1]]).tolist()
        else:
            axes = attributes.get("axes")
        rank = ranks.get(node.input[0])
        if not axes or rank is None or rank < 3 or attributes.get("keepdims", 1) != 1:
            continue
        if sorted(axis % rank for axis in axes) != list(range(2, rank)):
            continue
        axes_read.update(node.input[1:2])
        rewritten.append(node.name)
        graph.node[index].CopyFrom(helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name))
    still_read = {name for node in graph.node for name in node.input} | {info.name for info in graph.input}
    for init in [init for init in graph.initializer if init.name in axes_read - still_read]:
        graph.initializer.remove(init)
    return rewritten


def output_tail(nodes) -> list[str]:
    """Names of the nodes after the last compute op: those from which no Conv, ConvTranspose, MatMul or Gemm can be
    reached (a graph's nodes are in topological order, so one pass from the end sees every consumer first)."""
    consumers: dict[str, list[Any]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    feeds_compute: dict[int, bool] = {}
    tail = []
    for node in reversed(nodes):
        feeds = any(
            consumer.op_type in ONNXRUNTIME_COMPUTE_OP_TYPES or feeds_compute.get(id(consumer), False)
            for output in node.output
            for consumer in consumers.get(output, [])
        )
        feeds_compute[id(node)] = feeds
        if not feeds and node.op_type not in ONNXRUNTIME_COMPUTE_OP_TYPES and node.name:
            tail.append(node.name)
    return tail


def _stamp_quantizer(destination: Path, stamp: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(destination), load_external_data=False)
    kept = [(e.key, e.value) for e in model.metadata_props if e.key != QUANTIZER_METADATA_KEY]
    del model.metadata_props[:]
    for key, value in [*kept, (QUANTIZER_METADATA_KEY, json.dumps(stamp, sort_keys=True))]:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(destination))


def _batch_reader(batch_files: list[Path]):
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class NpzBatchReader(CalibrationDataReader):
        """ModelOpt's and onnxruntime's calibrators walk the batches with get_next; ModelOpt peeks at the first one for test runs."""

        def __init__(self):
            self.batches = []
            for path in batch_files:
                self.batches.append(load_arrays(path, what="calibration batch"))
            self.rewind()

        def get_next(self):
            return next(self.position, None)

        def get_first(self):
            return self.batches[0]

        def rewind(self):
            self.position = iter(self.batches)

    return NpzBatchReader()


def _describe_failure(err: Exception, source: str, precision: str, plugins: list[str], quantizer: str) -> str:
    reason = str(err).strip() or "(no message)"
    library, package = ("ModelOpt", "/modelopt/") if quantizer == Quantizer.MODELOPT.value else ("onnxruntime's quantizer", "/onnxruntime/")
    detail = f"{library} could not convert the model to {precision}: {type(err).__name__}: {reason}"
    # The quantizers assert without messages in places; the step that failed is then the only clue.
    frames = [f for f in traceback.extract_tb(err.__traceback__) if package in f.filename]
    if frames:
        frame = frames[-1]
        module = package.strip("/") + "/" + frame.filename.rsplit(package, 1)[1]
        detail += f" (in {module}:{frame.lineno}, {frame.name})"
    try:
        # The staged copy of a model load_onnx_safely has read already.
        nodes = load_onnx_safely(Path(source), plugins=plugins, load_external_data=False).graph.node
    except OnnxModelError:
        return detail
    # Prefer the longest node name quoted in the reason: short names ('Add') often also occur as words.
    mentioned = sorted((n for n in nodes if n.name and n.name in reason), key=lambda n: len(n.name), reverse=True)
    if mentioned:
        detail += f" [node {mentioned[0].name!r}, op {mentioned[0].op_type}]"
    if "Too many bins for data range" in reason:
        # Entropy calibration builds a histogram per tensor; a tensor whose calibration values span
        # (almost) nothing has no finite bins. Max calibration needs no histogram.
        return detail + (
            "; a tensor's calibration values span too narrow a range for entropy calibration's histogram: set "
            "precision.calibration_method: max in the spec, or add calibration samples that vary more"
        )
    return detail + (
        "; fix the model there, keep the node out of conversion (precision.exclude_nodes or keep_fp32_nodes in the spec), "
        "or choose another precision for this target"
    )


def _model_inputs(graph, spec: ModelSpec, onnx_path: Path) -> list[InputSpec]:
    initializers = {init.name for init in graph.initializer}
    names = [value.name for value in graph.input if value.name not in initializers]
    by_name = {inp.name: inp for inp in spec.inputs}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise StageError(
            STAGE,
            f"{onnx_path} has inputs {unknown} that spec {spec.name!r} does not declare (spec inputs: {sorted(by_name)}): "
            "export the model from this spec",
        )
    return [by_name[name] for name in names]


def _check_options(options: PrecisionOptions, graph, onnx_path: Path, precision: Precision) -> None:
    import onnx

    if precision.needs_calibration:
        op_fields = {"exclude_op_types": options.exclude_op_types}
        node_fields = {"exclude_nodes": options.exclude_nodes}
    else:
        op_fields = {"keep_fp32_op_types": options.keep_fp32_op_types}
        node_fields = {"keep_fp32_nodes": options.keep_fp32_nodes}
    for field, op_types in op_fields.items():
        unknown = [op for op in op_types if not onnx.defs.has(op)]
        if unknown:
            raise StageError(
                STAGE,
                f"precision.{field} lists {unknown}, which are not ONNX operator types (they are case-sensitive, e.g. 'Conv', 'MatMul')",
            )
    node_names = [node.name for node in graph.node]
    for field, patterns in node_fields.items():
        for pattern in patterns:
            try:
                regex = re.compile(pattern)
            except re.error as err:
                raise StageError(STAGE, f"precision.{field} pattern {pattern!r} is not a valid regular expression: {err}") from None
            if not any(regex.match(name) for name in node_names):
                raise StageError(
                    STAGE,
                    f"precision.{field} pattern {pattern!r} matches no node of {onnx_path} (patterns match node names "
                    "from their start): check the names with 'python -m onnx.tools.net_drawer' or Netron",
                )


def _expected_shape(inp: InputSpec) -> str:
    return "(samples, " + ", ".join(str(d) for d in inp.shape_at("opt")[1:]) + ")"


def _cache_key(
    onnx_path: Path,
    model,
    precision: Precision,
    calibration: Mapping[str, np.ndarray] | None,
    calibration_sha256: str | None,
    options: PrecisionOptions,
    model_inputs: list[InputSpec],
    plan: BatchPlan | None,
    stamp: dict[str, Any],
) -> str:
    if calibration is None:
        data_digest = None
    else:
        data_digest = calibration_sha256 or content_sha256(dict(calibration), None)
    decided_by = {
        "onnx_sha256": sha256_file(onnx_path),
        # The weights of a large model live beside it: a change there must miss the cache too.
        "external_data_sha256": {location: sha256_file(onnx_path.parent / location) for location in external_data_files(model)},
        "precision": precision.value,
        "calibration_sha256": data_digest,
        "calibration_batch_size": plan.batch_size if plan else None,
        "input_opt_shapes": {inp.name: list(inp.shape_at("opt")) for inp in model_inputs},
        "options": options.model_dump(mode="json", include=_options_read(precision, stamp["name"])),
        "quantizer": stamp,
    }
    return stage_cache_key(Stage.CONVERT_PRECISION, json.dumps(decided_by, sort_keys=True))


def _options_read(precision: Precision, quantizer: str) -> set[str]:
    return ONNXRUNTIME_OPTIONS_READ if quantizer == Quantizer.ONNXRUNTIME.value else OPTIONS_READ[precision]


def _read_entry(entry: Path) -> ConversionResult | None:
    """The cached result in ``entry``, or None when absent or when its model no longer matches its record."""
    record, model = entry / RESULT_FILE, entry / MODEL_FILE
    if not (record.is_file() and model.is_file()):
        return None
    try:
        result = ConversionResult.model_validate_json(record.read_text())
    except ValueError:
        result = None
    if result is None or sha256_file(model) != result.sha256:
        shutil.rmtree(entry, ignore_errors=True)
        return None
    mark_used(entry)
    return result.model_copy(update={"onnx_path": model, "cached": True})


def _stage_input(onnx_path: Path, model, work: Path) -> Path:
    """Copy the model and its external data files into ``work``: ModelOpt writes intermediate files beside its input.

    ``model`` is ``onnx_path`` as load_onnx_safely read it, so its external data locations are known to be safe.
    """
    staged = work / "input.onnx"
    shutil.copyfile(onnx_path, staged)
    for location in external_data_files(model):
        target = work / location
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(onnx_path.parent / location, target)
    return staged


def _write_batches(
    calibration: Mapping[str, np.ndarray], model_inputs: list[InputSpec], plan: BatchPlan, folder: Path, limit: int | None
) -> None:
    folder.mkdir()
    count = plan.batches if limit is None else min(limit, plan.batches)
    for index in range(count):
        window = slice(index * plan.batch_size, (index + 1) * plan.batch_size)
        np.savez(folder / f"{index:06d}.npz", **{inp.name: calibration[inp.name][window] for inp in model_inputs})


def _used_samples(precision: Precision, plan: BatchPlan | None) -> int:
    if plan is None:
        return 0
    if precision.needs_calibration:
        return plan.samples
    return min(REFERENCE_BATCHES, plan.batches) * plan.batch_size
