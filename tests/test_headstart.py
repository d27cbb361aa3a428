"""The head start: a run's first stages begun before its flow, taken by the flow's tasks only for the same arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.flow_harness import write_spec
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
