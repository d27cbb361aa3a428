"""The main job: checkpoint (retrained if missing) to gated, published engines, one per target.

checkpoint -> export -> simplify -> check ops -> validate calibration -> per target:
convert precision -> build (here, or on the target's GPU worker) -> gate -> publish.
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.build import build_and_gate_task
from tasks.caching import run_cached
from tasks.check_ops import check_ops_task
from tasks.checkpoint import ensure_checkpoint_task
from tasks.convert_precision import convert_precision_task
from tasks.export import export_task
from tasks.publish import publish_task
from tasks.reference import reference_task
from tasks.remote_build import build_on_worker_task, deployment_problem
from tasks.simplify import simplify_task
from tasks.validate_calibration import validate_calibration_task
from trtforge.backends.base import get_backend, target_tag
from trtforge.errors import CalibrationError, RunFailed
from trtforge.hashing import code_version
from trtforge.registry import open_registry
from trtforge.report import markdown_summary, target_rows, write_report
from trtforge.routing import RouteKind, route_target
from trtforge.spec import BackendName, ModelSpec, Precision, Target, load_spec
from trtforge.stages.gate import PreviousRelease
from trtforge.stages.publish import registry_uri
from trtforge.staging import Staging
from trtforge.summary import RunSummary, StageTiming, TargetOutcome, TargetStatus


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


def _unavailable(target: Target, tag: str, reason: str, details: tuple[str, ...]) -> TargetOutcome:
    return TargetOutcome(
        tag=tag,
        backend=target.backend.value,
        precision=target.precision.value,
        required=target.required,
        status=TargetStatus.UNAVAILABLE,
        reason=reason,
        notes=list(details),
    )


def _check_compatibility(spec: ModelSpec, onnx_path: Path, summary: RunSummary) -> None:
    """Once per distinct TensorRT version among the targets; unsupported nodes stop the run here."""
    if not any(t.backend is BackendName.TENSORRT for t in spec.targets):
        return
    trt_version = get_backend(BackendName.TENSORRT.value).runtime_version()
    report = check_ops_task(onnx_path, list(spec.plugins), trt_version)
    summary.compatibility.append(
        {
            "source": report.source,
            "tensorrt_version": report.tensorrt_version,
            "nodes": report.summary.nodes,
            "supported": report.summary.supported,
            "conditional": report.summary.conditional,
            "unsupported": report.summary.unsupported,
            "flagged_op_types": report.summary_rows(),
        }
    )
    summary.warnings += [f"check-ops: {n.name} ({n.op_type}) conditional: {n.reason}" for n in report.conditional]
    report.raise_if_unsupported()


def _validate_calibration(spec: ModelSpec, run_dir: Path, summary: RunSummary) -> str | None:
    """Before any quantization; returns the calibration set's sha256 for the lineage."""
    if not any(t.precision.needs_calibration for t in spec.targets):
        return None
    if spec.calibration is None:
        raise CalibrationError(
            "validate-calibration", "int8/fp8 targets need a 'calibration' section in the spec naming the calibration data"
        )
    report = validate_calibration_task(spec, run_dir / "calibration")
    summary.calibration = {**report.summary(), "sha256": report.sha256, "data_docs": str(report.data_docs) if report.data_docs else None}
    if not report.passed:
        failed = "; ".join(f"{f.expectation} on {f.column}: {f.details}" for f in report.failed)
        raise CalibrationError("validate-calibration", f"calibration set {report.source} failed: {failed}")
    return report.sha256


