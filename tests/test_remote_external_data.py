"""Staging between the main flow and a build worker: what travels, and what happens when it travels twice.

A converted ONNX that keeps its weights in external data files reaches a GPU worker whole.

Models over protobuf's 2 GB limit are saved with their tensors beside the .onnx; a build worker
shares nothing with the main flow but the registry's staging area, so those files travel there
too, and the worker checks each one's location and sha256 before building.
"""

from __future__ import annotations

import json
import re

import onnx
import pytest
from prefect import flow

from tests.flow_harness import write_spec
from trtforge.errors import RegistryError
from trtforge.registry import open_registry
from trtforge.staging import Staging, input_name, target_slot
from trtforge.summary import TargetOutcome, TargetStatus

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_a_model_with_external_data_is_staged_whole_and_built_on_the_worker(tmp_path, digits_onnx, digits_checkpoint, served_build_target):
    from trtforge.tasks.remote_build import build_on_worker_task

    from trtforge.spec import load_spec
    from trtforge.stages.build import BuildRequest
    from trtforge.stages.reference import reference_outputs

    model_dir = tmp_path / "converted"
    model_dir.mkdir()
    model = onnx.load(digits_onnx)
    onnx.save(model, model_dir / "model.onnx", save_as_external_data=True, location="weights.bin")
    assert (model_dir / "weights.bin").stat().st_size > 50_000, "the weights live beside the graph"

    targets = [{"backend": "onnxruntime", "precision": "fp32", "work_pool": "test-builders"}]
    spec_path = write_spec(tmp_path / "spec", digits_checkpoint, targets=targets)
    spec = load_spec(spec_path)
    registry = f"file://{tmp_path / 'registry'}"
    request = BuildRequest(
        spec_path=str(spec_path),
        target_index=0,
        onnx_path=model_dir / "model.onnx",
        reference=reference_outputs(spec, digits_checkpoint, tmp_path / "cache"),
        work_dir=tmp_path / "remote-0",
        registry=registry,
    )

    @flow
    def build_remotely():
        return build_on_worker_task("build-target/test-builders", request, spec.name, "run-1")

    outcome = build_remotely()
    assert outcome.status is TargetStatus.PASSED, outcome.reason
    assert outcome.metrics["accuracy"] > 0.95
    staged = [info.key for info in open_registry(registry).store.list(f"{spec.name}/staging/run-1/")]
    assert any(re.search(r"\.onnx\.data/[0-9a-f]{16}/weights\.bin$", key) for key in staged), staged


def test_a_staged_location_outside_the_model_folder_is_refused(tmp_path):
    staging = Staging(open_registry(f"file://{tmp_path / 'registry'}"), "digits-cnn", "run-1")
    with pytest.raises(RegistryError, match=r"location '\.\./\.ssh/authorized_keys' of onnx-1\.onnx leaves the model's folder"):
        staging.get_external_data("onnx-1.onnx", {"../.ssh/authorized_keys": "0" * 64}, tmp_path / "work")
    with pytest.raises(RegistryError, match="is an absolute path"):
        staging.get_external_data("onnx-1.onnx", {"/etc/passwd": "0" * 64}, tmp_path / "work")
    assert not (tmp_path / "work").exists()


def _outcome(folder, engine_bytes: bytes) -> TargetOutcome:
    folder.mkdir(parents=True)
    (folder / "engine").write_bytes(engine_bytes)
    (folder / "build.json").write_text(json.dumps({"attempt": engine_bytes.decode()}))
    files = {"engine": folder / "engine", "build.json": folder / "build.json"}
    return TargetOutcome(tag="t", backend="onnxruntime", precision="fp32", required=True, status=TargetStatus.PASSED, files=files)


def test_a_build_delivered_twice_stages_its_second_outcome_whole(registry_uri, tmp_path):
    """Prefect delivers a flow run at least once: a second execution of the same target's build (or the
    next ladder rung on the same slot) must not fail on the first one's files, nor mix with them."""
    staging = Staging(open_registry(registry_uri), "digits-cnn", "run-1")
    slot = target_slot(0)
    staging.put_outcome(slot, _outcome(tmp_path / "first", b"first"))
    staging.put_outcome(slot, _outcome(tmp_path / "second", b"second"))

    fetched = staging.get_outcome(slot, tmp_path / "fetched")
    assert fetched.files["engine"].read_bytes() == b"second"
    assert json.loads(fetched.files["build.json"].read_text()) == {"attempt": "second"}, "the outcome's files all come from one attempt"


def test_an_input_staged_again_by_a_second_target_is_found_there(registry_uri, tmp_path):
    reference = tmp_path / "reference.npz"
    reference.write_bytes(b"outputs")
    staging = Staging(open_registry(registry_uri), "digits-cnn", "run-1")
    name = input_name("reference", "ab" * 32, ".npz")
    staging.put_input(name, reference)
    staging.put_input(name, reference)
    assert staging.get(name, tmp_path / "back.npz").read_bytes() == b"outputs"
