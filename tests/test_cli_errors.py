"""The real ``trtforge`` command on failing runs: a target table, one ``error:`` line, no traceback.

Prefect logs every failed task and flow with its traceback; on the terminal that is noise in
front of the one line that says what to fix. Each case runs the installed CLI in a process of
its own, as a CI job does, and reads its stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tests.conftest import REPO
from tests.flow_harness import write_spec

# One Prefect home for the module: a new one costs each run its database migrations.
PREFECT_HOME = Path(tempfile.mkdtemp(prefix="trtforge-cli-errors-prefect-"))


def trtforge(*args: str, tmp_path: Path, debug: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TRTFORGE_"))}
    env["PREFECT_HOME"] = str(PREFECT_HOME)
    if debug:
        env["TRTFORGE_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-c", "from trtforge.cli import main; main()", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    """The CLI's own error lines (Prefect's log lines carry a timestamp first)."""
    return [line for line in done.stderr.splitlines() if line.startswith("error: ")]


def run_args(spec: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["run", str(spec), "--registry", f"file://{tmp_path / 'registry'}", "--artifacts", str(tmp_path / "artifacts"), *extra]


class RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_failed_gate_prints_the_table_and_one_error_line(tmp_path, digits_checkpoint):
    spec = write_spec(tmp_path / "spec", digits_checkpoint, gate={"min_accuracy": 0.9999})
    done = trtforge(*run_args(spec, tmp_path), tmp_path=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert error_lines(done) == [f"error: {done.stdout.rstrip().splitlines()[-2]}"]
    assert error_lines(done)[0].startswith("error: not published: ort")
    assert "failed" in done.stdout and "top-1 accuracy" in done.stdout


def test_a_refused_pickle_checkpoint_is_one_error_line_and_one_json_object(tmp_path, digits_checkpoint):
    evil = tmp_path / "evil.pt"
    torch.save({"weights": RunsCode()}, evil)
    spec = write_spec(tmp_path / "spec", evil, train=None)
    done = trtforge(*run_args(spec, tmp_path, "--json"), tmp_path=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = error_lines(done)
    assert str(evil) in line and "refused" in line
    printed = json.loads(done.stdout)
    assert printed["passed"] is False and printed["published"] is False
    assert printed["failed_stage"] == "export" and printed["message"] == line.removeprefix("error: ")


def test_a_required_target_without_a_worker_is_one_error_line(tmp_path, digits_checkpoint):
    targets = [{"backend": "onnxruntime", "precision": "fp32"}, {"backend": "tensorrt", "arch": "sm_90", "precision": "fp16"}]
    spec = write_spec(tmp_path / "spec", digits_checkpoint, targets=targets)
    done = trtforge(*run_args(spec, tmp_path), tmp_path=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = error_lines(done)
    assert "unavailable: no GPU worker for sm_90" in line


def test_debug_shows_the_traceback(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    quiet = trtforge("check", str(broken), tmp_path=tmp_path)
    loud = trtforge("check", str(broken), tmp_path=tmp_path, debug=True)
    flag = trtforge("--debug", "check", str(broken), tmp_path=tmp_path)
    assert quiet.returncode == loud.returncode == flag.returncode == 1
    assert "Traceback" not in quiet.stderr
    assert "Traceback" in loud.stderr and "Traceback" in flag.stderr
    assert error_lines(quiet) == error_lines(loud) == error_lines(flag) and len(error_lines(quiet)) == 1


def test_a_registry_that_is_no_uri_is_refused_before_any_training(tmp_path):
    example = tmp_path / "digits"
    shutil.copytree(REPO / "examples" / "digits", example, ignore=shutil.ignore_patterns("checkpoints"))
    spec = example / "spec.yaml"
    spec.write_text(spec.read_text().replace("../../calibration_data", str(REPO / "calibration_data")))
    folder = tmp_path / "registry"
    for command in (["run", str(spec)], ["ci", "--spec", str(spec), "--checkpoint", str(example / "checkpoints" / "x.pt")]):
        done = trtforge(*command, "--registry", str(folder), "--artifacts", str(tmp_path / "artifacts"), tmp_path=tmp_path)
        assert done.returncode == 1
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        assert error_lines(done) == [
            f"error: registry URI '{folder}' is not file://PATH or s3://BUCKET/PREFIX (for a folder: file://{folder})"
        ]
        assert not (example / "checkpoints").exists() and not folder.exists()
