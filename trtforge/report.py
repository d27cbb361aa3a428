"""The run report: report.md for people and CI pages, report.json for machines, and an accuracy/latency plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trtforge.safeio import atomic_write_text, atomic_writer
from trtforge.speed import BEST_BY, OPT_BATCH, fastest_per_place
from trtforge.summary import RunSummary, TargetStatus

SHOWN_METRICS = (
    "accuracy",
    "map",
    "miou",
    "agreement",
    "cosine_mean",
    "recall_at_k",
    "max_abs_error",
    "latency_ms_median",
    "latency_ms_p99",
)
PLOT_NAME = "accuracy_latency.png"


def format_metrics(metrics: dict[str, float]) -> str:
    """The shown metrics, each with its 95% interval and sample count where the gate measured them
    (``accuracy=0.9889 [0.976, 0.995] n=450``), and how many of the disagreements were near ties."""
    shown = []
    for name in SHOWN_METRICS:
        if name not in metrics:
            continue
        text = f"{name}={metrics[name]:.4g}"
        if f"{name}.ci_low" in metrics:
            text += f" [{metrics[f'{name}.ci_low']:.3f}, {metrics[f'{name}.ci_high']:.3f}] n={metrics[f'{name}.n']:.0f}"
        near, real = metrics.get("near_tie_flips", 0.0), metrics.get("real_flips", 0.0)
        if name == "agreement" and near + real:
            text += f" ({near:.0f} of {near + real:.0f} disagreements are near ties)"
        shown.append(text)
    return ", ".join(shown)


def target_rows(summary: RunSummary) -> list[list[str]]:
    rows = []
    for t in summary.targets:
        status = t.status.value + ("" if t.required else " (optional)")
        rows.append([t.tag, status, format_metrics(t.metrics), t.reason or "; ".join(t.notes), t.location or ""])
    return rows


def chosen_engines(summary: RunSummary) -> dict[str, dict[str, Any]]:
    """Per place, the passing targets with the best latency and the best throughput: what the publisher names in
    the manifest's ``fastest`` (``trtforge.speed.fastest_per_place``)."""
    from trtforge.registry.pull import EngineFacts

    passed = [t for t in summary.targets if t.status is TargetStatus.PASSED]
    return fastest_per_place((EngineFacts.of(t.record).place, t.tag, t.metrics) for t in passed)


