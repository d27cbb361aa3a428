from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger
from trtforge.tasks.stage import stage_task

from trtforge.spec import IsolationOptions
from trtforge.stages.check_ops import CompatibilityReport, check_ops
from trtforge.stages.runner import Stage


def _describe(report: CompatibilityReport) -> str:
    return (
        f"{report.source}, TensorRT {report.tensorrt_version}: {len(report.nodes)} nodes, "
        f"{len(report.unsupported)} unsupported, {len(report.conditional)} conditional"
    )


@stage_task(Stage.CHECK_OPS, describe=_describe)
def check_ops_task(onnx_path: Path, plugins: list[str], tensorrt_version: str | None, isolation: IsolationOptions) -> CompatibilityReport:
    report = check_ops(onnx_path, plugins=plugins, tensorrt_version=tensorrt_version, timeout_s=isolation.timeout_s)
    logger = get_run_logger()
    for node in report.unsupported:
        logger.error("check-ops: %s (%s) unsupported: %s; fix: %s", node.name, node.op_type, node.reason, node.fix)
    return report
