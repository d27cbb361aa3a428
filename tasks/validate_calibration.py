from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger
from trtforge.tasks.stage import stage_task

from trtforge.spec import ModelSpec
from trtforge.stages.runner import Stage
from trtforge.stages.validate_calibration import CalibrationReport, validate_calibration


def _describe(report: CalibrationReport) -> str:
    return f"{report.samples} samples {'passed' if report.passed else 'FAILED'} (data docs: {report.data_docs})"


@stage_task(Stage.VALIDATE_CALIBRATION, describe=_describe)
def validate_calibration_task(spec: ModelSpec, out_dir: Path) -> CalibrationReport:
    report = validate_calibration(spec, out_dir=out_dir)
    logger = get_run_logger()
    for failure in report.failed:
        logger.error("validate-calibration: %s on %s: %s", failure.expectation, failure.column, failure.details)
    return report
