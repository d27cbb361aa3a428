"""Adding a backend is one module: this file defines one and runs a spec target on it through the real stages.

The backend runs the ONNX model with onnx's own reference evaluator (pure Python/numpy), a
runtime entirely separate from onnxruntime: its target model, build, runner and timer are all
defined here, and nothing in trtforge knows its name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from trtforge.backends.base import Availability, BuildOptions, BuiltEngine, get_backend, register_backend, target_tag, wall_clock_ms
from trtforge.errors import SpecError
from trtforge.hashing import sha256_file
from trtforge.safeio import atomic_copy, load_onnx_safely
from trtforge.spec import ModelSpec, Precision, Target, parse_spec
from trtforge.stages.build import build_and_gate
from trtforge.stages.reference import reference_outputs
from trtforge.summary import TargetStatus


class ReferenceEvaluatorTarget(Target):
    backend: Literal["onnx-reference"] = "onnx-reference"
    # An option only this backend has: the spec accepts it here and nowhere else.
    check_model: bool = True


class ReferenceEvaluatorRunner:
    def __init__(self, engine_path: Path):
        from onnx.reference import ReferenceEvaluator

        model = load_onnx_safely(engine_path)
        self.evaluator = ReferenceEvaluator(model)
        self.input_names = [i.name for i in model.graph.input]
        self.output_names = [o.name for o in model.graph.output]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.evaluator.run(None, {name: feeds[name] for name in self.input_names})
        return dict(zip(self.output_names, outputs))

    def time_ms(self, feeds: dict[str, np.ndarray], *, warmup: int, iterations: int) -> list[float]:
        return wall_clock_ms(lambda: self.run(feeds), warmup=warmup, iterations=iterations)

    def close(self) -> None:
        self.evaluator = None


class ReferenceEvaluatorBackend:
    name = "onnx-reference"
    tag_prefix = "onnxref"
    target_model = ReferenceEvaluatorTarget

    def runtime_version(self) -> str | None:
        import onnx

        return onnx.__version__

    def availability(self, target: Target) -> Availability:
        if target.precision is not Precision.FP32:
            return Availability(False, "the reference evaluator runs fp32 only")
        return Availability(True)

    def build(self, onnx_path: Path, target: Target, spec: ModelSpec, out_dir: Path, options: BuildOptions = BuildOptions()) -> BuiltEngine:
        engine = out_dir / "engine"
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_copy(onnx_path, engine)
        tag = target_tag(target, spec, self.runtime_version())
        return BuiltEngine(tag=tag, engine_path=engine, record={"tag": tag, "engine_sha256": sha256_file(engine)})

    def load_runner(self, engine_path: Path) -> ReferenceEvaluatorRunner:
        return ReferenceEvaluatorRunner(engine_path)

    def timing_cache_key(self, target: Target) -> None:
        return None


register_backend(ReferenceEvaluatorBackend())


def _spec_with(digits_spec: ModelSpec, target: dict) -> ModelSpec:
    data = digits_spec.model_dump(mode="json", exclude={"targets"})
    return parse_spec({**data, "targets": [target]}, source="extension.yaml", base_dir=digits_spec.source)


def test_a_backend_defined_in_one_file_builds_and_gates_a_spec_target(digits_spec, digits_checkpoint, digits_onnx, tmp_path):
    spec = _spec_with(digits_spec, {"backend": "onnx-reference", "precision": "fp32", "check_model": False})
    (target,) = spec.targets
    assert isinstance(target, ReferenceEvaluatorTarget) and target.check_model is False
    assert get_backend("onnx-reference").availability(target).available

    reference = reference_outputs(spec, digits_checkpoint, tmp_path / "reference")
    outcome = build_and_gate(spec, target, digits_onnx, reference, tmp_path / "build")
    assert outcome.status is TargetStatus.PASSED, outcome.reason
    assert outcome.tag.startswith("onnxref") and "-cpu-fp32-" in outcome.tag
    assert outcome.metrics["agreement"] >= 0.999 and outcome.metrics["latency_ms_median"] > 0


def test_options_of_one_backend_are_refused_on_another(digits_spec):
    with pytest.raises(SpecError, match=r"targets\[0\]\.check_model: is not an option of backend 'onnxruntime'"):
        _spec_with(digits_spec, {"backend": "onnxruntime", "check_model": True})
    with pytest.raises(SpecError, match=r"targets\[0\]\.arch: is not an option of backend 'onnx-reference'"):
        _spec_with(digits_spec, {"backend": "onnx-reference", "arch": "sm_90"})
