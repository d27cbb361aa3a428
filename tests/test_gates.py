"""Gates by task on real engines: an embedding encoder (cosine, recall@k) and raw outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from trtforge.backends.base import get_backend
from trtforge.evalset import load_eval_set
from trtforge.spec import Precision, Task, parse_spec
from trtforge.stages.export import export_onnx
from trtforge.stages.gate import effective_thresholds, gate_target
from trtforge.stages.reference import load_reference, reference_outputs


class TinyEncoder(nn.Module):
    """A small text-like encoder: token embeddings, one transformer layer, mean pooling, L2-normalised."""

    def __init__(self, vocab: int = 100, width: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0)
        self.project = nn.Linear(width, 16)

    def forward(self, tokens):
        hidden = self.layer(self.embed(tokens))
        pooled = self.project(hidden.mean(dim=1))
        return pooled / pooled.norm(dim=1, keepdim=True)


def build_encoder() -> nn.Module:
    return TinyEncoder()


def encoder_spec(tmp_path, seed: int, task: str = "embedding", gate: dict | None = None):
    torch.manual_seed(seed)
    checkpoint = tmp_path / f"encoder-{seed}.safetensors"
    save_file(TinyEncoder().state_dict(), str(checkpoint))
    tokens = np.random.default_rng(0).integers(0, 100, size=(64, 12)).astype(np.int64)
    eval_path = tmp_path / "tokens.npz"
    np.savez(eval_path, tokens=tokens)
    data = {
        "name": "tiny-encoder",
        "model": "tests.test_gates:build_encoder",
        "checkpoint": str(checkpoint),
        "inputs": [{"name": "tokens", "dtype": "int64", "shape": ["batch", 12], "dynamic": {"batch": {"min": 1, "opt": 8, "max": 64}}}],
        "outputs": [{"name": "vector"}],
        "export": {"tolerance": 1e-4},
        "eval": {"data": str(eval_path), "task": task, "labels": None, "recall_k": 5},
        "targets": [{"backend": "onnxruntime", "precision": "fp32"}],
        "gate": {"min_recall_at_k": 0.95} if gate is None else gate,
    }
    return parse_spec(data), checkpoint


@pytest.fixture(scope="module")
def encoder_engine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("encoder")
    spec, checkpoint = encoder_spec(tmp, seed=1)
    exported = export_onnx(spec, checkpoint, tmp / "onnx")
    backend = get_backend("onnxruntime")
    built = backend.build(exported.onnx_path, spec.targets[0], spec, tmp / "engine")
    return tmp, spec, checkpoint, backend.load_runner(built.engine_path)


def test_embedding_engine_passes_on_cosine_and_recall(encoder_engine):
    tmp, spec, checkpoint, runner = encoder_engine
    reference = load_reference(reference_outputs(spec, checkpoint, tmp / "ref"))
    result = gate_target(spec, spec.targets[0], "ort-cpu-fp32", runner, load_eval_set(spec), reference)
    assert result.passed, result.failures
    assert result.task_metric == "cosine_mean"
    assert result.metrics["cosine_min"] > 0.9999
    assert result.metrics["recall_at_k"] == pytest.approx(1.0)


def test_embedding_engine_of_other_weights_fails_with_metric_and_threshold(encoder_engine):
    """The engine was built from seed 1; the reference comes from a differently initialised encoder."""
    tmp, _, _, runner = encoder_engine
    (tmp / "other").mkdir(exist_ok=True)
    other_spec, other_checkpoint = encoder_spec(tmp / "other", seed=2)
    reference = load_reference(reference_outputs(other_spec, other_checkpoint, tmp / "other-ref"))
    result = gate_target(other_spec, other_spec.targets[0], "ort-cpu-fp32", runner, load_eval_set(other_spec), reference)
    assert not result.passed
    assert any(f.startswith("mean cosine similarity to the FP32 reference") and "< threshold 0.9999" in f for f in result.failures)
    assert any(f.startswith("recall@k against the reference embeddings") and "< threshold 0.9500" in f for f in result.failures)


def test_raw_task_reports_per_output_errors(encoder_engine):
    tmp, spec, checkpoint, runner = encoder_engine
    raw = spec.model_copy(update={"eval": spec.eval.model_copy(update={"task": Task.RAW})})
    reference = load_reference(reference_outputs(raw, checkpoint, tmp / "ref"))
    result = gate_target(raw, raw.targets[0], "ort-cpu-fp32", runner, load_eval_set(raw), reference)
    assert result.passed, result.failures
    for metric in ("max_abs_error", "mean_abs_error", "relative_error", "cosine_mean"):
        assert f"vector.{metric}" in result.metrics
    assert result.metrics["vector.max_abs_error"] < 1e-4


def test_int8_embeddings_have_a_default_recall_floor(encoder_engine):
    """No spec threshold: the int8 default (recall@k >= 0.90) alone fails an encoder whose neighbours changed."""
    tmp, _, _, runner = encoder_engine
    (tmp / "int8").mkdir(exist_ok=True)
    spec, other_checkpoint = encoder_spec(tmp / "int8", seed=2, gate={})
    int8 = spec.targets[0].model_copy(update={"precision": Precision.INT8})
    assert effective_thresholds(spec, int8).min_recall_at_k == 0.90
    reference = load_reference(reference_outputs(spec, other_checkpoint, tmp / "int8-ref"))
    result = gate_target(spec, int8, "ort-cpu-int8", runner, load_eval_set(spec), reference)
    assert result.metrics["recall_at_k"] < 0.90
    assert any(f.startswith("recall@k against the reference embeddings") and "< threshold 0.9000" in f for f in result.failures)
