import pytest
import yaml

from tests.conftest import DIGITS_SPEC
from trtforge.errors import SpecError
from trtforge.spec import Precision, load_spec, parse_spec


def digits_data() -> dict:
    return yaml.safe_load(DIGITS_SPEC.read_text())


def test_digits_spec_loads_and_resolves_paths_against_its_folder():
    spec = load_spec(DIGITS_SPEC)
    assert spec.name == "digits-cnn"
    assert spec.eval.data == DIGITS_SPEC.parent / "eval.npz"
    assert spec.checkpoint.parent == DIGITS_SPEC.parent / "checkpoints"
    assert spec.inputs[0].shape_at("min") == (1, 1, 8, 8)
    assert spec.inputs[0].shape_at("max") == (128, 1, 8, 8)
    assert spec.targets[0].precision is Precision.FP32


def test_spec_hash_ignores_where_the_checkout_is(tmp_path):
    copy = tmp_path / "spec.yaml"
    copy.write_text(DIGITS_SPEC.read_text())
    assert load_spec(copy).sha256() == load_spec(DIGITS_SPEC).sha256()
    changed = digits_data()
    changed["export"]["opset"] = 17
    assert parse_spec(changed).sha256() != load_spec(DIGITS_SPEC).sha256()


def test_missing_spec_file_names_it(tmp_path):
    with pytest.raises(SpecError, match=r"spec file .*nope.yaml does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_invalid_yaml_is_reported(tmp_path):
    bad = tmp_path / "spec.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["inputs"][0]["dynamic"]["batch"].update(min=64), r"inputs\[0\]\.dynamic\.batch: min \(64\) must be <= opt \(32\)"),
        (lambda d: d["inputs"][0]["dynamic"]["batch"].update(max=8), r"inputs\[0\]\.dynamic\.batch: opt \(32\) must be <= max \(8\)"),
        (lambda d: d.update(name="../escape"), r"name: must be 1-100 characters"),
        (lambda d: d["inputs"][0]["dynamic"].pop("batch"), r"inputs\[0\]: dynamic dims \['batch'\] are in shape"),
        (lambda d: d["targets"][0].update(backend="tensorrt", device="gpu"), r"targets\[0\]\.arch: Field required"),
        (lambda d: d["targets"][3].update(arch="sm_91"), r"targets\[3\]\.arch: arch 'sm_91' is not one of sm_75"),
        (
            lambda d: d["targets"][0].update(backend="tensorrtx"),
            r"targets\[0\]: backend 'tensorrtx' is not known here; the backends are .*'onnxruntime'.*'tensorrt'",
        ),
        (
            lambda d: d["targets"][0].update(workspace_mb=5),
            r"targets\[0\]\.workspace_mb: is not an option of backend 'onnxruntime'; its options are device, gate, ladder, precision",
        ),
        (lambda d: d["targets"][0].update(precision="int4"), r"targets\[0\]\.precision: Input should be"),
        (lambda d: d.pop("eval"), r"eval: Field required"),
        (lambda d: d.update(surprise=1), r"surprise: Extra inputs are not permitted"),
    ],
)
def test_invalid_spec_names_the_field(mutate, expected):
    data = digits_data()
    mutate(data)
    with pytest.raises(SpecError, match=expected):
        parse_spec(data, source="digits.yaml")


def test_top_level_must_be_a_mapping():
    with pytest.raises(SpecError, match="expected a mapping"):
        parse_spec(["not", "a", "mapping"])


def test_tensorrt_target_gets_a_work_pool_per_arch():
    data = digits_data()
    data["targets"].append({"backend": "tensorrt", "device": "gpu", "arch": "sm_90", "precision": "fp16", "required": False})
    spec = parse_spec(data)
    assert spec.targets[-1].pool == "gpu-sm90"
    assert spec.targets[0].pool is None