@flow(name="retrain-to-engine")
def retrain_to_engine(
    spec_path: str,
    checkpoint: str | None = None,
    registry: str | None = None,
    artifacts_dir: str = "artifacts",
) -> RunSummary:
    logger = get_run_logger()
    spec = load_spec(spec_path)
    uri = registry_uri(spec, registry)
    store = open_registry(uri)
    artifacts = Path(artifacts_dir).resolve()
    started_at = datetime.now(UTC)
    run_id = started_at.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    run_dir = artifacts / "runs" / spec.name / run_id
    summary = RunSummary(model=spec.name, registry=uri, run_dir=run_dir)

    def timed(stage: str, started: float, detail: str = "") -> None:
        summary.stages.append(StageTiming(stage=stage, seconds=time.perf_counter() - started, detail=detail))

    started = time.perf_counter()
    ckpt = ensure_checkpoint_task(spec, Path(checkpoint) if checkpoint else None)
    timed("retrain", started, "trained" if ckpt.trained else f"checkpoint {ckpt.path.name}")

    existing = store.find_by_lineage(spec.name, ckpt.sha256, spec.sha256())
    if existing is not None:
        logger.info("up to date: version %d", existing)
        return summary.model_copy(
            update={"version": existing, "up_to_date": True, "passed": True, "message": f"up to date: version {existing}", "run_dir": None}
        )

    work_dir = artifacts / "work" / spec.name / f"{ckpt.sha256[:16]}-{spec.sha256()[:16]}"
    started = time.perf_counter()
    exported = run_cached(export_task, spec, ckpt, work_dir)
    timed("export", started, f"opset {exported.opset}, {exported.node_count} nodes, max abs diff {max(exported.max_abs_diff.values()):.2g}")
    started = time.perf_counter()
    simplified = run_cached(simplify_task, spec, exported, work_dir)
    timed("simplify", started, f"{simplified.nodes_before} -> {simplified.nodes_after} nodes")

    try:
        started = time.perf_counter()
        _check_compatibility(spec, simplified.onnx_path, summary)
        if summary.compatibility:
            c = summary.compatibility[-1]
            timed("check-ops", started, f"{c['source']}: {c['unsupported']} unsupported, {c['conditional']} conditional")
        started = time.perf_counter()
        calibration_sha256 = _validate_calibration(spec, run_dir, summary)
        if summary.calibration:
            timed("validate-calibration", started, f"{summary.calibration['samples']} samples passed")
    except Exception as err:
        summary.message = str(err)
        _finish(summary)
        raise

    started = time.perf_counter()
    reference = reference_task(spec, ckpt, artifacts / "cache" / spec.name)
    timed("reference", started, "cached" if reference.cached else "computed")

    started = time.perf_counter()
    converted: dict[Precision, Path] = {}
    pending, outcomes = [], []
    for index, target in enumerate(spec.targets):
        backend = get_backend(target.backend.value)
        tag = target_tag(target, spec, backend.runtime_version())
        route = route_target(target, backend.availability(target), deployment_problem)
        if route.kind is RouteKind.UNAVAILABLE:
            logger.warning("target %s: unavailable: %s (%s)", tag, route.reason, "; ".join(route.details))
            outcomes.append(_unavailable(target, tag, route.reason, route.details))
            continue
        if target.precision not in converted:
            result = convert_precision_task(spec, simplified.onnx_path, target.precision, artifacts / "cache" / spec.name / "precision")
            converted[target.precision] = result.onnx_path
            summary.conversions.append(
                result.model_dump(
                    mode="json",
                    include={"precision", "method", "qdq_node_count", "quantized_op_types", "seconds", "cached", "modelopt_version"},
                )
            )
        previous = previous_release(store, spec.name, tag, spec.compare_alias)
        if route.kind is RouteKind.LOCAL:
            pending.append(build_and_gate_task.submit(spec, target, converted[target.precision], reference, work_dir / tag, previous, uri))
        else:
            pending.append(
                build_on_worker_task.submit(
                    route.deployment,
                    spec_path,
                    spec.name,
                    index,
                    uri,
                    run_id,
                    converted[target.precision],
                    reference,
                    work_dir / f"remote-{index}",
                    previous,
                )
            )
    outcomes += [future.result() for future in pending]
    Staging(store, spec.name, run_id).clear()
    summary.targets = outcomes
    timed("convert+build+gate", started, f"{len(pending)} target(s) built")

    required_failures = summary.required_failures()
    passed = [o for o in outcomes if o.status is TargetStatus.PASSED]
    if required_failures or not passed:
        reasons = [f"{o.tag} {o.status.value}: {o.reason}" for o in required_failures] or ["no target passed"]
        summary.message = "not published: " + "; ".join(reasons)
        _finish(summary)
        raise RunFailed(summary.message, summary)

    started = time.perf_counter()
    lineage = {
        "checkpoint_sha256": ckpt.sha256,
        "onnx_sha256": simplified.sha256,
        "exported_onnx_sha256": exported.sha256,
        "spec_sha256": spec.sha256(),
        "calibration_sha256": calibration_sha256,
        "code_version": code_version(),
    }
    extra = {
        "run_id": run_id,
        "stages": [s.model_dump() for s in summary.stages],
        "compatibility": summary.compatibility,
        "calibration": summary.calibration,
        "conversions": summary.conversions,
        "left_out": [
            o.model_dump(mode="json", include={"tag", "status", "reason", "required"})
            for o in outcomes
            if o.status is not TargetStatus.PASSED
        ],
    }
    version = publish_task(spec, uri, outcomes, lineage, extra)
    timed("publish", started, f"version {version}")
    for outcome in passed:
        outcome.location = f"{uri.rstrip('/')}/{spec.name}/versions/{version}/{outcome.tag}/engine"
    summary.version, summary.published, summary.passed = version, True, True
    summary.message = f"published version {version}"
    _finish(summary)
    return summary


def _finish(summary: RunSummary) -> None:
    write_report(summary, summary.run_dir)
    key = "trtforge-" + re.sub(r"[^a-z0-9-]", "-", summary.model)
    create_markdown_artifact(markdown=markdown_summary(summary), key=key, description="trtforge run summary")
    if summary.targets:
        headers = ["target", "status", "metrics", "reason / notes", "location"]
        create_table_artifact(table=[dict(zip(headers, row)) for row in target_rows(summary)], key=key + "-targets", description="targets")
