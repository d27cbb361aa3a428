"""The precision ladder on a model where full int8 really fails.

The trained digits CNN is reparametrized without changing its function: four channels of the
first block are scaled up 1000x (batch-norm scale and shift) and the second convolution's
weights for them scaled down as much. FP32 gives the same logits; but the tensor between the
two convolutions now holds activations of two magnitudes, which one per-tensor int8 scale
cannot hold (the outlier-channel problem), so full int8 collapses to chance. onnxruntime's
quantizer (what onnxruntime int8 targets get) quantizes that tensor as the first convolution's
output and as the second's input: the sensitivity ranking names the first, and keeping both
out of quantization recovers the model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.flow_harness import run_flow, write_spec
from trtforge.summary import TargetStatus

pytestmark = pytest.mark.usefixtures("prefect_api")
OUTLIER_CHANNELS = 4
SCALE = 1000.0
# The digits CNN's first convolution, as the exporter names it: the outlier channels are its output.
FIRST_CONV = "node_Conv_19"


@pytest.fixture(scope="module")
def outlier_checkpoint(tmp_path_factory, digits_checkpoint) -> Path:
    weights = dict(load_file(digits_checkpoint))
    for channel in range(OUTLIER_CHANNELS):
        weights["features.1.weight"][channel] *= SCALE
        weights["features.1.bias"][channel] *= SCALE
        weights["features.3.weight"][:, channel] /= SCALE
    path = tmp_path_factory.mktemp("outlier") / "digits-outlier.safetensors"
    save_file(weights, path)
    return path


def outlier_spec(folder: Path, checkpoint: Path, int8: dict, **changes) -> Path:
    targets = [{"backend": "onnxruntime", "precision": "fp32"}, {"backend": "onnxruntime", "precision": "int8", "required": False, **int8}]
    return write_spec(folder, checkpoint, targets=targets, train=None, **changes)


def int8_outcome(summary):
    (outcome,) = [o for o in summary.targets if o.precision == "int8"]
    return outcome


def test_without_the_ladder_the_failed_int8_gate_names_its_most_sensitive_nodes(tmp_path, outlier_checkpoint):
    spec = outlier_spec(tmp_path / "spec", outlier_checkpoint, {"ladder": False})
    summary = run_flow(spec, tmp_path)
    outcome = int8_outcome(summary)
    assert outcome.status is TargetStatus.FAILED
    assert any("top-1" in f for f in outcome.failures)
    (note,) = [n for n in outcome.notes if n.startswith("most sensitive quantized nodes")]
    # The outlier channels leave the first convolution: its output's Q/DQ (int8 flows on through ReLU and pooling)
    # does the damage.
    assert note.split(": ", 1)[1].startswith(f"{FIRST_CONV} (Conv, +")
    ladder = outcome.record["precision_ladder"]
    assert ladder["steps"] == []
    first, second = ladder["sensitive_nodes"][:2]
    # The damage is done there, not inherited from upstream: its own Q/DQ adds most of the error.
    assert first["op_type"] == "Conv" and first["added_error"] > 0.5 > second["added_error"]
    assert summary.published  # the optional int8 target is left out; fp32 is published


def test_the_ladder_keeps_the_sensitive_convolution_out_and_publishes_int8(tmp_path, outlier_checkpoint):
    from trtforge.registry import open_registry

    spec = outlier_spec(tmp_path / "spec", outlier_checkpoint, {"ladder": True}, precision={"ladder": {"nodes_per_step": 1}})
    summary = run_flow(spec, tmp_path)
    outcome = int8_outcome(summary)
    assert outcome.status is TargetStatus.PASSED, outcome.reason
    ladder = outcome.record["precision_ladder"]
    steps = [s["excluded_nodes"] for s in ladder["steps"]]
    # Step 1 keeps the worst node out; each later step adds the worst node of the re-ranked graph, until one passes.
    assert steps[0] == [FIRST_CONV], steps
    assert all(later[: len(earlier)] == earlier and len(later) == len(earlier) + 1 for earlier, later in zip(steps, steps[1:])), steps
    assert [s["passed"] for s in ladder["steps"]] == [False] * (len(steps) - 1) + [True], ladder["steps"]
    assert ladder["steps"][-1]["task_metric"] == "accuracy"
    assert any(n.startswith(f"precision ladder passed at step {len(steps)}") for n in outcome.notes), outcome.notes
    assert [c.excluded_nodes for c in summary.conversions if c.precision == "int8"] == [[], *steps]

    manifest = open_registry(f"file://{tmp_path / 'registry'}").manifest(summary.model, summary.version)
    published = manifest.targets[outcome.tag].record["precision_ladder"]
    assert published["steps"][-1]["excluded_nodes"] == steps[-1]
    assert published["sensitive_nodes"][0]["name"] == FIRST_CONV
