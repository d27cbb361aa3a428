from __future__ import annotations

from trtforge.tasks.stage import stage_task

from trtforge.stages.build import BuildRequest, build_requested
from trtforge.stages.runner import Stage
from trtforge.summary import TargetOutcome, TargetStatus


def describe_outcome(outcome: TargetOutcome) -> str:
    seconds = outcome.record.get("build_seconds", 0.0)
    if outcome.status is TargetStatus.PASSED:
        return f"{outcome.tag} built in {seconds:.2f} s, gate passed { ({k: round(v, 4) for k, v in outcome.metrics.items()}) }"
    return f"{outcome.tag} gate FAILED: {outcome.reason}"


@stage_task(Stage.BUILD, describe=describe_outcome, task_run_name="build-and-gate-target-{request.target_index}")
def build_and_gate_task(request: BuildRequest) -> TargetOutcome:
    return build_requested(request)
