"""The main job: checkpoint (retrained if missing) to gated, published engines, one per target.

checkpoint -> check the eval set, validate calibration -> export -> simplify -> check ops -> per target:
convert precision -> build (here, or on the target's GPU worker) -> gate -> publish.
"""

from __future__ import annotations

import concurrent.futures
import functools
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture
from trtforge.tasks.build import build_and_gate_task
from trtforge.tasks.check_ops import check_ops_task
from trtforge.tasks.checkpoint import ensure_checkpoint_task
from trtforge.tasks.convert_precision import convert_precision_task
from trtforge.tasks.export import export_task
from trtforge.tasks.publish import publish_task
from trtforge.tasks.reference import reference_task
from trtforge.tasks.remote_build import build_on_worker_task, deployment_problem
from trtforge.tasks.sensitivity import sensitivity_task
from trtforge.tasks.simplify import simplify_task
from trtforge.tasks.stage import run_step
from trtforge.tasks.time_engine import time_engine_task
from trtforge.tasks.validate_calibration import validate_calibration_task

from trtforge.backends.base import get_backend, target_tag
from trtforge.errors import CalibrationError, RunFailed, TrtforgeError
from trtforge.evalset import load_eval_set
from trtforge.lineage import RunInputs, export_work_dir, published_version, run_inputs
from trtforge.localcache import cap_bytes_from_environment, mark_used, prune
from trtforge.parallelism import parallel_jobs
from trtforge.registry import open_registry
from trtforge.report import markdown_summary, target_rows, write_report
from trtforge.routing import Route, RouteKind, route_target
from trtforge.spec import ModelSpec, Precision, Target, load_spec
from trtforge.stages.build import BuildRequest
from trtforge.stages.convert_precision import ConversionResult, Quantizer, quantizer_for
from trtforge.stages.gate import PreviousRelease, task_metric_name
from trtforge.stages.ladder import LadderRecord, LadderStep, ladder_enabled, next_exclusions, start_record
from trtforge.stages.latency_gate import apply_speedup_gates
from trtforge.stages.publish import registry_uri
from trtforge.stages.runner import Stage, failed_stage
from trtforge.stages.sensitivity import SensitivityResult, exact_node_patterns
from trtforge.staging import Staging
from trtforge.summary import (
    CalibrationSummary,
    CompatibilitySummary,
    ConversionSummary,
    RunSummary,
    StageTiming,
    TargetOutcome,
    TargetStatus,
)

# What a target's graph is converted by: its precision and the quantizer its backend takes.
Conversion = tuple[Precision, Quantizer]


def previous_release(registry, model: str, tag: str, alias: str | None = None) -> PreviousRelease | None:
    """The release to compare with: the version behind ``alias`` if given, else the newest one with this tag."""
    if alias is not None:
        if alias not in registry.aliases(model):
            return None
        candidates = [registry.resolve(model, alias=alias)]
    else:
        candidates = list(reversed(registry.versions(model)))
    for version in candidates:
        entry = registry.manifest(model, version).targets.get(tag)
        if entry is not None:
            return PreviousRelease(version=version, metrics=entry.record.get("gate", {}).get("metrics", {}))
    return None


def _outcome(target: Target, tag: str, status: TargetStatus, reason: str, details: tuple[str, ...] = ()) -> TargetOutcome:
    return TargetOutcome(
        tag=tag,
        backend=target.backend,
        precision=target.precision.value,
        required=target.required,
        status=status,
        reason=reason,
        notes=list(details),
    )


def _stage_failure(err: TrtforgeError, default: Stage) -> str:
    """The reason a target failed, naming the stage (a StageError's message already starts with it)."""
    stage = (failed_stage(err) or default).value
    message = str(err)
    return message if message.startswith(f"{stage}: ") else f"{stage}: {message}"


def _check_compatibility(spec: ModelSpec, onnx_path: Path, summary: RunSummary, graph: str) -> None:
    """The graph ``graph`` names against TensorRT, when a target is a TensorRT one; unsupported nodes raise."""
    if not any(t.backend == "tensorrt" for t in spec.targets):
        return
    trt_version = get_backend("tensorrt").runtime_version()
    report = run_step(summary, check_ops_task, onnx_path, list(spec.plugins), trt_version, spec.isolation)
    summary.compatibility.append(
        CompatibilitySummary(
            graph=graph,
            source=report.source,
            tensorrt_version=report.tensorrt_version,
            nodes=report.summary.nodes,
            supported=report.summary.supported,
            conditional=report.summary.conditional,
            unsupported=report.summary.unsupported,
            flagged_op_types=report.summary_rows(),
        )
    )
    summary.warnings += [f"check-ops: {n.name} ({n.op_type}) conditional: {n.reason}" for n in report.conditional]
    report.raise_if_unsupported()


