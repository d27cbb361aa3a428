"""The main job: checkpoint (retrained if missing) to gated, published engines, one per target."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.build import build_and_gate_task
from tasks.caching import run_cached
from tasks.checkpoint import ensure_checkpoint_task
from tasks.export import export_task
from tasks.publish import publish_task
from tasks.reference import reference_task
from tasks.simplify import simplify_task
from trtforge.backends.base import get_backend, target_tag
from trtforge.errors import RunFailed
from trtforge.hashing import code_version
from trtforge.registry import open_registry
from trtforge.report import markdown_summary, write_report
from trtforge.spec import Precision, load_spec
from trtforge.stages.gate import PreviousRelease
from trtforge.stages.publish import registry_uri
from trtforge.summary import RunSummary, StageTiming, TargetOutcome, TargetStatus


def _previous_release(registry, model: str, tag: str) -> PreviousRelease | None:
    """The newest published version that has this target tag, for the regression check."""
    for version in reversed(registry.versions(model)):
        entry = registry.manifest(model, version).targets.get(tag)
        if entry is not None:
            return PreviousRelease(version=version, metrics=entry.record.get("gate", {}).get("metrics", {}))
    return None


@flow(name="retrain-to-engine", log_prints=True)
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
    run_dir = artifacts / "runs" / spec.name / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
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
    started = time.perf_counter()
    reference = reference_task(spec, ckpt, artifacts / "cache" / spec.name)
    timed("reference", started, "cached" if reference.cached else "computed")

    started = time.perf_counter()
    futures, outcomes = [], []
    for target in spec.targets:
        backend = get_backend(target.backend.value)
        tag = target_tag(target, spec, backend.runtime_version())
        availability = backend.availability(target)
        blocked_reason = None
        if not availability.available:
            blocked_reason = availability.reason
            status = TargetStatus.UNAVAILABLE
        elif target.precision is not Precision.FP32:
            blocked_reason, status = "not available yet: precision conversion is not built", TargetStatus.SKIPPED
        if blocked_reason is not None:
            logger.warning("target %s: %s: %s", tag, status.value, blocked_reason)
            outcomes.append(TargetOutcome(tag=tag, backend=target.backend.value, precision=target.precision.value,
                                          required=target.required, status=status, reason=blocked_reason))
            continue
        futures.append(build_and_gate_task.submit(
            spec, target, tag, simplified.onnx_path, reference, work_dir / tag, _previous_release(store, spec.name, tag)
        ))
    outcomes += [f.result() for f in futures]
    summary.targets = outcomes
    timed("build+gate", started, f"{len(futures)} target(s)")

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
        "calibration_sha256": None,
        "code_version": code_version(),
    }
    extra = {"stages": [s.model_dump() for s in summary.stages], "skipped_targets": [o.model_dump(mode="json", include={"tag", "status", "reason"}) for o in outcomes if o.status is not TargetStatus.PASSED]}
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
    create_markdown_artifact(markdown=markdown_summary(summary), key="trtforge-" + re.sub(r"[^a-z0-9-]", "-", summary.model), description="trtforge run summary")
