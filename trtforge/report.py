"""The run report: report.md for people and CI pages, report.json for machines."""

from __future__ import annotations

import json
import os
from pathlib import Path

from trtforge.summary import RunSummary

SHOWN_METRICS = ("accuracy", "agreement", "cosine_mean", "recall_at_k", "max_abs_error", "latency_ms_median", "latency_ms_p99")


def format_metrics(metrics: dict[str, float]) -> str:
    shown = [f"{name}={metrics[name]:.4g}" for name in SHOWN_METRICS if name in metrics]
    return ", ".join(shown)


def target_rows(summary: RunSummary) -> list[list[str]]:
    rows = []
    for t in summary.targets:
        status = t.status.value + ("" if t.required else " (optional)")
        rows.append([t.tag, status, format_metrics(t.metrics), t.reason or "; ".join(t.notes), t.location or ""])
    return rows


def markdown_summary(summary: RunSummary) -> str:
    lines = [f"## trtforge: {summary.model}", ""]
    if summary.up_to_date:
        lines.append(f"**up to date: version {summary.version}** — nothing rebuilt.")
    elif summary.published:
        lines.append(f"**published version {summary.version}** to `{summary.registry}`.")
    else:
        lines.append(f"**not published**: {summary.message}")
    if summary.stages:
        lines += ["", "| stage | seconds | detail |", "|---|---:|---|"]
        lines += [f"| {s.stage} | {s.seconds:.1f} | {s.detail} |" for s in summary.stages]
    if summary.targets:
        lines += ["", "| target | status | metrics | reason / notes | location |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in target_rows(summary)]
    if summary.warnings:
        lines += ["", "Warnings:", *[f"- {w}" for w in summary.warnings]]
    return "\n".join(lines) + "\n"


def write_report(summary: RunSummary, run_dir: Path) -> tuple[Path, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    markdown, data = run_dir / "report.md", run_dir / "report.json"
    for path, text in ((markdown, markdown_summary(summary)), (data, json.dumps(summary.model_dump(mode="json"), indent=2))):
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        os.replace(partial, path)
    return markdown, data
