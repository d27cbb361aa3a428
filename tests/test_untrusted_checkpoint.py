"""Hostile checkpoints: a pickle that would run code is refused, and provably did not run.

Each attack writes its checkpoint in ``tmp_path/inside``; the code it carries would create
``tmp_path/outside/pwned``. ``tests.containment.Outside`` proves afterwards that no file under
``tmp_path`` was added or changed, so the code never ran.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.containment import Outside
from trtforge.errors import CheckpointError
from trtforge.modelload import build_model, load_model, read_state_dict

REFUSED = "was refused: it is not a plain weights file"


class RunsCode:
    """Unpickling this runs a shell command: what a weights-only loader must never do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def inside(tmp_path) -> Path:
    folder = tmp_path / "inside"
    folder.mkdir()
    return folder


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "outside" / "pwned"


@pytest.fixture
def weights(digits_spec) -> dict[str, torch.Tensor]:
    """Freshly initialised weights of the digits model: what the loader reads is their shape, not their training."""
    return {name: tensor.clone() for name, tensor in build_model(digits_spec).state_dict().items()}


def test_code_nested_deep_in_a_zip_format_state_dict_is_refused(tmp_path, inside, marker, weights):
    evil = inside / "weights.pt"
    torch.save({**weights, "extra": {"history": [1, 2, {"hook": RunsCode(marker)}]}}, evil)
    assert zipfile.is_zipfile(evil)
    outside = Outside(tmp_path)
    with pytest.raises(CheckpointError, match=rf"checkpoint {evil} {REFUSED}"):
        read_state_dict(evil)
    outside.assert_untouched()


def test_code_in_a_legacy_non_zip_torch_file_is_refused(tmp_path, inside, marker, weights):
    evil = inside / "weights.pth"
    torch.save({**weights, "hook": RunsCode(marker)}, evil, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(evil)
    outside = Outside(tmp_path)
    with pytest.raises(CheckpointError, match=rf"checkpoint {evil} {REFUSED}"):
        read_state_dict(evil)
    outside.assert_untouched()


def test_code_inside_a_lightning_style_state_dict_wrapper_is_refused(tmp_path, inside, marker, weights):
    evil = inside / "model.ckpt"
    torch.save({"epoch": 3, "state_dict": {**weights, "hook": RunsCode(marker)}}, evil)
    outside = Outside(tmp_path)
    with pytest.raises(CheckpointError, match=REFUSED):
        read_state_dict(evil)
    outside.assert_untouched()


def test_environment_cannot_switch_the_weights_only_loader_off(tmp_path, inside, marker, monkeypatch):
    # torch honours this variable only where the caller left weights_only unset.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    evil = inside / "weights.pt"
    torch.save({"hook": RunsCode(marker)}, evil)
    outside = Outside(tmp_path)
    with pytest.raises(CheckpointError, match=REFUSED):
        read_state_dict(evil)
    outside.assert_untouched()


def test_plain_pickle_named_safetensors_is_refused(tmp_path, inside, marker):
    evil = inside / "weights.safetensors"
    evil.write_bytes(pickle.dumps({"hook": RunsCode(marker)}))
    outside = Outside(tmp_path)
    with pytest.raises(CheckpointError, match=rf"checkpoint {evil} is not a readable safetensors file"):
        read_state_dict(evil)
    outside.assert_untouched()


def test_refusing_pickles_outright_never_opens_the_file(tmp_path, inside, marker, digits_spec):
    evil = inside / "weights.pt"
    torch.save({"hook": RunsCode(marker)}, evil)
    spec = digits_spec.model_copy(update={"allow_pickle_checkpoints": False})
    outside = Outside(tmp_path)
    with pytest.raises(CheckpointError, match=rf"checkpoint {evil} is a pickle file and the spec sets allow_pickle_checkpoints: false"):
        load_model(spec, evil)
    outside.assert_untouched()


def test_weights_only_pickle_that_holds_no_tensors_is_refused(inside):
    not_weights = inside / "weights.pt"
    torch.save({"learning_rate": 0.1, "layers": [3, 4]}, not_weights)
    with pytest.raises(CheckpointError, match=rf"checkpoint {not_weights} does not hold a state dict of tensors") as caught:
        read_state_dict(not_weights)
    assert "'learning_rate' (float), 'layers' (list)" in str(caught.value)
    assert "safetensors.torch.save_file(model.state_dict()" in str(caught.value)


def test_truncated_zip_checkpoint_is_a_user_error_naming_the_reader_problem(inside, weights):
    cut = inside / "weights.pt"
    torch.save(weights, cut)
    cut.write_bytes(cut.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=rf"checkpoint {cut} is not a readable PyTorch file \(PytorchStreamReader failed"):
        read_state_dict(cut)


def test_the_refusal_explains_and_never_suggests_the_unsafe_loader(tmp_path, inside, marker, weights):
    evil = inside / "weights.pt"
    torch.save({**weights, "hook": RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(evil)
    message = str(caught.value)
    assert "weights_only" not in message and "trusted source" not in message
    assert "names the Python object posix.system" in message
    assert "unpickling it could run code" in message
    assert "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')" in message


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda w: {"epoch": 7, "model": w, "optimizer": {"state": {}, "param_groups": []}}, id="model"),
        pytest.param(lambda w: {"epoch": 7, "model_state_dict": w, "optimizer_state_dict": {}}, id="model_state_dict"),
        pytest.param(lambda w: {"state_dict": {f"module.{k}": v for k, v in w.items()}}, id="ddp-module-prefix"),
        pytest.param(lambda w: {"ema": {"module": w}, "epoch": 3}, id="ema-module"),
        pytest.param(lambda w: {"ema": w, "updates": 10}, id="ema"),
    ],
)
def test_trainer_checkpoints_are_unwrapped(inside, weights, digits_spec, wrap):
    path = inside / "trainer.pt"
    torch.save(wrap(weights), path)
    model = load_model(digits_spec, path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name])


