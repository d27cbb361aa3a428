"""'Up to date' means nothing that makes the engines changed: the model's code, the eval set and the
calibration set count as much as the checkpoint and the spec, and an unchanged re-run is answered
before any Prefect server starts."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import DIGITS_DIR, DIGITS_SPEC, REPO
from tests.flow_harness import run_flow
from trtforge.registry import open_registry

pytestmark = pytest.mark.usefixtures("prefect_api")

# The CLI with Prefect and torch unimportable: it can only answer from the registry.
WITHOUT_PIPELINE = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("prefect", "torch"):
                raise ModuleNotFoundError("No module named " + repr(name), name=name)
    sys.meta_path.insert(0, Block())
    from trtforge.cli import main
    main()
    """
)


def own_copy(folder: Path, checkpoint: Path) -> Path:
    """The digits example as a user's own folder: model code, eval set and calibration set all editable."""
    folder.mkdir(parents=True)
    for name in ("digits_model.py", "digits_data.py", "eval.npz"):
        shutil.copy(DIGITS_DIR / name, folder / name)
    shutil.copy(REPO / "calibration_data" / "digits" / "calibration.npz", folder / "calibration.npz")
    data = yaml.safe_load(DIGITS_SPEC.read_text())
    data.update(checkpoint=str(checkpoint), train=None)
    data["calibration"]["data"] = "calibration.npz"
    data["targets"] = [t for t in data["targets"] if t["precision"] in ("fp32", "int8") and t["backend"] == "onnxruntime"]
    (folder / "spec.yaml").write_text(yaml.safe_dump(data))
    return folder / "spec.yaml"


def cli_without_pipeline(spec: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    args = ["run", str(spec), "--registry", f"file://{tmp_path / 'registry'}", "--artifacts", str(tmp_path / "artifacts")]
    return subprocess.run([sys.executable, "-c", WITHOUT_PIPELINE, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def int8_conversion(summary):
    (conversion,) = [c for c in summary.conversions if c.precision == "int8"]
    return conversion


def test_each_input_that_makes_the_engines_rebuilds_and_nothing_else_does(tmp_path, digits_checkpoint):
    spec = own_copy(tmp_path / "model", digits_checkpoint)
    registry = open_registry(f"file://{tmp_path / 'registry'}")
    first = run_flow(spec, tmp_path)
    assert first.published and first.version == 1
    lineage = registry.manifest("digits-cnn", 1).lineage
    assert set(lineage.inputs) >= {"checkpoint_sha256", "spec_sha256", "model_code_sha256", "eval_data_sha256", "code_version", "tools"}

    unchanged = cli_without_pipeline(spec, tmp_path)
    assert unchanged.returncode == 0, unchanged.stderr
    assert unchanged.stdout.strip() == "up to date: version 1"

    model = spec.parent / "digits_model.py"
    # The same function written another way: relu(y) - relu(-y) is y, but the graph has new nodes.
    identity = "y = self.classifier(self.features(x))\n        return nn.functional.relu(y) - nn.functional.relu(-y)"
    model.write_text(model.read_text().replace("return self.classifier(self.features(x))", identity))
    edited = run_flow(spec, tmp_path)
    assert edited.published and edited.version == 2, "the same weights in a changed forward() are a new model"
    exported = [registry.manifest("digits-cnn", v).lineage.exported_onnx_sha256 for v in (1, 2)]
    assert exported[0] != exported[1], "the edited model was exported again, not taken from the cache"

    with np.load(spec.parent / "eval.npz") as archive:
        arrays = {key: archive[key][:-20] for key in archive.files}
    np.savez(spec.parent / "eval.npz", **arrays)
    regated = run_flow(spec, tmp_path)
    assert regated.published and regated.version == 3
    assert int8_conversion(regated).cached, "a new eval set re-gates; it does not recalibrate"

    with np.load(spec.parent / "calibration.npz") as archive:
        arrays = {key: archive[key][:-50] for key in archive.files}
    np.savez(spec.parent / "calibration.npz", **arrays)
    recalibrated = run_flow(spec, tmp_path)
    assert recalibrated.published and recalibrated.version == 4
    assert not int8_conversion(recalibrated).cached, "a new calibration set recalibrates"

    assert cli_without_pipeline(spec, tmp_path).stdout.strip() == "up to date: version 4"
    assert registry.versions("digits-cnn") == [1, 2, 3, 4]


def cached_stages(summary) -> dict[str, bool]:
    return {timing.stage.value: timing.cached for timing in summary.stages if timing.stage.value in ("export", "simplify", "reference")}


def test_each_stage_reruns_only_for_what_it_reads(tmp_path, digits_checkpoint):
    spec = own_copy(tmp_path / "model", digits_checkpoint)
    first = run_flow(spec, tmp_path)
    assert cached_stages(first) == {"export": False, "simplify": False, "reference": False}

    data = yaml.safe_load(spec.read_text())
    data["targets"][1]["gate"] = {"min_cosine": 0.97}
    spec.write_text(yaml.safe_dump(data))
    regated = run_flow(spec, tmp_path)
    assert regated.published and regated.version == 2, "a new threshold is a new gate verdict"
    assert cached_stages(regated) == {"export": True, "simplify": True, "reference": True}
    assert int8_conversion(regated).cached, "a gate threshold does not recalibrate"

    data["precision"] = {"calibration_method": "max"}
    spec.write_text(yaml.safe_dump(data))
    reconverted = run_flow(spec, tmp_path)
    assert reconverted.version == 3
    assert cached_stages(reconverted) == {"export": True, "simplify": True, "reference": True}
    assert not int8_conversion(reconverted).cached and int8_conversion(reconverted).method == "max"
    assert len(list((tmp_path / "artifacts" / "work" / "digits-cnn").iterdir())) == 1, "one work folder for one exported graph"
