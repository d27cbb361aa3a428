from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from trtforge.stages.check_ops import CompatibilityReport, check_ops


@task(name="check-ops")
def check_ops_task(onnx_path: Path, plugins: list[str], tensorrt_version: str | None = None) -> CompatibilityReport:
    report = check_ops(onnx_path, plugins=plugins, tensorrt_version=tensorrt_version)
    logger = get_run_logger()
    logger.info(
        "check-ops (%s, TensorRT %s): %d nodes, %d unsupported, %d conditional",
        report.source,
        report.tensorrt_version,
        len(report.nodes),
        len(report.unsupported),
        len(report.conditional),
    )
    for node in report.unsupported:
        logger.error("check-ops: %s (%s) unsupported: %s; fix: %s", node.name, node.op_type, node.reason, node.fix)
    return report
