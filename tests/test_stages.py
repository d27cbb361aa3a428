"""The foundation stages on real files: checkpoint, export, simplify, build, gate."""

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from trtforge.backends.base import get_backend
from trtforge.errors import CheckpointError, SpecError, StageError
from trtforge.evalset import load_eval_set
from trtforge.isolation import run_isolated
from trtforge.safeio import OnnxModelError
from trtforge.stages.checkpoint import ensure_checkpoint
from trtforge.stages.export import export_onnx
from trtforge.stages.gate import PreviousRelease, gate_target
from trtforge.stages.reference import load_reference, reference_outputs
from trtforge.stages.simplify import simplify_onnx


def with_checkpoint(spec, path: Path):
    return spec.model_copy(update={"checkpoint": path})


def test_missing_checkpoint_is_trained_with_the_spec_entry_point(digits_spec, tmp_path):
    spec = with_checkpoint(digits_spec, tmp_path / "ck.safetensors")
    result = ensure_checkpoint(spec)
    assert result.trained and result.path.is_file()
    assert result.train_metrics["train_accuracy"] > 0.95
    again = ensure_checkpoint(spec)
    assert not again.trained and again.sha256 == result.sha256


def test_missing_checkpoint_without_train_entry_fails(digits_spec, tmp_path):
    spec = with_checkpoint(digits_spec, tmp_path / "absent.safetensors").model_copy(update={"train": None})
    with pytest.raises(CheckpointError, match=r"absent.safetensors does not exist and the spec has no 'train'"):
        ensure_checkpoint(spec)


def test_checkpoint_override_must_exist(digits_spec, tmp_path):
    with pytest.raises(CheckpointError, match="from --checkpoint"):
        ensure_checkpoint(digits_spec, tmp_path / "nope.safetensors")


