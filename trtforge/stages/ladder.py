"""The precision ladder: an int8/fp8 target that fails its gate is re-converted with its most
sensitive nodes kept out of quantization (in ``precision.high_precision_dtype``) and re-gated,
a few nodes more each step, until it passes or ``precision.ladder.max_steps`` run out.

Detection is where full int8 fails most often (a detection head's last convolutions and its
Sigmoid/Concat carry box coordinates that one int8 scale cannot hold), so the ladder is on for
detection unless the spec says otherwise, and opt-in for other tasks. This module decides; the
flow runs the conversions, builds and gates each step through its tasks.
"""

from __future__ import annotations

from pydantic import BaseModel

from trtforge.spec import ModelSpec, Target, Task
from trtforge.stages.sensitivity import REPORTED_NODES, NodeSensitivity, SensitivityResult, describe_nodes


class LadderStep(BaseModel):
    step: int
    excluded_nodes: list[str]
    passed: bool
    task_metric: str
    value: float | None
    failures: list[str]


class LadderRecord(BaseModel):
    """What the manifest and the report keep: the ranking the ladder started from, and every step."""

    sensitive_nodes: list[NodeSensitivity]
    steps: list[LadderStep] = []

    @property
    def excluded_nodes(self) -> list[str]:
        return self.steps[-1].excluded_nodes if self.steps else []

    def summary(self) -> str:
        if not self.steps:
            return "most sensitive quantized nodes (error each adds): " + describe_nodes(self.sensitive_nodes)
        last = self.steps[-1]
        if last.passed:
            return (
                f"precision ladder passed at step {last.step} of {len(self.steps)}, {len(last.excluded_nodes)} node(s) "
                f"kept out of quantization: {', '.join(last.excluded_nodes)}"
            )
        trail = "; ".join(f"step {s.step}: {s.task_metric} {_value(s.value)} without {len(s.excluded_nodes)} node(s)" for s in self.steps)
        return f"precision ladder found no passing engine in {len(self.steps)} step(s) ({trail})"


def _value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def ladder_enabled(spec: ModelSpec, target: Target) -> bool:
    if not target.precision.needs_calibration:
        return False
    if target.ladder is not None:
        return target.ladder
    if spec.precision.ladder.enabled is not None:
        return spec.precision.ladder.enabled
    return spec.eval.task is Task.DETECTION


def start_record(ranking: SensitivityResult) -> LadderRecord:
    return LadderRecord(sensitive_nodes=ranking.nodes[:REPORTED_NODES])


def next_exclusions(spec: ModelSpec, excluded: list[str], ranking: SensitivityResult) -> list[str]:
    """The nodes the next step keeps out: those already out, plus the most sensitive of the rest. Empty when nothing is left to take out."""
    more = [n.name for n in ranking.worst(spec.precision.ladder.nodes_per_step, skip=frozenset(excluded))]
    return [*excluded, *more] if more else []
