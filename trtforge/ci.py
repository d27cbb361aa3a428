"""What a CI job needs from a run: a verdict, a JUnit report with one test case per target gate, a Markdown summary.

CI systems show JUnit test cases as tests, so every target is one: a required target that
failed its gate (or could not be built) is a failure carrying the reason; an optional one that
did not pass is skipped with the reason, since it does not fail the run. One more case,
``publish``, passes when the version was published or was already up to date, and fails with
the run's message otherwise, so a run that stopped before any gate (a failed export, a bad
calibration set) still shows why.

A run on a Prefect worker elsewhere leaves its summary in the registry, under
``<model>/runs/<report id>/report.json``, where the job that started it reads it back.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from xml.etree import ElementTree

from pydantic import ValidationError

from trtforge.errors import RegistryError
from trtforge.report import format_metrics, markdown_summary
from trtforge.safeio import atomic_write_text
from trtforge.summary import RunSummary, TargetOutcome, TargetStatus

REPORT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# XML 1.0 cannot carry most control characters, even escaped; messages quoting tool output may hold them.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def ci_passed(summary: RunSummary) -> bool:
    """Every required target passed and the version was published, or the same checkpoint and spec already were."""
    return summary.passed and (summary.published or summary.up_to_date) and not summary.required_failures()


def _text(value: str) -> str:
    return _NOT_XML.sub("?", value)


def _thresholds(outcome: TargetOutcome) -> str:
    return ", ".join(f"{name}={value:g}" for name, value in outcome.thresholds.items())


def _gate_case(suite: ElementTree.Element, model: str, outcome: TargetOutcome) -> str:
    case = ElementTree.SubElement(
        suite,
        "testcase",
        classname=f"trtforge.{model}.gate",
        name=outcome.tag,
        time=f"{float(outcome.record.get('build_seconds', 0.0)):.3f}",
    )
    details = [f"{outcome.backend} {outcome.precision}, {'required' if outcome.required else 'optional'}: {outcome.status.value}"]
    details += [f"gate: {failure}" for failure in outcome.failures]
    if outcome.reason and not outcome.failures:
        details.append(outcome.reason)
    details += [f"metrics: {format_metrics(outcome.metrics) or '-'}", f"thresholds: {_thresholds(outcome) or '-'}"]
    details += [f"note: {note}" for note in outcome.notes]
    body = _text("\n".join(details))
    reason = _text(outcome.reason or outcome.status.value)
    if outcome.status is TargetStatus.PASSED:
        ElementTree.SubElement(case, "system-out").text = body
        return "passed"
    if outcome.required:
        kind = "gate" if outcome.status is TargetStatus.FAILED else outcome.status.value
        ElementTree.SubElement(case, "failure", message=reason, type=kind).text = body
        return "failure"
    ElementTree.SubElement(case, "skipped", message=f"optional target {outcome.status.value}: {reason}").text = body
    return "skipped"


def _publish_case(suite: ElementTree.Element, summary: RunSummary) -> str:
    case = ElementTree.SubElement(suite, "testcase", classname=f"trtforge.{summary.model}", name="publish", time="0.000")
    if summary.up_to_date:
        outcome = f"up to date: version {summary.version} was built from this checkpoint and spec; nothing rebuilt"
    elif summary.published:
        outcome = f"published version {summary.version} to {summary.registry}"
    else:
        outcome = summary.message or "not published"
    if ci_passed(summary):
        ElementTree.SubElement(case, "system-out").text = _text(outcome)
        return "passed"
    ElementTree.SubElement(case, "failure", message=_text(outcome), type="not published").text = _text(outcome)
    return "failure"


def junit_xml(summary: RunSummary, timestamp: datetime | None = None) -> str:
    """One ``testsuite`` for the model: a test case per target gate and one for publishing."""
    root = ElementTree.Element("testsuites", name="trtforge")
    suite = ElementTree.SubElement(root, "testsuite", name=f"trtforge.{summary.model}")
    properties = ElementTree.SubElement(suite, "properties")
    for name, value in (
        ("model", summary.model),
        ("registry", summary.registry),
        ("version", "" if summary.version is None else str(summary.version)),
        ("published", str(summary.published).lower()),
        ("up_to_date", str(summary.up_to_date).lower()),
    ):
        ElementTree.SubElement(properties, "property", name=name, value=_text(value))
    verdicts = [_gate_case(suite, summary.model, outcome) for outcome in summary.targets]
    verdicts.append(_publish_case(suite, summary))
    seconds = sum(stage.seconds for stage in summary.stages)
    counts = {
        "tests": str(len(verdicts)),
        "failures": str(verdicts.count("failure")),
        "errors": "0",
        "skipped": str(verdicts.count("skipped")),
        "time": f"{seconds:.3f}",
    }
    suite.attrib.update(counts, timestamp=(timestamp or datetime.now(UTC)).isoformat(timespec="seconds"))
    root.attrib.update(counts)
    ElementTree.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ElementTree.tostring(root, encoding="unicode") + "\n"


def ci_markdown(summary: RunSummary) -> str:
    """The run's summary under a one-line verdict, with every failed required gate spelled out."""
    verdict = "passed" if ci_passed(summary) else "FAILED"
    lines = [f"# trtforge ci: {summary.model}: {verdict}", ""]
    blocking = summary.required_failures()
    if blocking:
        lines += ["Required targets that did not pass:", ""]
        for outcome in blocking:
            lines.append(f"- `{outcome.tag}` {outcome.status.value}: {outcome.reason or '-'}")
            lines += [f"  - {failure}" for failure in outcome.failures if failure != outcome.reason]
        lines.append("")
    return "\n".join(lines) + "\n" + markdown_summary(summary)


def write_junit(summary: RunSummary, path: Path) -> Path:
    return atomic_write_text(path, junit_xml(summary))


def write_markdown(summary: RunSummary, path: Path) -> Path:
    return atomic_write_text(path, ci_markdown(summary))


def run_report_key(model: str, report_id: str) -> str:
    if not REPORT_ID.match(report_id):
        raise RegistryError(f"invalid run report id {report_id!r}: use 1-128 of A-Z, a-z, 0-9, '.', '_', '-'")
    return f"{model}/runs/{report_id}/report.json"


def write_run_report(registry, summary: RunSummary, report_id: str) -> str:
    """Put the run's summary where a job on another machine can read it back; returns its key."""
    key = run_report_key(summary.model, report_id)
    registry.store.put(key, json.dumps(summary.model_dump(mode="json")).encode())
    return key


def read_run_report(registry, model: str, report_id: str) -> RunSummary | None:
    """The summary a run left under ``report_id``, or None if it left none."""
    key = run_report_key(model, report_id)
    stored = registry.store.get(key)
    if stored is None:
        return None
    try:
        return RunSummary.model_validate_json(stored.data)
    except ValidationError as err:
        raise RegistryError(f"{registry.uri}/{key} is not a run report: {err.errors()[0]['msg']}; run the job again") from None
