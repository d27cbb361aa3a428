from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from trtforge.spec import ModelSpec
from trtforge.stages.checkpoint import CheckpointResult
from trtforge.stages.reference import ReferenceResult, reference_outputs


@task(name="reference-outputs")
def reference_task(spec: ModelSpec, checkpoint: CheckpointResult, cache_dir: Path) -> ReferenceResult:
    result = reference_outputs(spec, checkpoint.path, cache_dir)
    get_run_logger().info("reference: PyTorch FP32 outputs on the eval set %s", "(cached)" if result.cached else "computed")
    return result