def test_a_trainer_checkpoint_without_weights_names_what_it_found(inside, weights):
    path = inside / "trainer.pt"
    torch.save({"epoch": 7, "net": {"weights": list(range(3))}, "optimizer": {"state": {}}}, path)
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert "it is a dict with keys 'epoch' (int), 'net' (dict of 1 entries, 0 of them tensors), 'optimizer'" in message
    assert "state_dict, model_state_dict, model, ema" in message


def test_weights_under_an_unusual_key_are_pointed_at(inside, weights):
    path = inside / "trainer.pt"
    torch.save({"epoch": 7, "generator": weights}, path)
    with pytest.raises(CheckpointError, match="the weights look to be under 'generator'"):
        read_state_dict(path)


def test_a_checkpoint_of_another_architecture_is_summarised(inside, digits_spec):
    import torchvision

    path = inside / "resnet.safetensors"
    save_file(torchvision.models.resnet18(num_classes=10).state_dict(), str(path))
    with pytest.raises(CheckpointError) as caught:
        load_model(digits_spec, path)
    message = str(caught.value)
    assert len(message) < 1500, message
    assert "the checkpoint has 122 tensors, the model 18, 0 names in common" in message
    assert "unexpected keys (122): bn1.bias, bn1.num_batches_tracked," in message and "(117 more)" in message
    assert "missing keys (18): classifier.1.bias," in message
    assert "the checkpoint's keys look like a ResNet" in message


def test_num_classes_against_a_1000_class_checkpoint_names_the_parameter_and_model_kwargs(inside, digits_spec, tmp_path):
    import torchvision

    path = inside / "effnet.safetensors"
    save_file(torchvision.models.efficientnet_b0().state_dict(), str(path))
    spec = digits_spec.model_copy(update={"model": "torchvision.models:efficientnet_b0", "model_kwargs": {"num_classes": 10}})
    with pytest.raises(CheckpointError) as caught:
        load_model(spec, path)
    message = str(caught.value)
    assert "classifier.1.weight: checkpoint [1000, 1280], model [10, 1280]" in message
    assert "classifier.1.bias: checkpoint [1000], model [10]" in message
    assert "model_kwargs sets num_classes: 10, but the checkpoint's classifier.1.weight has 1000 outputs" in message
    assert "size mismatch" not in message and "Traceback" not in message


def test_plain_weights_in_a_zip_format_file_still_load(inside, weights, digits_spec):
    good = inside / "weights.pt"
    torch.save({"state_dict": weights}, good)
    model = load_model(digits_spec, good)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name])


def test_a_checkpoint_that_is_not_a_dict_says_what_it_holds(inside, weights):
    path = inside / "list.pt"
    torch.save(list(weights.values()), path)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} does not hold a state dict of tensors: it holds a list; convert it"):
        read_state_dict(path)