class _RunsCode:
    """Unpickling this calls os.system: the attack a weights-only loader must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_never_runs(digits_spec, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as handle:
        pickle.dump({"weights": _RunsCode(marker)}, handle)
    with pytest.raises(CheckpointError, match="was refused: it is not a plain weights file"):
        export_onnx(digits_spec, evil, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_pt_state_dict_loads_through_weights_only(digits_spec, digits_checkpoint, tmp_path):
    pt = tmp_path / "weights.pt"
    torch.save(load_file(str(digits_checkpoint)), pt)
    assert export_onnx(digits_spec, pt, tmp_path / "out").onnx_path.is_file()


def test_pickle_checkpoints_can_be_refused_outright(digits_spec, digits_checkpoint, tmp_path):
    pt = tmp_path / "weights.pt"
    torch.save(load_file(str(digits_checkpoint)), pt)
    spec = digits_spec.model_copy(update={"allow_pickle_checkpoints": False})
    with pytest.raises(CheckpointError, match="allow_pickle_checkpoints: false"):
        export_onnx(spec, pt, tmp_path / "out")


def test_checkpoint_with_wrong_keys_names_them(digits_spec, digits_checkpoint, tmp_path):
    state = load_file(str(digits_checkpoint))
    state["extra.weight"] = state.pop("classifier.3.weight")
    bad = tmp_path / "renamed.safetensors"
    save_file(state, str(bad))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): classifier.3.weight; unexpected keys \(1\): extra.weight"):
        export_onnx(digits_spec, bad, tmp_path / "out")


def test_num_classes_against_the_checkpoint_is_one_plain_line_from_the_child(digits_spec, digits_checkpoint, tmp_path):
    spec = digits_spec.model_copy(update={"model_kwargs": {"num_classes": 7}})
    with pytest.raises(CheckpointError) as caught:
        export_onnx(spec, digits_checkpoint, tmp_path / "out")
    message = str(caught.value)
    assert "model [7, " in message and "model_kwargs sets num_classes: 7" in message
    assert "\n" not in message and "Traceback" not in message


def test_factory_that_cannot_be_imported_is_a_spec_error(digits_spec, digits_checkpoint, tmp_path):
    spec = digits_spec.model_copy(update={"model": "no_such_module_xyz:build"})
    with pytest.raises(SpecError, match=r"model: cannot import 'no_such_module_xyz'"):
        export_onnx(spec, digits_checkpoint, tmp_path)
    spec = digits_spec.model_copy(update={"model": "digits_model.py:no_such_function"})
    with pytest.raises(SpecError, match=r"has no callable 'no_such_function'"):
        export_onnx(spec, digits_checkpoint, tmp_path)


def test_export_records_opset_nodes_and_diff_at_every_shape(digits_spec, digits_checkpoint, tmp_path):
    import onnx

    result = export_onnx(digits_spec, digits_checkpoint, tmp_path)
    model = onnx.load(str(result.onnx_path))
    assert result.opset == 18 and any(o.version == 18 for o in model.opset_import if o.domain in ("", "ai.onnx"))
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value, "batch must stay dynamic"
    assert set(result.max_abs_diff) == {"min", "opt", "max"}
    assert max(result.max_abs_diff.values()) < digits_spec.export.tolerance
    assert result.node_count == len(model.graph.node)


def test_export_over_tolerance_fails_and_leaves_nothing(digits_spec, digits_checkpoint, tmp_path):
    spec = digits_spec.model_copy(update={"export": digits_spec.export.model_copy(update={"tolerance": 1e-12, "rtol": 0.0})})
    with pytest.raises(StageError, match=r"export: ONNX output differs from PyTorch beyond export.tolerance 1e-12 \+ export.rtol 0"):
        export_onnx(spec, digits_checkpoint, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_simplify_keeps_dynamic_batch_and_agrees(digits_spec, digits_onnx):
    import onnx

    model = onnx.load(str(digits_onnx))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param


def test_simplify_failure_reports_onnxsim_message(digits_spec, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07\x12\x04not an onnx model")
    with pytest.raises(OnnxModelError, match=r"^simplify: ONNX model .*broken.onnx cannot be parsed \(DecodeError"):
        simplify_onnx(digits_spec, broken, tmp_path / "out")
    assert not (tmp_path / "out" / "model.sim.onnx").exists()
    assert not (tmp_path / "out" / "model.sim.onnx.partial").exists()


def test_native_crash_in_child_fails_only_the_stage():
    with pytest.raises(StageError, match=r"simplify: the child process crashed with signal SIGABRT"):
        run_isolated("simplify", os.abort)


def test_child_timeout_is_enforced():
    import time

    with pytest.raises(StageError, match="timed out after 1 s"):
        run_isolated("export", time.sleep, 30, timeout_s=1)


def read_environment(name: str) -> str | None:
    return os.environ.get(name)


def test_child_does_not_see_storage_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("TRTFORGE_VISIBLE", "yes")
    assert run_isolated("export", read_environment, "AWS_SECRET_ACCESS_KEY") is None
    assert run_isolated("export", read_environment, "TRTFORGE_VISIBLE") == "yes"


def test_eval_set_with_wrong_input_name_or_shape_fails(digits_spec, tmp_path):
    x = np.zeros((4, 1, 8, 8), np.float32)
    wrong_name = tmp_path / "wrong_name.npz"
    np.savez(wrong_name, image=x, labels=np.zeros(4))
    spec = digits_spec.model_copy(update={"eval": digits_spec.eval.model_copy(update={"data": wrong_name})})
    with pytest.raises(SpecError, match=r"has no array 'input' for input 'input'; it has \['image', 'labels'\]"):
        load_eval_set(spec)
    wrong_shape = tmp_path / "wrong_shape.npz"
    np.savez(wrong_shape, input=np.zeros((4, 8, 8), np.float32), labels=np.zeros(4))
    spec = digits_spec.model_copy(update={"eval": digits_spec.eval.model_copy(update={"data": wrong_shape})})
    with pytest.raises(SpecError, match=r"has shape \[4, 8, 8\], expected \['N', 1, 8, 8\]"):
        load_eval_set(spec)


@pytest.fixture(scope="module")
def digits_engine(digits_spec, digits_onnx, tmp_path_factory):
    backend = get_backend("onnxruntime")
    return backend, backend.build(digits_onnx, digits_spec.targets[0], digits_spec, tmp_path_factory.mktemp("engine"))


def test_onnxruntime_engine_passes_the_gate(digits_spec, digits_checkpoint, digits_engine, tmp_path):
    backend, built = digits_engine
    assert built.tag.startswith("ort1.") and built.tag.endswith("-cpu-fp32-b1_32_128")
    reference = load_reference(reference_outputs(digits_spec, digits_checkpoint, tmp_path))
    result = gate_target(
        digits_spec, digits_spec.targets[0], built.tag, backend.load_runner(built.engine_path), load_eval_set(digits_spec), reference
    )
    assert result.passed, result.failures
    assert result.metrics["accuracy"] > 0.95
    assert result.metrics["agreement"] >= 0.999
    assert result.metrics["latency_ms_p99"] >= result.metrics["latency_ms_median"] > 0
    assert any("first version" in note for note in result.notes), result.notes


def test_reference_outputs_are_cached(digits_spec, digits_checkpoint, tmp_path):
    first = reference_outputs(digits_spec, digits_checkpoint, tmp_path)
    second = reference_outputs(digits_spec, digits_checkpoint, tmp_path)
    assert not first.cached and second.cached and first.path == second.path


def test_degraded_checkpoint_fails_with_metric_threshold_and_reference(digits_spec, digits_checkpoint, digits_engine, tmp_path):
    """Weights perturbed after export: the engine no longer agrees with the reference."""
    state = load_file(str(digits_checkpoint))
    generator = torch.Generator().manual_seed(0)
    noisy = {
        k: v + 0.5 * v.std() * torch.randn(v.shape, generator=generator) if v.dtype.is_floating_point and v.ndim > 1 else v
        for k, v in state.items()
    }
    degraded = tmp_path / "degraded.safetensors"
    save_file(noisy, str(degraded))
    backend, built = digits_engine
    reference = load_reference(reference_outputs(digits_spec, degraded, tmp_path))
    result = gate_target(
        digits_spec, digits_spec.targets[0], built.tag, backend.load_runner(built.engine_path), load_eval_set(digits_spec), reference
    )
    assert not result.passed
    assert any(f.startswith("top-1 agreement with the FP32 reference") and "< threshold 0.9990" in f for f in result.failures)


def test_regression_against_previous_release_is_caught(digits_spec, digits_checkpoint, digits_engine, tmp_path):
    backend, built = digits_engine
    reference = load_reference(reference_outputs(digits_spec, digits_checkpoint, tmp_path))
    previous = PreviousRelease(version=3, metrics={"accuracy": 1.0})
    result = gate_target(
        digits_spec,
        digits_spec.targets[0],
        built.tag,
        backend.load_runner(built.engine_path),
        load_eval_set(digits_spec),
        reference,
        previous,
    )
    assert not result.passed
    assert result.metrics["agreement"] == 1.0, "the FP32 comparison itself passes"
    assert any("regressed from 1.0000 in version 3" in f for f in result.failures)


class _NaNRunner:
    input_names, output_names = ["input"], ["logits"]

    def run(self, feeds):
        out = np.zeros((len(feeds["input"]), 10), np.float32)
        out[0, 0] = np.nan
        return {"logits": out}

    def time_ms(self, feeds, *, warmup, iterations):
        times = []
        for _ in range(warmup + iterations):
            started = time.perf_counter()
            self.run(feeds)
            times.append((time.perf_counter() - started) * 1000)
        return times[warmup:]

    def close(self):
        pass


def test_non_finite_outputs_fail_the_gate(digits_spec, digits_checkpoint, tmp_path):
    reference = load_reference(reference_outputs(digits_spec, digits_checkpoint, tmp_path))
    result = gate_target(digits_spec, digits_spec.targets[0], "t", _NaNRunner(), load_eval_set(digits_spec), reference)
    assert not result.passed
    assert "non-finite" in result.failures[0]


def write_model_file(folder: Path, name: str, body: str) -> str:
    """A model factory in its own file, as a user's spec would name it."""
    path = folder / f"{name}.py"
    path.write_text("import collections\nimport torch\nfrom torch import nn\n\n" + body)
    return f"{path}:build"


