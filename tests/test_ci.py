"""The CI outputs of a run: verdict, JUnit XML (a test case per target gate), Markdown, and the run report in the registry."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml

from tests.conftest import REPO
from trtforge.ci import ci_markdown, ci_passed, junit_xml, read_run_report, run_report_key, write_junit, write_markdown, write_run_report
from trtforge.errors import RegistryError
from trtforge.registry import open_registry
from trtforge.summary import RunSummary, StageTiming, TargetOutcome, TargetStatus

FP32 = "ort1.32-cpu-fp32-b1_32_128"
INT8 = "ort1.32-cpu-int8-b1_32_128"
TRT = "trt10.13-sm90-fp16-b1_32_128"


def outcome(tag: str, status: TargetStatus, required: bool = True, **fields) -> TargetOutcome:
    precision = tag.split("-")[2]
    backend = "tensorrt" if tag.startswith("trt") else "onnxruntime"
    return TargetOutcome(tag=tag, backend=backend, precision=precision, required=required, status=status, **fields)


def passed(tag: str = FP32, **fields) -> TargetOutcome:
    return outcome(
        tag,
        TargetStatus.PASSED,
        metrics={"accuracy": 0.9889, "agreement": 1.0},
        thresholds={"min_accuracy": 0.95},
        record={"build_seconds": 0.25},
        **fields,
    )


def gate_failed(tag: str = INT8, required: bool = True) -> TargetOutcome:
    failures = ["top-1 accuracy 0.4100 < threshold 0.9500", "mean cosine similarity to the FP32 reference 0.9100 < threshold 0.9800"]
    return outcome(
        tag,
        TargetStatus.FAILED,
        required=required,
        reason="; ".join(failures),
        failures=failures,
        metrics={"accuracy": 0.41, "cosine_mean": 0.91},
        thresholds={"min_accuracy": 0.95, "min_cosine": 0.98},
    )


def unavailable(tag: str = TRT, required: bool = False) -> TargetOutcome:
    reason = "no GPU worker for sm_90: start a worker on pool gpu-sm90, or remove the target"
    return outcome(tag, TargetStatus.UNAVAILABLE, required=required, reason=reason)


def summary(targets: list[TargetOutcome], **fields) -> RunSummary:
    published = fields.pop("published", not any(t.required and t.status is not TargetStatus.PASSED for t in targets))
    defaults = {
        "model": "digits-cnn",
        "registry": "file:///srv/registry",
        "version": 4 if published else None,
        "published": published,
        "passed": published,
        "message": "published version 4" if published else "not published: see targets",
        "stages": [StageTiming(stage="export", seconds=3.5), StageTiming(stage="build", seconds=6.0)],
        "targets": targets,
    }
    return RunSummary(**{**defaults, **fields})


def parse(xml: str) -> tuple[ElementTree.Element, dict[str, ElementTree.Element]]:
    root = ElementTree.fromstring(xml.encode())
    return root, {case.get("name"): case for case in root.iter("testcase")}


def test_published_run_is_one_passing_case_per_target_plus_publish():
    run = summary([passed(), passed(INT8)])
    root, cases = parse(junit_xml(run))
    assert ci_passed(run)
    assert list(cases) == [FP32, INT8, "publish"]
    assert all(case.find("failure") is None and case.find("skipped") is None for case in cases.values())
    (suite,) = root.iter("testsuite")
    assert suite.get("name") == "trtforge.digits-cnn"
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped"), suite.get("time")) == ("3", "0", "0", "9.500")
    assert cases[FP32].get("classname") == "trtforge.digits-cnn.gate" and cases[FP32].get("time") == "0.250"
    assert "accuracy=0.9889" in cases[FP32].find("system-out").text
    assert cases["publish"].find("system-out").text == "published version 4 to file:///srv/registry"
    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert properties["version"] == "4" and properties["published"] == "true"


def test_failed_required_gate_is_a_failure_carrying_every_reason():
    run = summary([passed(), gate_failed()])
    root, cases = parse(junit_xml(run))
    assert not ci_passed(run)
    failure = cases[INT8].find("failure")
    assert failure.get("type") == "gate"
    assert (
        failure.get("message")
        == "top-1 accuracy 0.4100 < threshold 0.9500; mean cosine similarity to the FP32 reference 0.9100 < threshold 0.9800"
    )
    assert "gate: top-1 accuracy 0.4100 < threshold 0.9500" in failure.text
    assert "thresholds: min_accuracy=0.95, min_cosine=0.98" in failure.text
    assert cases["publish"].find("failure").get("message") == "not published: see targets"
    assert root.get("failures") == "2" and root.get("tests") == "3"


def test_optional_targets_that_did_not_pass_are_skipped_with_the_reason_and_do_not_fail_the_run():
    run = summary([passed(), unavailable(), gate_failed(required=False)])
    root, cases = parse(junit_xml(run))
    assert ci_passed(run)
    skipped = cases[TRT].find("skipped")
    assert skipped.get("message") == "optional target unavailable: " + unavailable().reason
    assert cases[INT8].find("skipped").get("message").startswith("optional target failed: top-1 accuracy 0.4100")
    assert root.get("skipped") == "2" and root.get("failures") == "0"


def test_required_target_without_a_worker_fails_as_unavailable():
    run = summary([passed(), unavailable(required=True)])
    _, cases = parse(junit_xml(run))
    assert not ci_passed(run)
    failure = cases[TRT].find("failure")
    assert failure.get("type") == "unavailable" and "start a worker on pool gpu-sm90" in failure.get("message")


def test_up_to_date_run_passes_with_the_version_it_already_has():
    run = RunSummary(
        model="digits-cnn", registry="s3://engines/prod", version=7, up_to_date=True, passed=True, message="up to date: version 7"
    )
    _, cases = parse(junit_xml(run))
    assert ci_passed(run)
    assert list(cases) == ["publish"]
    assert cases["publish"].find("system-out").text.startswith("up to date: version 7")
    assert ci_markdown(run).startswith("# trtforge ci: digits-cnn: passed\n")


def test_run_stopped_before_any_gate_fails_the_publish_case_with_its_message():
    message = "simplify: onnxsim failed: Unsupported op Foo; fix the model or exclude the op"
    run = RunSummary(model="digits-cnn", registry="file:///srv/registry", message=message)
    root, cases = parse(junit_xml(run))
    assert not ci_passed(run)
    assert list(cases) == ["publish"]
    assert cases["publish"].find("failure").get("message") == message
    assert root.get("failures") == "1"


def test_published_but_required_target_failed_is_not_a_pass():
    """A summary that claims publication while a required target failed must never turn CI green."""
    run = summary([gate_failed()], published=True, passed=True, version=3, message="published version 3")
    assert not ci_passed(run)


def test_control_characters_from_tool_output_keep_the_xml_valid():
    noisy = outcome(FP32, TargetStatus.FAILED, reason="build: polygraphy said \x1b[31mERROR\x1b[0m\x00 at layer 3", failures=[])
    _, cases = parse(junit_xml(summary([noisy])))
    assert cases[FP32].find("failure").get("message") == "build: polygraphy said ?[31mERROR?[0m? at layer 3"


def test_markdown_leads_with_the_verdict_and_spells_out_blocking_gates():
    run = summary([passed(), gate_failed(), unavailable()])
    text = ci_markdown(run)
    assert text.startswith("# trtforge ci: digits-cnn: FAILED\n")
    assert f"- `{INT8}` failed: top-1 accuracy 0.4100" in text
    assert "  - mean cosine similarity to the FP32 reference 0.9100 < threshold 0.9800" in text
    assert TRT not in text.split("## trtforge")[0], "optional targets are not listed as blocking"
    assert "### Targets" in text and f"| {FP32} | passed |" in text


def test_files_are_written_whole_and_replace_older_ones(tmp_path):
    junit, markdown = tmp_path / "reports" / "junit.xml", tmp_path / "reports" / "summary.md"
    markdown.parent.mkdir()
    markdown.write_text("an older run's summary, much longer than the new one " * 100)
    write_junit(summary([gate_failed()]), junit)
    write_markdown(summary([passed()]), markdown)
    assert parse(junit.read_text())[1][INT8].find("failure") is not None
    assert markdown.read_text().startswith("# trtforge ci: digits-cnn: passed") and "older run" not in markdown.read_text()
    assert sorted(p.name for p in junit.parent.iterdir()) == ["junit.xml", "summary.md"]


def test_run_report_round_trips_through_the_registry(tmp_path):
    registry = open_registry(f"file://{tmp_path / 'registry'}")
    run = summary([passed(), gate_failed(), unavailable()], run_dir=Path("/worker/artifacts/runs/digits-cnn/x"))
    key = write_run_report(registry, run, "3f2c9a")
    assert key == "digits-cnn/runs/3f2c9a/report.json"
    assert read_run_report(registry, "digits-cnn", "3f2c9a") == run
    assert read_run_report(registry, "digits-cnn", "another-run") is None
    assert registry.models() == ["digits-cnn"] and registry.versions("digits-cnn") == []


def test_run_report_ids_cannot_leave_the_runs_folder():
    for bad in ("../versions/1", "a/b", "", ".hidden"):
        with pytest.raises(RegistryError, match="invalid run report id"):
            run_report_key("digits-cnn", bad)


def test_a_damaged_run_report_is_refused_with_its_location(tmp_path):
    registry = open_registry(f"file://{tmp_path / 'registry'}")
    registry.store.put(run_report_key("digits-cnn", "r1"), b'{"model": "digits-cnn"}')
    with pytest.raises(RegistryError, match=r"digits-cnn/runs/r1/report.json is not a run report"):
        read_run_report(registry, "digits-cnn", "r1")


WORKFLOW = REPO / "infra" / "ci" / "trtforge-checkpoint.yml"


def workflow_step(job: str, name: str) -> str:
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"][job]["steps"]
    return next(step["run"] for step in steps if step.get("name") == name)


def test_the_example_workflow_calls_trtforge_ci_only_with_options_it_has():
    import typer.main

    from trtforge.cli import app

    script = workflow_step("engines", "trtforge ci")
    used = set(re.findall(r"(--[a-z][a-z-]*)", script))
    command = typer.main.get_command(app).commands["ci"]
    known = {option for parameter in command.params for option in parameter.opts}
    assert {"--spec", "--checkpoint", "--summary", "--junit", "--deployment"} <= used <= known
    assert "trtforge-summary.md" in workflow_step("engines", "Job summary")


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_example_workflow_finds_changed_checkpoint_pointers(tmp_path):
    """The workflow's own finder script, run against a real repository history."""
    finder = workflow_step("checkpoints", "Changed pointer files, or the dispatched checkpoint")
    program = finder.split("<<'PY' >> \"$GITHUB_OUTPUT\"\n", 1)[1].rsplit("PY\n", 1)[0]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()

    def pointer(folder: str, uri: str) -> None:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "spec.yaml").touch()
        (tmp_path / folder / "checkpoint.uri").write_text(uri + "\n")

    def find(**env: str) -> str:
        run = subprocess.run(["python3", "-c", program], cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stdout

    git("init", "-q")
    git("config", "user.email", "ci@example.com")
    git("config", "user.name", "ci")
    pointer("models/digits", "s3://ckpt/digits-1.safetensors")
    pointer("models/resnet", "s3://ckpt/resnet-1.safetensors")
    git("add", "-A")
    git("commit", "-qm", "two models")
    first = git("rev-parse", "HEAD")
    pointer("models/digits", "s3://ckpt/digits-2.safetensors")
    (tmp_path / "notes.txt").write_text("unrelated")
    git("add", "-A")
    git("commit", "-qm", "new digits checkpoint")

    changed = find(EVENT="push", BEFORE=first)
    assert changed == 'matrix={"include": [{"spec": "models/digits/spec.yaml", "checkpoint": "s3://ckpt/digits-2.safetensors"}]}\ncount=1\n'
    new_branch = find(EVENT="push", BEFORE="0" * 40)
    assert new_branch.count('"spec"') == 2 and new_branch.endswith("count=2\n")
    dispatched = find(EVENT="workflow_dispatch", SPEC="models/resnet/spec.yaml", CHECKPOINT=" s3://ckpt/resnet-7.safetensors\n")
    assert '"checkpoint": "s3://ckpt/resnet-7.safetensors"' in dispatched
