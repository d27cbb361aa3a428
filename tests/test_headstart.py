"""The head start: a run's first stages begun before its flow, taken by the flow's tasks only for the same arguments."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.flow_harness import write_spec
from tests.waiting import wait_until
from trtforge.errors import CheckpointError
from trtforge.hashing import sha256_file
from trtforge.headstart import head_start
from trtforge.lineage import export_work_dir
from trtforge.spec import load_spec
from trtforge.stages.export import EXPORTED_GRAPH
from trtforge.stages.runner import Stage


def test_a_failed_stage_is_raised_by_the_task_that_takes_it_and_nothing_after_it_starts(tmp_path):
    spec = load_spec(write_spec(tmp_path / "spec", tmp_path / "missing.safetensors", train=None))
    with head_start(spec, None, tmp_path / "artifacts") as started:
        with pytest.raises(CheckpointError, match=r"missing\.safetensors does not exist and the spec has no 'train'"):
            started.take(Stage.RETRAIN, {"spec": spec, "checkpoint": None})
        assert started.take(Stage.EXPORT, {"spec": spec, "checkpoint": None, "work_dir": tmp_path}) is None
    assert not (tmp_path / "artifacts" / "work").exists()


def test_a_task_with_other_arguments_runs_its_stage_itself(tmp_path, digits_checkpoint):
    spec = load_spec(write_spec(tmp_path / "spec", digits_checkpoint))
    artifacts = tmp_path / "artifacts"
    # A work folder that holds an exported graph: the flow's export task is a cache hit, so none is started.
    work_dir = export_work_dir(artifacts, spec, sha256_file(digits_checkpoint))
    work_dir.mkdir(parents=True)
    (work_dir / EXPORTED_GRAPH).write_bytes(b"exported before")
    with head_start(spec, None, artifacts) as started:
        assert started.take(Stage.RETRAIN, {"spec": spec, "checkpoint": Path("other.safetensors")}) is None
        done = started.take(Stage.RETRAIN, {"spec": spec, "checkpoint": None})
        assert done.result.sha256 == sha256_file(digits_checkpoint) and not done.result.trained
        assert started.taken(Stage.RETRAIN) is done and started.taken(Stage.RETRAIN) is None
        assert started.take(Stage.EXPORT, {"spec": spec, "checkpoint": done.result, "work_dir": work_dir}) is None
        assert started.take(Stage.SIMPLIFY, {}) is None
    assert (work_dir / EXPORTED_GRAPH).read_bytes() == b"exported before"


def _session_processes(session: int) -> list[int]:
    """The processes still alive in ``session`` (a process group leader's session, from /proc)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def test_ctrl_c_during_a_head_started_training_stops_it_and_leaves_no_checkpoint(tmp_path):
    started = tmp_path / "training-started"
    (tmp_path / "endless_train.py").write_text(
        f"""import time
from pathlib import Path

import torch


def train(checkpoint):
    Path({str(started)!r}).touch()
    weights = torch.randn(256, 256)
    # Far longer than the test waits: the run can only end by being interrupted.
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        weights = torch.tanh(weights @ weights)
    torch.save({{"weights": weights}}, checkpoint)
"""
    )
    checkpoint = tmp_path / "checkpoints" / "digits.safetensors"
    spec = write_spec(tmp_path / "spec", checkpoint, train=f"{tmp_path / 'endless_train.py'}:train")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TRTFORGE_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    command = [sys.executable, "-c", "from trtforge.cli import main; main()", "run", str(spec)]
    command += ["--registry", f"file://{tmp_path / 'registry'}", "--artifacts", str(tmp_path / "artifacts")]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) as run:
        try:
            wait_until(started.exists, timeout=300, what="the training started", process=run)
            # To the run's process alone, as a supervisor's kill -INT sends it: its children see nothing.
            run.send_signal(signal.SIGINT)
            out, err = run.communicate(timeout=300)
        finally:
            run.kill()
    assert run.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not checkpoint.parent.exists() or list(checkpoint.parent.iterdir()) == []
    assert not (tmp_path / "registry").exists()
    wait_until(lambda: not _session_processes(run.pid), timeout=60, what="every process of the run ended")