DICT_MODEL = """
class Segmenter(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(1, 3, 1)
        self.aux = nn.Conv2d(1, 2, 1)

    def forward(self, x):
        return collections.OrderedDict(out=self.head(x), aux=self.aux(x))


def build():
    return Segmenter()
"""


def test_dict_outputs_are_exported_by_the_spec_output_names(digits_spec, tmp_path):
    import onnx

    from trtforge.modelload import build_model
    from trtforge.spec import OutputSpec

    spec = digits_spec.model_copy(
        update={"model": write_model_file(tmp_path, "dict_segmenter", DICT_MODEL), "outputs": [OutputSpec(name="out")]}
    )
    checkpoint = tmp_path / "segmenter.safetensors"
    save_file(build_model(spec).state_dict(), str(checkpoint))
    result = export_onnx(spec, checkpoint, tmp_path / "out")
    assert [o.name for o in onnx.load(str(result.onnx_path)).graph.output] == ["out"]

    unnamed = spec.model_copy(update={"outputs": [OutputSpec(name="logits")]})
    with pytest.raises(StageError, match=r"returns a dict with keys \['out', 'aux'\], and the spec's outputs \['logits'\] are not"):
        export_onnx(unnamed, checkpoint, tmp_path / "again")


DATA_DEPENDENT_MODEL = """
class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        y = self.fc(x.flatten(1))
        if y.sum() > 0:
            return y
        return -y


def build():
    return Branchy()
"""