def _validate_calibration(spec: ModelSpec, run_dir: Path, summary: RunSummary) -> str | None:
    """Before any quantization; returns the calibration set's sha256 for the lineage."""
    if not any(t.precision.needs_calibration for t in spec.targets):
        return None
    if spec.calibration is None:
        raise CalibrationError(
            Stage.VALIDATE_CALIBRATION.value, "int8/fp8 targets need a 'calibration' section in the spec naming the calibration data"
        )
    report = run_step(summary, validate_calibration_task, spec, run_dir / "calibration")
    summary.calibration = CalibrationSummary(
        passed=report.passed,
        samples=report.samples,
        sha256=report.sha256,
        failed=[f.model_dump() for f in report.failed],
        data_docs=str(report.data_docs) if report.data_docs else None,
    )
    if not report.passed:
        failed = "; ".join(f"{f.expectation} on {f.column}: {f.details}" for f in report.failed)
        raise CalibrationError(Stage.VALIDATE_CALIBRATION.value, f"calibration set {report.source} failed: {failed}")
    return report.sha256


@flow(name="retrain-to-engine")
def retrain_to_engine(
    spec_path: str,
    checkpoint: str | None = None,
    registry: str | None = None,
    artifacts_dir: str = "artifacts",
    inputs: RunInputs | None = None,
) -> RunSummary:
    """``inputs``: the run's inputs where the caller hashed them already (its up-to-date check); used when they
    are of the checkpoint this run ends up with."""
    logger = get_run_logger()
    spec = load_spec(spec_path)
    uri = registry_uri(spec, registry)
    store = open_registry(uri)
    artifacts = Path(artifacts_dir).resolve()
    started_at = datetime.now(UTC)
    run_id = started_at.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    run_dir = artifacts / "runs" / spec.name / run_id
    summary = RunSummary(model=spec.name, registry=uri, run_dir=run_dir)

    try:
        ckpt = run_step(summary, ensure_checkpoint_task, spec, Path(checkpoint) if checkpoint else None)
    except TrtforgeError as err:
        _ended_by(err, summary.model_copy(update={"run_dir": None}))
        raise
    if inputs is None or inputs.checkpoint_sha256 != ckpt.sha256:
        inputs = run_inputs(spec, ckpt.path, checkpoint_sha256=ckpt.sha256)
    existing = published_version(store, spec, inputs)
    if existing is not None:
        logger.info("up to date: version %d", existing)
        return summary.model_copy(
            update={"version": existing, "up_to_date": True, "passed": True, "message": f"up to date: version {existing}", "run_dir": None}
        )

    cache_cap = cap_bytes_from_environment()
    staging = Staging(store, spec.name, run_id)
    try:
        _build_and_publish(spec, spec_path, ckpt, inputs, store, uri, artifacts, run_id, summary)
    except TrtforgeError as err:
        _ended_by(err, summary)
        raise
    finally:
        staging.clear()
        _finish(summary)
        pruned = prune(artifacts, cap_bytes=cache_cap)
        if pruned.removed:
            logger.info(
                "local caches over %.1f GiB: removed %d least recently used entries (%.1f MiB)",
                cache_cap / 1024**3,
                len(pruned.removed),
                pruned.freed_bytes / 1024**2,
            )
    return summary


