"""Triton model repositories from published versions, checked against Triton's own ModelConfig schema.

The version is published through a real directory registry: the digits CNN's onnxruntime
target built for real by its backend, beside TensorRT targets whose build records have the
shape the TensorRT backend writes (profiles included) and whose plans are placeholder bytes,
since TensorRT cannot run here. No Triton server runs here either: the repository's layout
and configuration are what is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from typer.testing import CliRunner

from tests.conftest import DIGITS_SPEC
from tests.test_registry import ENVIRONMENT, lineage
from tests.test_signing import write_key_pair
from trtforge.backends.base import get_backend
from trtforge.cli import app
from trtforge.errors import IntegrityError, TrtforgeError
from trtforge.registry import TargetArtifacts, TrustedKey, open_registry
from trtforge.registry.signing import SignatureError
from trtforge.triton import ConfigOptions, TritonConfigError, check_config, onnx_io, write_repository

MODEL = "digits-cnn"
PROFILE = {"input": {"min": [1, 1, 8, 8], "opt": [32, 1, 8, 8], "max": [128, 1, 8, 8]}}


def trt_target(folder: Path, arch: str, hardware: str = "none") -> TargetArtifacts:
    tag = f"trt10.3-{arch.replace('_', '')}-fp16-b1_32_128"
    record = {
        "backend": "tensorrt",
        "tag": tag,
        "model": MODEL,
        "precision": "fp16",
        "target_arch": arch,
        "tensorrt_version": "10.3.0",
        "compute_capability": arch,
        "settings": {"hardware_compatibility_level": hardware, "version_compatible": False, "profiles": [PROFILE]},
        "gate": {"metrics": {"accuracy": 0.97}},
    }
    folder.mkdir(parents=True)
    (folder / "engine").write_bytes(f"placeholder plan for {arch}".encode())
    (folder / "build.json").write_text(json.dumps(record))
    return TargetArtifacts(tag=tag, record=record, files={"engine": folder / "engine", "build.json": folder / "build.json"})


@pytest.fixture(scope="module")
def published(tmp_path_factory, digits_spec, digits_onnx):
    """A registry holding one version of the digits CNN: a real onnxruntime engine and plans for sm_80 (Ampere and newer), sm_86, sm_90."""
    work = tmp_path_factory.mktemp("triton-version")
    target = next(t for t in digits_spec.targets if t.backend == "onnxruntime" and t.precision.value == "fp32")
    built = get_backend("onnxruntime").build(digits_onnx, target, digits_spec, work / "ort")
    ort = TargetArtifacts(
        tag=built.tag,
        record={**built.record, "gate": {"metrics": {"accuracy": 0.98}}},
        files={"engine": built.engine_path, **built.extra_files},
    )
    trt = [
        trt_target(work / "sm80", "sm_80", hardware="ampere_plus"),
        trt_target(work / "sm86", "sm_86"),
        trt_target(work / "sm90", "sm_90"),
    ]
    uri = f"file://{work / 'registry'}"
    registry = open_registry(uri)
    registry.publish(MODEL, [ort, *trt], lineage={**lineage(), "spec_sha256": digits_spec.sha256()}, environment=ENVIRONMENT)
    return uri, registry, built.tag


def parsed(repository: Path):
    return text_format.Parse((repository / MODEL / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_one_repository_serves_a_mixed_gpu_fleet(published, tmp_path):
    uri, registry, _ = published
    repo = tmp_path / "repo"
    result = write_repository(
        registry.reader,
        MODEL,
        repo,
        all_archs=True,
        options=ConfigOptions(max_queue_delay_us=250, cuda_graphs=True),
        cache_dir=tmp_path / "cache",
    )
    config = parsed(repo)
    assert config.name == MODEL and config.platform == "tensorrt_plan"
    plans = {cc: name for cc, name in config.cc_model_filenames.items()}
    assert sorted(plans) == ["8.0", "8.6", "9.0"]
    for capability, name in plans.items():
        arch = "sm_" + capability.replace(".", "")
        assert (repo / MODEL / "1" / name).read_bytes() == f"placeholder plan for {arch}".encode()
    # The plan built to run on every Ampere-or-newer GPU is what a GPU missing from the map loads.
    assert config.default_model_filename == plans["8.0"]
    assert sorted(p.name for p in (repo / MODEL / "1").iterdir()) == sorted(plans.values())
    assert sorted(p.name for p in repo.iterdir()) == [MODEL] and sorted(p.name for p in (repo / MODEL).iterdir()) == ["1", "config.pbtxt"]

    # The batch dim's profile max; the rest of the dims as the ONNX graph has them.
    assert config.max_batch_size == 128
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [
        ("input", "TYPE_FP32", [1, 8, 8])
    ]
    assert [(o.name, model_config_pb2.DataType.Name(o.data_type), list(o.dims)) for o in config.output] == [("logits", "TYPE_FP32", [10])]
    assert list(config.dynamic_batching.preferred_batch_size) == [32]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert len(config.instance_group) == 1 and config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert config.optimization.cuda.graphs
    assert result.version == 1 and {p.capability for p in result.plans} == {"8.0", "8.6", "9.0"}
    manifest = registry.manifest(MODEL, 1)
    assert all(p.sha256 == manifest.targets[p.tag].files["engine"].sha256 for p in result.plans)


def test_architectures_asked_for_get_the_plan_that_runs_there(published, tmp_path):
    _, registry, _ = published
    write_repository(registry.reader, MODEL, tmp_path / "repo", archs=["sm_90", "8.9"], cache_dir=tmp_path / "cache")
    config = parsed(tmp_path / "repo")
    # No plan was built on sm_89: the hardware-compatible sm_80 plan runs there, as pull would choose.
    assert dict(config.cc_model_filenames) == {"9.0": "trt10.3-sm90-fp16-b1_32_128.plan", "8.9": "trt10.3-sm80-fp16-b1_32_128.plan"}
    assert config.default_model_filename == "trt10.3-sm80-fp16-b1_32_128.plan"
    assert not config.optimization.cuda.graphs


def test_onnxruntime_repository_takes_the_batch_range_from_the_spec(published, tmp_path):
    _, registry, ort_tag = published
    with pytest.raises(TritonConfigError, match="dynamic batch dim 'batch'.*pass --spec"):
        write_repository(registry.reader, MODEL, tmp_path / "nospec", backend="onnxruntime", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "nospec").exists()

    result = write_repository(
        registry.reader, MODEL, tmp_path / "repo", backend="onnxruntime", spec_path=DIGITS_SPEC, cache_dir=tmp_path / "cache"
    )
    config = parsed(tmp_path / "repo")
    assert (config.platform, config.default_model_filename, dict(config.cc_model_filenames)) == ("onnxruntime_onnx", "model.onnx", {})
    assert (config.max_batch_size, list(config.dynamic_batching.preferred_batch_size)) == (128, [32])
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    engine = tmp_path / "repo" / MODEL / "1" / "model.onnx"
    assert [t.name for t in onnx_io(engine, "engine").inputs] == ["input"]
    assert result.plans[0].tag == ort_tag and result.plans[0].capability is None
    with pytest.raises(TrtforgeError, match="--cuda-graphs applies to TensorRT plans only"):
        write_repository(
            registry.reader,
            MODEL,
            tmp_path / "graphs",
            backend="onnxruntime",
            spec_path=DIGITS_SPEC,
            options=ConfigOptions(cuda_graphs=True),
        )


def test_a_spec_the_version_was_not_built_from_is_refused(published, tmp_path):
    _, registry, _ = published
    other = tmp_path / "spec.yaml"
    other.write_text(DIGITS_SPEC.read_text().replace("min_accuracy: 0.95", "min_accuracy: 0.9"))
    (tmp_path / "digits_model.py").symlink_to(DIGITS_SPEC.parent / "digits_model.py")
    with pytest.raises(TritonConfigError, match="is not the spec digits-cnn version 1 was built from"):
        write_repository(registry.reader, MODEL, tmp_path / "repo", backend="onnxruntime", spec_path=other, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "repo").exists()


@pytest.fixture()
def generated(published, tmp_path):
    from trtforge.triton import BatchRange

    uri, registry, ort_tag = published
    repo = tmp_path / "repo"
    write_repository(registry.reader, MODEL, repo, all_archs=True, cache_dir=tmp_path / "cache")
    engine = registry.pull(MODEL, tmp_path / "ort", tag=ort_tag, cache_dir=tmp_path / "cache").path
    return repo / MODEL, (repo / MODEL / "config.pbtxt").read_text(), onnx_io(Path(engine), "the digits ONNX graph"), BatchRange(128, (32,))


def test_the_generated_config_passes_the_schema_and_the_consistency_checks(generated):
    model_dir, text, io, batch = generated
    check_config(text, model_dir, io, batch)


@pytest.mark.parametrize(
    "edit, message",
    [
        # dims that do not match the engine's graph
        (
            lambda t: t.replace("dims: 10\n", "dims: 12\n"),
            r"output 'logits' has dims \[12\], but the digits ONNX graph has \['batch', 10\]",
        ),
        (lambda t: t.replace("dims: 8\n", "dims: 16\n", 1), r"input 'input' has dims \[1, 16, 8\]"),
        # a compute capability without its plan
        (
            lambda t: t + 'cc_model_filenames {\n  key: "7.5"\n  value: "trt10.3-sm75-fp16-b1_32_128.plan"\n}\n',
            r"compute capability 7.5 maps to trt10.3-sm75-fp16-b1_32_128.plan, which is not in",
        ),
        (
            lambda t: t.replace("max_batch_size: 128", "max_batch_size: 256"),
            "max_batch_size is 256, but the digits ONNX graph serves batches up to 128",
        ),
        (lambda t: t.replace("TYPE_FP32", "TYPE_FP16", 1), "input 'input' is TYPE_FP16, but the digits ONNX graph has TYPE_FP32"),
        # what Triton's schema itself refuses
        (lambda t: t.replace("max_batch_size", "max_batch"), "does not follow Triton's model configuration schema: .*max_batch"),
        (lambda t: t.replace("KIND_GPU", "KIND_TPU"), "does not follow Triton's model configuration schema"),
    ],
)
def test_a_wrong_config_fails_with_a_clear_error(generated, edit, message):
    model_dir, text, io, batch = generated
    edited = edit(text)
    assert edited != text
    with pytest.raises(TritonConfigError, match=message):
        check_config(edited, model_dir, io, batch)


def test_a_failed_write_leaves_no_repository_folder(published, tmp_path):
    uri, registry, _ = published
    # Another copy of the registry whose sm_86 plan was changed after publishing: the verified pull refuses it.
    import shutil

    copy = tmp_path / "registry"
    shutil.copytree(uri.removeprefix("file://"), copy)
    (copy / MODEL / "versions" / "1" / "trt10.3-sm86-fp16-b1_32_128" / "engine").write_bytes(b"tampered plan")
    tampered = open_registry(f"file://{copy}")
    with pytest.raises(IntegrityError, match="is corrupted"):
        write_repository(tampered.reader, MODEL, tmp_path / "out" / "repo", all_archs=True, cache_dir=tmp_path / "fresh-cache")
    assert list((tmp_path / "out").iterdir()) == []

    # A version without a signature, where one is required: refused before anything is pulled.
    trust = TrustedKey(write_key_pair(tmp_path / "keys", "release").public)
    with pytest.raises(SignatureError, match="refusing to pull digits-cnn version 1"):
        write_repository(
            registry.reader,
            MODEL,
            tmp_path / "out" / "repo",
            all_archs=True,
            require_signature=True,
            trust=trust,
            cache_dir=tmp_path / "cache",
        )
    assert list((tmp_path / "out").iterdir()) == []

    # An existing repository is left as it is unless --replace is given.
    write_repository(registry.reader, MODEL, tmp_path / "out" / "repo", archs=["sm_90"], cache_dir=tmp_path / "cache")
    with pytest.raises(TrtforgeError, match="already exists: give a new folder, or pass --replace"):
        write_repository(registry.reader, MODEL, tmp_path / "out" / "repo", all_archs=True, cache_dir=tmp_path / "cache")
    assert list(parsed(tmp_path / "out" / "repo").cc_model_filenames) == ["9.0"]
    write_repository(registry.reader, MODEL, tmp_path / "out" / "repo", all_archs=True, replace=True, cache_dir=tmp_path / "cache")
    assert sorted(parsed(tmp_path / "out" / "repo").cc_model_filenames) == ["8.0", "8.6", "9.0"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["repo"]


def test_cli_writes_the_repository(published, tmp_path):
    uri, _, _ = published
    args = ["triton", MODEL, "--version", "1", "-o", str(tmp_path / "repo"), "--arch", "sm_80,sm_90", "--cuda-graphs"]
    result = CliRunner().invoke(
        app, [*args, "--max-queue-delay-us", "500", "--registry", uri, "--cache-dir", str(tmp_path / "c"), "--json"]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    body = json.loads(result.stdout)
    assert body["platform"] == "tensorrt_plan" and [p["capability"] for p in body["plans"]] == ["8.0", "9.0"]
    config = parsed(tmp_path / "repo")
    assert config.dynamic_batching.max_queue_delay_microseconds == 500 and config.optimization.cuda.graphs


def test_cli_errors_are_one_line_without_traceback(published, tmp_path):
    uri, _, _ = published
    for args, message in [
        (["triton", "resnet", "-o", str(tmp_path / "repo")], "error: no model 'resnet' in registry"),
        (["triton", MODEL, "-o", str(tmp_path / "repo"), "--arch", "sm_75"], "error: no engine of digits-cnn version 1 runs on sm_75"),
        (["triton", MODEL, "-o", str(tmp_path / "repo"), "--backend", "onnxruntime", "--cuda-graphs"], "error: --cuda-graphs applies"),
    ]:
        result = subprocess.run(
            [sys.executable, "-c", "from trtforge.cli import main; main()", *args, "--registry", uri, "--cache-dir", str(tmp_path / "c")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "repo").exists()