def test_a_failed_torch_onnx_export_reports_its_root_cause_plainly(digits_spec, tmp_path):
    from trtforge.modelload import build_model

    spec = digits_spec.model_copy(update={"model": write_model_file(tmp_path, "branchy", DATA_DEPENDENT_MODEL)})
    checkpoint = tmp_path / "branchy.safetensors"
    save_file(build_model(spec).state_dict(), str(checkpoint))
    with pytest.raises(StageError) as caught:
        export_onnx(spec, checkpoint, tmp_path / "out")
    message = str(caught.value)
    assert message.startswith("export: torch.onnx.export of ")
    assert "\x1b[" not in message
    assert not message.rstrip().endswith("Next steps:")
    assert "data-dependent" in message.lower() or "data dependent" in message.lower(), message


def test_export_tolerance_is_relative_to_the_output_magnitude(digits_spec, digits_checkpoint, tmp_path):
    state = load_file(str(digits_checkpoint))
    # Logits in the ten-thousands: float32 rounding alone moves them by more than 1e-4.
    state["classifier.3.weight"] = state["classifier.3.weight"] * 1e4
    state["classifier.3.bias"] = state["classifier.3.bias"] * 1e4
    large = tmp_path / "large-logits.safetensors"
    save_file(state, str(large))

    result = export_onnx(digits_spec, large, tmp_path / "out")
    assert max(result.max_abs_diff.values()) > digits_spec.export.tolerance

    absolute = digits_spec.model_copy(update={"export": digits_spec.export.model_copy(update={"rtol": 0.0})})
    with pytest.raises(StageError) as caught:
        export_onnx(absolute, large, tmp_path / "absolute")
    message = str(caught.value)
    assert "beyond export.tolerance 0.0001 + export.rtol 0 x |PyTorch|" in message
    assert "output 'logits' at the " in message and ", element (" in message
    assert "relative " in message and "the output's values reach " in message
    assert "non-deterministic" not in message


TWO_OUTPUT_MODEL = """
class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        y = self.fc(x.flatten(1))
        return y, y.softmax(1)


def build():
    return Twice()
"""

FAILING_MODEL = """
class WrongWidth(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def build():
    return WrongWidth()
"""


@pytest.mark.parametrize(
    "name, body, message",
    [
        ("twice", TWO_OUTPUT_MODEL, r"returns 2 outputs and the spec names 1 \(\['logits'\]\): list one name per output"),
        ("wrong_width", FAILING_MODEL, r"failed on the spec's inputs at the opt shape: RuntimeError: mat1 and mat2 shapes cannot"),
    ],
)
def test_outputs_that_do_not_fit_the_spec_are_named_before_export(digits_spec, tmp_path, name, body, message):
    from trtforge.modelload import build_model

    spec = digits_spec.model_copy(update={"model": write_model_file(tmp_path, name, body)})
    checkpoint = tmp_path / f"{name}.safetensors"
    save_file(build_model(spec).state_dict(), str(checkpoint))
    with pytest.raises(StageError, match=message):
        export_onnx(spec, checkpoint, tmp_path / "out")
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_a_dynamic_dim_the_graph_fixed_is_named_with_its_size(digits_spec, digits_onnx):
    import onnx

    from trtforge.stages.export import frozen_dims

    model = onnx.load(digits_onnx)
    assert frozen_dims(digits_spec, model) == []
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 32
    assert frozen_dims(digits_spec, model) == ["input input dim 0 (batch) is 32"]


def test_an_integer_inputs_value_range_is_what_the_export_check_feeds_it():
    from trtforge.numeric import random_inputs
    from trtforge.spec import InputSpec

    token_types = InputSpec(name="token_type_ids", dtype="int64", shape=[2, 64], value_range=(0, 1))
    values = random_inputs([token_types], "opt", seed=0)["token_type_ids"]
    assert set(np.unique(values)) == {0, 1}
    with pytest.raises(ValueError, match="value_range applies to integer inputs"):
        InputSpec(name="pixels", dtype="float32", shape=[1, 3], value_range=(0, 1))