def _build_and_publish(spec, spec_path, ckpt, inputs: RunInputs, store, uri, artifacts, run_id, summary: RunSummary) -> None:
    logger = get_run_logger()
    work_dir = export_work_dir(artifacts, spec, ckpt.sha256)
    work_dir.mkdir(parents=True, exist_ok=True)
    mark_used(work_dir)
    # The settings and data files first: a wrong array name or shape fails before minutes of export, not after.
    jobs = parallel_jobs(spec)
    load_eval_set(spec)
    calibration_sha256 = _validate_calibration(spec, summary.run_dir, summary)
    exported = run_step(summary, export_task, spec, ckpt, work_dir)
    simplified = run_step(summary, simplify_task, spec, exported, work_dir)
    # The fp32 graph next, before anything is converted: what no precision can fix fails fast.
    _check_compatibility(spec, simplified.onnx_path, summary, "fp32")
    reference = run_step(summary, reference_task, spec, ckpt, artifacts / "cache" / spec.name)

    started_at, started = time.time(), time.perf_counter()
    # Each target's outcome by its place in the spec, which is the order the run reports them in.
    placed: dict[int, TargetOutcome] = {}
    # Each target's build starts as soon as its conversion is done, under one bound with the conversions still to run.
    by_conversion: dict[Conversion, list[tuple[int, Target, str, Route]]] = {}
    for index, target in enumerate(spec.targets):
        backend = get_backend(target.backend)
        tag = target_tag(target, spec, backend.runtime_version())
        route = route_target(target, backend.availability(target), deployment_problem)
        if route.kind is RouteKind.UNAVAILABLE:
            logger.warning("target %s: unavailable: %s (%s)", tag, route.reason, "; ".join(route.details))
            placed[index] = _outcome(target, tag, TargetStatus.UNAVAILABLE, route.reason, route.details)
            continue
        # By precision and quantizer: onnxruntime CPU int8 is onnxruntime's quantizer's, TensorRT's is ModelOpt's.
        by_conversion.setdefault((target.precision, quantizer_for(backend)), []).append((index, target, tag, route))
    # TensorRT parses the converted graph (Q/DQ for int8/fp8, casts for fp16): each is checked once.
    tensorrt_refusals: dict[Precision, str | None] = {Precision.FP32: None}

    def builds_of(conversion: Conversion, future: PrefectFuture) -> list[tuple[Any, Callable[[], PrefectFuture]]]:
        try:
            result = future.result()
        except TrtforgeError as err:
            logger.warning("convert-precision %s: failed: %s", conversion[0].value, err)
            for index, target, tag, _ in by_conversion[conversion]:
                placed[index] = _outcome(target, tag, TargetStatus.FAILED, _stage_failure(err, Stage.CONVERT_PRECISION))
            return []
        summary.conversions.append(_conversion_summary(result, []))
        builds = []
        for index, target, tag, route in by_conversion[conversion]:
            if target.backend == "tensorrt":
                if target.precision not in tensorrt_refusals:
                    try:
                        _check_compatibility(spec, result.onnx_path, summary, target.precision.value)
                        tensorrt_refusals[target.precision] = None
                    except TrtforgeError as err:
                        tensorrt_refusals[target.precision] = _stage_failure(err, Stage.CHECK_OPS)
                if tensorrt_refusals[target.precision] is not None:
                    placed[index] = _outcome(target, tag, TargetStatus.FAILED, tensorrt_refusals[target.precision])
                    continue
            request = BuildRequest(
                spec_path=spec_path,
                target_index=index,
                onnx_path=result.onnx_path,
                reference=reference,
                work_dir=work_dir / (tag if route.kind is RouteKind.LOCAL else f"remote-{index}"),
                previous=previous_release(store, spec.name, tag, spec.compare_alias),
                registry=uri,
                # Timed here once every conversion and build of the run is over; a GPU worker times its own.
                time_engine=route.kind is not RouteKind.LOCAL,
            )
            builds.append(((index, target, tag, route, request), functools.partial(_submit, route, request, spec.name, run_id)))
        return builds

    cache_dir = _precision_cache(spec, artifacts)
    conversions = [
        (
            (precision, quantizer),
            functools.partial(
                convert_precision_task.submit, spec, simplified.onnx_path, precision, cache_dir, exact_node_patterns([]), quantizer
            ),
        )
        for precision, quantizer in by_conversion
    ]
    pending = _pipelined(jobs, conversions, builds_of)
    ladder = Ladder(spec, simplified.onnx_path, artifacts, summary, run_id)
    built_here: list[tuple[int, Target]] = []
    for (index, target, tag, route, request), future in sorted(pending, key=lambda item: item[0][0]):
        try:
            outcome = future.result()
        except TrtforgeError as err:
            logger.warning("target %s: failed: %s", tag, err)
            placed[index] = _outcome(target, tag, TargetStatus.FAILED, _stage_failure(err, Stage.BUILD))
            continue
        if target.precision.needs_calibration and outcome.status is TargetStatus.FAILED and outcome.failures:
            outcome = ladder.climb(target, route, request, outcome)
        placed[index] = outcome
        if route.kind is RouteKind.LOCAL:
            built_here.append((index, target))
    summary.stages.append(
        StageTiming(
            stage=Stage.BUILD,
            seconds=time.perf_counter() - started,
            started_at=started_at,
            detail=f"{len(pending)} target(s) converted, built and gated, {jobs} at a time",
        )
    )
    # Nothing else of the run executes now: each engine built here is timed alone, one after another.
    for index, target in sorted(built_here, key=lambda built: built[0]):
        placed[index] = _time_alone(spec, target, placed[index], summary)
    outcomes = [placed[index] for index in sorted(placed)]
    summary.targets = outcomes
    apply_speedup_gates(spec, outcomes)

    required_failures = summary.required_failures()
    passed = [o for o in outcomes if o.status is TargetStatus.PASSED]
    if required_failures or not passed:
        reasons = [f"{o.tag} {o.status.value}: {o.reason}" for o in required_failures] or ["no target passed"]
        summary.message = "not published: " + "; ".join(reasons)
        raise RunFailed(summary.message, summary)

    lineage = {
        "checkpoint_sha256": ckpt.sha256,
        "onnx_sha256": simplified.sha256,
        "exported_onnx_sha256": exported.sha256,
        "spec_sha256": spec.sha256(),
        "calibration_sha256": calibration_sha256,
        "code_version": inputs.code_version,
        "inputs_sha256": inputs.digest,
        "inputs": inputs.model_dump(mode="json"),
    }
    extra = {
        "run_id": run_id,
        "stages": [s.model_dump(mode="json") for s in summary.stages],
        "compatibility": [c.model_dump(mode="json") for c in summary.compatibility],
        "calibration": summary.calibration.model_dump(mode="json") if summary.calibration else None,
        "conversions": [c.model_dump(mode="json") for c in summary.conversions],
        "left_out": [
            o.model_dump(mode="json", include={"tag", "status", "reason", "required"})
            for o in outcomes
            if o.status is not TargetStatus.PASSED
        ],
    }
    version = run_step(summary, publish_task, spec, uri, outcomes, lineage, extra)
    for outcome in passed:
        outcome.location = f"{uri.rstrip('/')}/{spec.name}/versions/{version}/{outcome.tag}/engine"
    summary.version, summary.published, summary.passed = version, True, True
    summary.message = f"published version {version}"