def _chosen_lines(summary: RunSummary, chosen: dict[str, dict[str, Any]]) -> list[str]:
    opt_batch = {t.tag: t.metrics.get(OPT_BATCH) for t in summary.targets}
    lines = []
    for place, choice in chosen.items():
        batch = opt_batch.get(choice["latency"])
        why = f"best latency at the opt shape{f' (batch {batch:.0f})' if batch else ''}: {choice['latency_ms']:.3g} ms median"
        line = f"- **{place}**: `{choice['latency']}`, {why}"
        if "throughput" in choice:
            rate = f"{choice['throughput_per_s']:,.0f} samples/s at batch {choice['throughput_batch']}"
            which = "also" if choice["throughput"] == choice["latency"] else f"`{choice['throughput']}`,"
            line += f"; {which} best throughput: {rate}"
        lines.append(line + ".")
    return lines


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def markdown_summary(summary: RunSummary, plot: str | None = None) -> str:
    lines = [f"## trtforge: {summary.model}", ""]
    if summary.up_to_date:
        lines.append(f"**up to date: version {summary.version}**: nothing rebuilt.")
    elif summary.published:
        lines.append(f"**published version {summary.version}** to `{summary.registry}`.")
    else:
        lines.append(f"**not published**: {summary.message}")
    if summary.stages:
        lines += ["", "### Stages", ""]
        lines += _table(["stage", "seconds", "detail"], [[s.stage.value, f"{s.seconds:.1f}", s.detail] for s in summary.stages])
    for check in summary.compatibility:
        lines += ["", f"### Operator compatibility: {check.graph} graph (TensorRT {check.tensorrt_version}, {check.source})", ""]
        lines.append(f"{check.nodes} nodes: {check.supported} supported, {check.conditional} conditional, {check.unsupported} unsupported.")
        if check.flagged_op_types:
            lines += [""] + _table(
                ["op type", "conditional", "unsupported"],
                [[r.op_type, str(r.conditional), str(r.unsupported)] for r in check.flagged_op_types],
            )
    if summary.calibration:
        cal = summary.calibration
        lines += ["", "### Calibration set", ""]
        lines.append(f"{cal.samples} samples, {'passed' if cal.passed else 'FAILED'} (sha256 `{cal.sha256[:16]}`).")
        for failure in cal.failed:
            lines.append(f"- {failure.expectation} on {failure.column}: {failure.details}")
    if summary.targets:
        lines += ["", "### Targets", ""]
        lines += _table(["target", "status", "metrics", "reason / notes", "location"], target_rows(summary))
        for target in summary.targets:
            if target.thresholds:
                shown = ", ".join(f"{k}={v:g}" for k, v in target.thresholds.items())
                lines.append(f"\n`{target.tag}` thresholds: {shown}")
            # The table shows a failed target's reason in place of its notes; resolution warnings must still be seen.
            if target.reason and target.notes:
                lines.append(f"\n`{target.tag}` notes: " + "; ".join(target.notes))
    chosen = chosen_engines(summary)
    if chosen:
        named = " (the manifest's `fastest`; `trtforge pull --fastest` takes it)" if summary.published else ""
        lines += ["", "### Fastest passing engine per place", "", f"Chosen per place{named}:", "", *_chosen_lines(summary, chosen)]
    if plot:
        lines += ["", f"![accuracy against latency]({plot})"]
    if summary.warnings:
        lines += ["", "### Warnings", "", *[f"- {w}" for w in summary.warnings]]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot on the Agg backend (a report needs no screen); imported on first use, as it takes a second."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def plot_accuracy_latency(summary: RunSummary, path: Path) -> Path | None:
    """Task metric against median latency per built target; failing targets marked with a red cross."""
    points = [t for t in summary.targets if "latency_ms_median" in t.metrics]
    if not points:
        return None
    from trtforge.registry.pull import EngineFacts

    figure, axes = pyplot().subplots(figsize=(7, 4.5))
    for index, target in enumerate(points):
        metric = next((m for m in ("accuracy", "map", "miou", "agreement", "cosine_mean") if m in target.metrics), None)
        if metric is None:
            continue
        passed = target.status is TargetStatus.PASSED
        axes.scatter(
            target.metrics["latency_ms_median"],
            target.metrics[metric],
            marker="o" if passed else "x",
            s=80,
            color="tab:green" if passed else "tab:red",
            label=f"{target.tag} ({'pass' if passed else 'FAIL'})",
        )
        # Targets often tie on the metric; the label says which point is which.
        axes.annotate(
            f"{target.backend} {target.precision}",
            (target.metrics["latency_ms_median"], target.metrics[metric]),
            textcoords="offset points",
            xytext=(6, 6 + 11 * index),
            fontsize=8,
        )
    chosen = chosen_engines(summary)
    picks = {(choice[by], by) for choice in chosen.values() for by in BEST_BY if by in choice}
    for target in points:
        metric = next((m for m in ("accuracy", "map", "miou", "agreement", "cosine_mean") if m in target.metrics), None)
        marks = [by for tag, by in sorted(picks) if tag == target.tag]
        if metric is None or not marks:
            continue
        # A ring around the point: the chosen engine stays visible under its pass marker.
        axes.scatter(
            target.metrics["latency_ms_median"],
            target.metrics[metric],
            marker="o",
            s=260,
            facecolors="none",
            edgecolors="tab:orange",
            linewidths=2,
            label=f"chosen: best {' and '.join(marks)} on {EngineFacts.of(target.record).place}",
        )
    axes.set_xlabel("median latency at the opt shape (ms)")
    axes.set_ylabel("task metric (accuracy, else agreement or cosine)")
    axes.set_title(f"{summary.model}: accuracy against latency")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    with atomic_writer(path) as handle:
        figure.savefig(handle, format="png", dpi=100)
    pyplot().close(figure)
    return path


def write_report(summary: RunSummary, run_dir: Path) -> tuple[Path, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_accuracy_latency(summary, run_dir / PLOT_NAME)
    markdown, data = run_dir / "report.md", run_dir / "report.json"
    contents = (
        (markdown, markdown_summary(summary, plot.name if plot else None)),
        (data, json.dumps(summary.model_dump(mode="json"), indent=2)),
    )
    for path, text in contents:
        atomic_write_text(path, text)
    return markdown, data
