"""What a run did, per stage and per target: the data behind the CLI table, --json, report.md and the manifest."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from trtforge.stages.runner import Stage


class TargetStatus(str, Enum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    UNAVAILABLE = "unavailable"


class TargetOutcome(BaseModel):
    tag: str
    backend: str
    precision: str
    required: bool
    status: TargetStatus
    reason: str = ""
    metrics: dict[str, float] = {}
    thresholds: dict[str, float] = {}
    failures: list[str] = []
    notes: list[str] = []
    record: dict[str, Any] = {}
    files: dict[str, Path] = {}
    location: str | None = None


class StageTiming(BaseModel):
    stage: Stage
    seconds: float
    detail: str = ""
    cached: bool = False
    # When it started (epoch seconds): a run's stages overlap (a head start, parallel targets), so the time a run
    # spent outside every stage is its wall time less the union of these intervals, not less their sum.
    started_at: float | None = None
    # Run before the flow took it (trtforge.headstart), while Prefect's API server started.
    head_start: bool = False


class FlaggedOpType(BaseModel):
    op_type: str
    conditional: int
    unsupported: int


class CompatibilitySummary(BaseModel):
    """One operator check: of one graph (the fp32 one, or a converted precision's) against one TensorRT version."""

    graph: str
    source: str
    tensorrt_version: str
    nodes: int
    supported: int
    conditional: int
    unsupported: int
    flagged_op_types: list[FlaggedOpType] = []


class CalibrationFailure(BaseModel):
    expectation: str
    column: str | None
    details: str


class CalibrationSummary(BaseModel):
    passed: bool
    samples: int
    sha256: str
    failed: list[CalibrationFailure] = []
    data_docs: str | None = None


class ConversionSummary(BaseModel):
    precision: str
    method: str
    qdq_node_count: int
    quantized_op_types: dict[str, int] = {}
    seconds: float
    cached: bool
    modelopt_version: str | None = None
    # What quantized or cast the graph (ModelOpt, or onnxruntime's quantizer for onnxruntime CPU int8); None for fp32.
    quantizer: str | None = None
    quantizer_version: str | None = None
    excluded_nodes: list[str] = []


class RunSummary(BaseModel):
    model: str
    version: int | None = None
    published: bool = False
    up_to_date: bool = False
    passed: bool = False
    registry: str
    run_dir: Path | None = None
    message: str = ""
    # The stage a run-ending error came from, when the run did not get as far as its targets' verdict.
    failed_stage: str | None = None
    stages: list[StageTiming] = []
    targets: list[TargetOutcome] = []
    warnings: list[str] = []
    compatibility: list[CompatibilitySummary] = []
    calibration: CalibrationSummary | None = None
    conversions: list[ConversionSummary] = []

    def public_json(self) -> dict[str, Any]:
        """The stable ``--json`` shape of ``trtforge run``."""
        return {
            "model": self.model,
            "version": self.version,
            "published": self.published,
            "up_to_date": self.up_to_date,
            "passed": self.passed,
            "message": self.message,
            "failed_stage": self.failed_stage,
            "targets": [
                {
                    "tag": t.tag,
                    "backend": t.backend,
                    "precision": t.precision,
                    "required": t.required,
                    "status": t.status.value,
                    "reason": t.reason,
                    "metrics": t.metrics,
                    "location": t.location,
                }
                for t in self.targets
            ],
            "stages": [
                {
                    "stage": s.stage.value,
                    "seconds": round(s.seconds, 3),
                    "started_at": s.started_at,
                    "cached": s.cached,
                    "head_start": s.head_start,
                }
                for s in self.stages
            ],
        }

    def required_failures(self) -> list[TargetOutcome]:
        return [t for t in self.targets if t.required and t.status is not TargetStatus.PASSED]