def _time_alone(spec: ModelSpec, target: Target, outcome: TargetOutcome, summary: RunSummary) -> TargetOutcome:
    if "engine" not in outcome.files:
        return outcome
    try:
        return run_step(summary, time_engine_task, spec, target, outcome)
    except TrtforgeError as err:
        get_run_logger().warning("target %s: timing failed: %s", outcome.tag, err)
        return outcome.model_copy(update={"status": TargetStatus.FAILED, "reason": _stage_failure(err, Stage.TIME)})


def _submit(route: Route, request: BuildRequest, model: str, run_id: str):
    if route.kind is RouteKind.LOCAL:
        return build_and_gate_task.submit(request)
    return build_on_worker_task.submit(route.deployment, request, model, run_id)


class Ladder:
    """A failed int8/fp8 gate: rank the graph's quantized nodes, name the worst, and where the ladder
    is on (trtforge.stages.ladder), re-convert without them, rebuild and re-gate, step by step."""

    def __init__(
        self,
        spec: ModelSpec,
        reference_onnx: Path,
        artifacts: Path,
        summary: RunSummary,
        run_id: str,
    ):
        self.spec, self.reference_onnx, self.artifacts, self.summary, self.run_id = spec, reference_onnx, artifacts, summary, run_id
        # Targets of one precision share their converted graphs, so each graph is ranked once a run.
        self.rankings: dict[Path, SensitivityResult] = {}

    def rank(self, onnx_path: Path, precision: Precision) -> SensitivityResult:
        if onnx_path not in self.rankings:
            self.rankings[onnx_path] = run_step(self.summary, sensitivity_task, self.spec, self.reference_onnx, onnx_path, precision)
        return self.rankings[onnx_path]

    def climb(self, target: Target, route: Route, request: BuildRequest, failed: TargetOutcome) -> TargetOutcome:
        try:
            ranking = self.rank(request.onnx_path, target.precision)
        except TrtforgeError as err:
            failed.notes.append(f"sensitivity not measured: {err}")
            return failed
        record = start_record(ranking)
        excluded: list[str] = []
        steps = range(1, self.spec.precision.ladder.max_steps + 1) if ladder_enabled(self.spec, target) else ()
        for step in steps:
            excluded = next_exclusions(self.spec, excluded, ranking)
            if not excluded:
                break
            try:
                onnx_path = _convert(
                    self.spec,
                    self.reference_onnx,
                    target.precision,
                    self.artifacts,
                    self.summary,
                    excluded,
                    quantizer_for(get_backend(target.backend)),
                )
                if target.backend == "tensorrt":
                    _check_compatibility(self.spec, onnx_path, self.summary, f"{target.precision.value}-ladder-{step}")
                work_dir = request.work_dir.with_name(f"{request.work_dir.name}-ladder-{step}")
                outcome = _submit(
                    route, request.model_copy(update={"onnx_path": onnx_path, "work_dir": work_dir}), self.spec.name, self.run_id
                ).result()
            except TrtforgeError as err:
                record.steps.append(
                    LadderStep(
                        step=step,
                        excluded_nodes=excluded,
                        passed=False,
                        task_metric="",
                        value=None,
                        failures=[_stage_failure(err, Stage.CONVERT_PRECISION)],
                    )
                )
                break
            metric = task_metric_name(self.spec, outcome.metrics)
            passed = outcome.status is TargetStatus.PASSED
            record.steps.append(
                LadderStep(
                    step=step,
                    excluded_nodes=excluded,
                    passed=passed,
                    task_metric=metric,
                    value=outcome.metrics.get(metric),
                    failures=outcome.failures,
                )
            )
            if passed:
                return self._with_record(outcome, record)
            try:
                ranking = self.rank(onnx_path, target.precision)
            except TrtforgeError:
                continue
        return self._with_record(failed, record)

    @staticmethod
    def _with_record(outcome: TargetOutcome, record: LadderRecord) -> TargetOutcome:
        outcome.notes.append(record.summary())
        outcome.record["precision_ladder"] = record.model_dump(mode="json")
        return outcome


