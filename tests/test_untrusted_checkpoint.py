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
    with pytest.raises(CheckpointError, match=rf"checkpoint {not_weights} does not hold a state dict of tensors"):
        read_state_dict(not_weights)


def test_truncated_zip_checkpoint_is_refused_as_a_user_error(inside, weights):
    cut = inside / "weights.pt"
    torch.save(weights, cut)
    cut.write_bytes(cut.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=rf"checkpoint {cut} {REFUSED}"):
        read_state_dict(cut)


def test_plain_weights_in_a_zip_format_file_still_load(inside, weights, digits_spec):
    good = inside / "weights.pt"
    torch.save({"state_dict": weights}, good)
    model = load_model(digits_spec, good)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name])
