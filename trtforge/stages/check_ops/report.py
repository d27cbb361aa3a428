"""The compatibility report: one verdict per node, counts per op type, and how it reads in a terminal or an error."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from trtforge.errors import CompatibilityError

STAGE = "check-ops"
DEFAULT_DOMAINS = ("", "ai.onnx")

Status = Literal["supported", "conditional", "unsupported"]
Source = Literal["tensorrt-parser", "static-table"]
SEVERITY: dict[str, int] = {"supported": 0, "conditional": 1, "unsupported": 2}


class NodeReport(BaseModel):
    """The verdict on one node; ``name`` is the node's name, or ``node_of_<first output>`` like TensorRT's."""

    model_config = ConfigDict(frozen=True)

    name: str
    op_type: str
    domain: str = ""
    status: Status
    reason: str = ""
    fix: str = ""


class OpTypeSummary(BaseModel):
    count: int = 0
    supported: int = 0
    conditional: int = 0
    unsupported: int = 0


class ReportSummary(BaseModel):
    nodes: int
    supported: int
    conditional: int
    unsupported: int
    by_op_type: dict[str, OpTypeSummary]


class CompatibilityReport(BaseModel):
    """What TensorRT makes of one ONNX model. JSON-serialisable; ``ok`` is False when any node is unsupported."""

    model: str
    source: Source
    tensorrt_version: str
    opset: int | None
    nodes: list[NodeReport]
    summary: ReportSummary
    notes: list[str]

    @property
    def unsupported(self) -> list[NodeReport]:
        return [n for n in self.nodes if n.status == "unsupported"]

    @property
    def conditional(self) -> list[NodeReport]:
        return [n for n in self.nodes if n.status == "conditional"]

    @property
    def ok(self) -> bool:
        return not self.unsupported

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per op type with any node not supported, worst first: for tables in run reports."""
        rows = [
            {"op_type": op, **counts.model_dump()}
            for op, counts in self.summary.by_op_type.items()
            if counts.conditional or counts.unsupported
        ]
        return sorted(rows, key=lambda r: (-r["unsupported"], -r["conditional"], r["op_type"]))

    def format_table(self) -> str:
        """The report for a terminal: header, one line per node that is not supported, the notes."""
        s = self.summary
        lines = [
            f"{self.model}: opset {self.opset}, checked with {self.source} (TensorRT {self.tensorrt_version})",
            f"{s.nodes} nodes: {s.supported} supported, {s.conditional} conditional, {s.unsupported} unsupported",
        ]
        flagged = sorted(self.unsupported + self.conditional, key=lambda n: -SEVERITY[n.status])
        if flagged:
            headers = ("status", "node", "op", "reason", "fix")
            rows = [(n.status, n.name, op_key(n.domain, n.op_type), n.reason, n.fix) for n in flagged]
            widths = [min(60, max(len(h), *(len(r[i]) for r in rows))) for i, h in enumerate(headers[:3])]
            lines.append("")
            lines.append("  ".join(h.ljust(w) for h, w in zip(headers[:3], widths)) + "  reason / fix")
            for row in rows:
                lines.append("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + f"  {row[3]}")
                if row[4]:
                    lines.append(" " * (sum(widths) + 6) + f"  fix: {row[4]}")
        lines += [""] + [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def failure_message(self) -> str:
        """Every unsupported node with reason and fix, for the error that stops a run."""
        lines = [
            f"{len(self.unsupported)} node(s) of {self.model} cannot run on TensorRT {self.tensorrt_version} (checked with {self.source}):"
        ]
        for node in self.unsupported:
            lines.append(f"  {node.name} [{op_key(node.domain, node.op_type)}]: {node.reason}")
            if node.fix:
                lines.append(f"    fix: {node.fix}")
        return "\n".join(lines)

    def raise_if_unsupported(self) -> None:
        if not self.ok:
            raise CompatibilityError(STAGE, self.failure_message())


def op_key(domain: str, op_type: str) -> str:
    return op_type if domain in DEFAULT_DOMAINS else f"{domain}::{op_type}"


def summarize(nodes: Sequence[NodeReport]) -> ReportSummary:
    by_op: dict[str, OpTypeSummary] = {}
    for node in nodes:
        counts = by_op.setdefault(op_key(node.domain, node.op_type), OpTypeSummary())
        counts.count += 1
        setattr(counts, node.status, getattr(counts, node.status) + 1)
    return ReportSummary(
        nodes=len(nodes),
        supported=sum(1 for n in nodes if n.status == "supported"),
        conditional=sum(1 for n in nodes if n.status == "conditional"),
        unsupported=sum(1 for n in nodes if n.status == "unsupported"),
        by_op_type=dict(sorted(by_op.items())),
    )
