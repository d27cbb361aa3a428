from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from trtforge.spec import ModelSpec
from trtforge.stages.validate_calibration import CalibrationReport, validate_calibration


@task(name="validate-calibration")
def validate_calibration_task(spec: ModelSpec, out_dir: Path) -> CalibrationReport:
    report = validate_calibration(spec, out_dir=out_dir)
    logger = get_run_logger()
    if report.passed:
        logger.info("validate-calibration: %d samples passed (data docs: %s)", report.samples, report.data_docs)
    else:
        for failure in report.failed:
            logger.error("validate-calibration: %s on %s: %s", failure.expectation, failure.column, failure.details)
    return report
