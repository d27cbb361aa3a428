from __future__ import annotations

from trtforge.tasks.stage import stage_task

from trtforge.spec import ModelSpec, Target
from trtforge.stages.build import time_alone
from trtforge.stages.runner import Stage
from trtforge.summary import TargetOutcome


def describe_timing(outcome: TargetOutcome) -> str:
    latency = outcome.metrics.get("latency_ms_median")
    spread = outcome.metrics.get("latency_spread", 0.0)
    return f"{outcome.tag} timed alone: median {latency:.3g} ms at the opt shape (spread {spread:.0%})"


@stage_task(Stage.TIME, describe=describe_timing, task_run_name="time-{outcome.tag}")
def time_engine_task(spec: ModelSpec, target: Target, outcome: TargetOutcome) -> TargetOutcome:
    return time_alone(spec, target, outcome)