def _pipelined(
    jobs: int,
    first: list[tuple[Any, Callable[[], PrefectFuture]]],
    then: Callable[[Any, PrefectFuture], list[tuple[Any, Callable[[], PrefectFuture]]]],
) -> list[tuple[Any, PrefectFuture]]:
    """Make ``first``'s submissions and, as each of them finishes, the submissions ``then`` makes of it (a conversion's
    builds), with at most ``jobs`` futures unfinished at once; follow-ups go before the firsts still waiting, so a
    target's build does not wait for other targets' conversions. Returns each follow-up's key and future."""
    waiting, ready = list(first), []
    running: dict[concurrent.futures.Future, tuple[bool, Any, PrefectFuture]] = {}
    followed: list[tuple[Any, PrefectFuture]] = []
    while waiting or ready or running:
        while len(running) < jobs and (ready or waiting):
            is_first = not ready
            key, submit = (waiting if is_first else ready).pop(0)
            future = submit()
            running[future.wrapped_future] = (is_first, key, future)
            if not is_first:
                followed.append((key, future))
        done, _ = concurrent.futures.wait(list(running), return_when=concurrent.futures.FIRST_COMPLETED)
        for finished in done:
            is_first, key, future = running.pop(finished)
            if is_first:
                ready.extend(then(key, future))
    return followed


def _precision_cache(spec: ModelSpec, artifacts: Path) -> Path:
    return artifacts / "cache" / spec.name / "precision"


def _convert(
    spec: ModelSpec,
    onnx_path: Path,
    precision: Precision,
    artifacts: Path,
    summary: RunSummary,
    excluded_nodes: list[str] | None = None,
    quantizer: Quantizer = Quantizer.MODELOPT,
) -> Path:
    """``precision``'s graph, by ``quantizer`` where it is int8; ``excluded_nodes`` (exact node names) stay out of quantization."""
    result = convert_precision_task(
        spec, onnx_path, precision, _precision_cache(spec, artifacts), exact_node_patterns(excluded_nodes or []), quantizer
    )
    summary.conversions.append(_conversion_summary(result, excluded_nodes or []))
    return result.onnx_path


def _conversion_summary(result: ConversionResult, excluded_nodes: list[str]) -> ConversionSummary:
    return ConversionSummary(
        precision=result.precision.value,
        method=result.method,
        qdq_node_count=result.qdq_node_count,
        quantized_op_types=result.quantized_op_types,
        seconds=result.seconds,
        cached=result.cached,
        modelopt_version=result.modelopt_version,
        quantizer=result.quantizer.value if result.quantizer else None,
        quantizer_version=result.quantizer_version,
        excluded_nodes=excluded_nodes,
    )


def _ended_by(err: TrtforgeError, summary: RunSummary) -> None:
    """Record the error that ended the run in its summary, and hand the summary to the caller through the error."""
    summary.message = summary.message or str(err)
    if not isinstance(err, RunFailed):
        summary.failed_stage = getattr(failed_stage(err), "value", None)
    err.summary = summary


def _finish(summary: RunSummary) -> None:
    """The report and the Prefect artifacts, on every exit of a run that got past the up-to-date check."""
    write_report(summary, summary.run_dir)
    key = "trtforge-" + re.sub(r"[^a-z0-9-]", "-", summary.model)
    create_markdown_artifact(markdown=markdown_summary(summary), key=key, description="trtforge run summary")
    if summary.targets:
        headers = ["target", "status", "metrics", "reason / notes", "location"]
        create_table_artifact(table=[dict(zip(headers, row)) for row in target_rows(summary)], key=key + "-targets", description="targets")
