"""Which engine a pull picks: by tag, backend, precision, GPU architecture and local TensorRT version.

The records below have the shapes the backends write (the TensorRT build record with its
``compute_capability``, ``tensorrt_version`` and ``settings``; onnxruntime's with
``runtime_version``), published through a real directory registry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.test_registry import ENVIRONMENT, lineage, make_target
from trtforge.errors import NotFoundError, RegistryError
from trtforge.gpu import detect_gpus
from trtforge.registry import open_registry
from trtforge.registry.manifest import FileEntry, Manifest, TargetEntry
from trtforge.registry.pull import EngineFacts, choose_target, local_tensorrt_version, normalize_arch, runtime_fits

MODEL = "resnet50"


def trt_record(
    arch: str, precision: str, version: str = "10.3.0", hardware: str = "none", version_compatible: bool = False, exclude_lean: bool = False
) -> dict:
    return {
        "backend": "tensorrt",
        "precision": precision,
        "target_arch": arch,
        "tensorrt_version": version,
        "compute_capability": arch,
        "settings": {
            "hardware_compatibility_level": hardware,
            "version_compatible": version_compatible,
            "exclude_lean_runtime": exclude_lean,
        },
    }


def trt_tag(arch: str, precision: str, version: str = "10.3", suffix: str = "") -> str:
    return f"trt{version}-{arch.replace('_', '')}-{precision}-b1_8_32{suffix}"


ORT_CPU = ("ort1.32-cpu-fp32-b1_8_32", {"backend": "onnxruntime", "precision": "fp32", "device": "cpu", "runtime_version": "1.32.0"})
FLEET = [
    (trt_tag("sm_90", "fp16"), trt_record("sm_90", "fp16")),
    (trt_tag("sm_90", "int8"), trt_record("sm_90", "int8")),
    (trt_tag("sm_80", "fp16", suffix="-hc"), trt_record("sm_80", "fp16", hardware="ampere_plus")),
    (trt_tag("sm_86", "int8"), trt_record("sm_86", "int8")),
    ORT_CPU,
]


def manifest_of(targets: list[tuple[str, dict]]) -> Manifest:
    file = FileEntry(sha256=hashlib.sha256(b"engine").hexdigest(), size=6)
    return Manifest(
        model=MODEL,
        version=1,
        created_at=datetime.now(UTC),
        lineage=lineage(),
        environment=ENVIRONMENT,
        targets={tag: TargetEntry(tag=tag, record=record, files={"engine": file}) for tag, record in targets},
    )


@pytest.mark.parametrize(
    "request_, chosen",
    [
        ({"arch": "sm_90", "precision": "fp16"}, trt_tag("sm_90", "fp16")),
        ({"arch": "sm_90", "precision": "int8"}, trt_tag("sm_90", "int8")),
        # No engine built on sm_89: the one built hardware-compatible for Ampere and newer runs there.
        ({"arch": "sm_89", "precision": "fp16"}, trt_tag("sm_80", "fp16", suffix="-hc")),
        # An exact compute-capability match beats a hardware-compatible one.
        ({"arch": "sm_86"}, trt_tag("sm_86", "int8")),
        ({"backend": "onnxruntime"}, ORT_CPU[0]),
        ({"tag": trt_tag("sm_86", "int8")}, trt_tag("sm_86", "int8")),
    ],
)
def test_the_best_fitting_engine_is_chosen(request_, chosen):
    assert choose_target(manifest_of(FLEET), **request_).tag == chosen


@pytest.mark.parametrize(
    "request_, error, message",
    [
        ({"arch": "sm_75"}, NotFoundError, "no engine of resnet50 version 1 runs on sm_75"),
        ({"arch": "sm_90", "precision": "fp8"}, NotFoundError, "has no target with precision fp8"),
        ({"tag": "trt10.3-sm90-fp8-b1_8_32"}, NotFoundError, "has no target 'trt10.3-sm90-fp8-b1_8_32'; its targets: trt10.3-sm90-fp16"),
        (
            {"arch": "sm_90"},
            RegistryError,
            "has 2 targets that fit sm_90: trt10.3-sm90-fp16-b1_8_32 (tensorrt 10.3.0 sm_90 fp16), trt10.3-sm90-int8",
        ),
        ({}, RegistryError, "has 5 targets that fit: "),
    ],
)
def test_no_or_several_fitting_engines_are_explained(request_, error, message):
    with pytest.raises(error, match=re.escape(message)):
        choose_target(manifest_of(FLEET), **request_)


def test_tensorrt_version_mismatch_names_both_versions_and_what_fits():
    fleet = [
        (trt_tag("sm_90", "fp16"), trt_record("sm_90", "fp16", version="10.3.0")),
        (trt_tag("sm_90", "fp16", version="10.5"), trt_record("sm_90", "fp16", version="10.5.0")),
        (trt_tag("sm_90", "int8", suffix="-vc"), trt_record("sm_90", "int8", version="10.1.0", version_compatible=True)),
        (trt_tag("sm_80", "fp16"), trt_record("sm_80", "fp16", version="10.7.0")),
    ]
    manifest = manifest_of(fleet)
    assert choose_target(manifest, arch="sm_90", precision="fp16", local_tensorrt="10.5.0").tag == trt_tag("sm_90", "fp16", version="10.5")
    # A version-compatible engine runs on any later TensorRT of its major version, not on an older one.
    assert choose_target(manifest, arch="sm_90", precision="int8", local_tensorrt="10.8.0.1").tag == trt_tag("sm_90", "int8", suffix="-vc")
    with pytest.raises(RegistryError) as caught:
        choose_target(manifest, arch="sm_90", precision="fp16", local_tensorrt="10.8.0")
    message = str(caught.value)
    assert "this host has TensorRT 10.8.0, which cannot load" in message
    assert f"{trt_tag('sm_90', 'fp16')} (built with TensorRT 10.3.0)" in message
    assert f"{trt_tag('sm_90', 'fp16', version='10.5')} (built with TensorRT 10.5.0)" in message
    assert f"engines that would fit: {trt_tag('sm_90', 'int8', suffix='-vc')} (" in message
    with pytest.raises(RegistryError, match=re.escape("engines that would fit: none")):
        choose_target(manifest, arch="sm_90", precision="int8", local_tensorrt="10.0.0")


# (built with, version-compatible, exclude_lean_runtime, this host's runtime, loads?) after NVIDIA's support matrix.
COMPATIBILITY = [
    ("10.3.0", False, False, "10.3.0.26", True),
    ("10.3.0", False, False, "10.4.0", False),
    ("10.3.0", False, False, "10.2.0", False),
    ("11.4.0", False, False, "11.4.0.106", True),
    ("10.3.0", True, False, "10.8.0", True),
    ("10.8.0", True, False, "10.3.0", False),
    ("10.3.0", True, False, "11.4.0.106", True),
    ("10.16.0", True, False, "11.0.0", True),
    ("10.3.0", False, False, "11.4.0", False),
    ("11.4.0", True, False, "10.16.0", False),
    ("11.0.0", True, False, "11.4.0", True),
    ("8.6.1", True, False, "10.0.0", True),
    ("8.6.1", True, False, "11.4.0", False),
    ("8.6.1", False, False, "10.0.0", False),
    ("10.3.0", True, True, "10.3.0", True),
    ("10.3.0", True, True, "10.8.0", False),
    ("10.3.0", True, True, "11.4.0", False),
]


@pytest.mark.parametrize("built, version_compatible, exclude_lean, local, loads", COMPATIBILITY)
def test_engine_compatibility_follows_the_support_matrix(built, version_compatible, exclude_lean, local, loads):
    record = trt_record("sm_90", "fp16", version=built, version_compatible=version_compatible, exclude_lean=exclude_lean)
    assert runtime_fits(EngineFacts.of(record), local) is loads
    manifest = manifest_of([(trt_tag("sm_90", "fp16"), record)])
    if loads:
        assert choose_target(manifest, arch="sm_90", local_tensorrt=local).tag == trt_tag("sm_90", "fp16")
    else:
        with pytest.raises(RegistryError, match=rf"this host has TensorRT {re.escape(local)}, which cannot load"):
            choose_target(manifest, arch="sm_90", local_tensorrt=local)


def test_a_tensorrt_10_version_compatible_engine_is_pulled_onto_tensorrt_11():
    fleet = [
        (trt_tag("sm_90", "fp16"), trt_record("sm_90", "fp16", version="10.13.0")),
        (trt_tag("sm_90", "fp16", version="10.13", suffix="-vc"), trt_record("sm_90", "fp16", version="10.13.0", version_compatible=True)),
        (
            trt_tag("sm_90", "fp16", suffix="-vc-nolean"),
            trt_record("sm_90", "fp16", version="10.3.0", version_compatible=True, exclude_lean=True),
        ),
    ]
    chosen = choose_target(manifest_of(fleet), arch="sm_90", local_tensorrt="11.4.0.106")
    assert chosen.tag == trt_tag("sm_90", "fp16", version="10.13", suffix="-vc")
    assert "version-compatible, lean runtime excluded" in EngineFacts.of(fleet[2][1]).describe()


@pytest.mark.parametrize(
    "given, expected", [("sm_90", "sm_90"), ("sm90", "sm_90"), ("9.0", "sm_90"), ("8.6", "sm_86"), ("SM_120", "sm_120"), ("121", "sm_121")]
)
def test_architectures_are_normalised(given, expected):
    assert normalize_arch(given) == expected


def test_pull_by_architecture_through_the_registry(tmp_path):
    registry = open_registry(f"file://{tmp_path / 'registry'}")
    targets = [make_target(tmp_path / tag, f"plan for {tag}".encode(), tag=tag, record=record) for tag, record in FLEET]
    registry.publish(MODEL, targets, lineage=lineage(), environment=ENVIRONMENT)

    pulled = registry.pull(MODEL, tmp_path / "deploy", arch="8.9", precision="fp16", cache_dir=tmp_path / "cache")
    assert pulled.tag == trt_tag("sm_80", "fp16", suffix="-hc")
    assert Path(pulled.path).read_bytes() == f"plan for {pulled.tag}".encode()
    assert pulled.build["hardware_compatibility"] == "ampere_plus" and pulled.build["arch"] == "sm_80"
    if local_tensorrt_version() is None:
        assert pulled.notes == ["TensorRT is not installed here, so its version was not checked against 10.3.0"]


@pytest.mark.skipif(detect_gpus().available, reason="this host has an NVIDIA GPU; the no-GPU message cannot be checked here")
def test_arch_auto_without_a_gpu_says_so(tmp_path):
    registry = open_registry(f"file://{tmp_path / 'registry'}")
    registry.publish(MODEL, [make_target(tmp_path / "t", b"plan", *FLEET[0])], lineage=lineage(), environment=ENVIRONMENT)
    with pytest.raises(RegistryError, match=r"--arch auto: no NVIDIA GPU.*pass --arch sm_XX"):
        registry.pull(MODEL, tmp_path / "deploy", arch="auto", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "deploy").exists()


@pytest.mark.skipif(not detect_gpus().available, reason="no NVIDIA GPU visible to NVML on this host")
def test_arch_auto_picks_the_engine_built_for_this_gpu(tmp_path):
    local = detect_gpus().gpus[0].compute_capability
    other = "sm_75" if local != "sm_75" else "sm_86"
    fleet = [(trt_tag(local, "fp16"), trt_record(local, "fp16")), (trt_tag(other, "fp16"), trt_record(other, "fp16"))]
    registry = open_registry(f"file://{tmp_path / 'registry'}")
    targets = [make_target(tmp_path / tag, f"plan for {tag}".encode(), tag=tag, record=record) for tag, record in fleet]
    registry.publish(MODEL, targets, lineage=lineage(), environment=ENVIRONMENT)
    pulled = registry.pull(MODEL, tmp_path / "deploy", arch="auto", cache_dir=tmp_path / "cache")
    assert (pulled.tag, pulled.build["arch"]) == (trt_tag(local, "fp16"), local)
    assert Path(pulled.path).read_bytes() == f"plan for {trt_tag(local, 'fp16')}".encode()


# --- the local pull cache ------------------------------------------------------------------------


def cache_blob(cache: Path, data: bytes) -> Path:
    digest = hashlib.sha256(data).hexdigest()
    return cache / "blobs" / "sha256" / digest[:2] / digest


def published_plan(tmp_path: Path, plan: bytes):
    registry = open_registry(f"file://{tmp_path / 'registry'}")
    tag, record = ORT_CPU
    registry.publish(MODEL, [make_target(tmp_path / "target", plan, tag=tag, record=record)], lineage=lineage(), environment=ENVIRONMENT)
    return registry


def test_a_first_pull_writes_the_engine_once_and_later_folders_get_their_own_copies(tmp_path):
    plan = b"plan bytes " * 1000
    registry = published_plan(tmp_path, plan)
    cache = tmp_path / "cache"
    first = Path(registry.pull(MODEL, tmp_path / "deploy", cache_dir=cache).path)
    # The download went to disk once: the cache's blob is the placed file.
    assert os.path.samefile(first, cache_blob(cache, plan))

    second = registry.pull(MODEL, tmp_path / "second", cache_dir=cache)
    assert second.cached
    copy = Path(second.path)
    assert not os.path.samefile(copy, cache_blob(cache, plan))
    # Same size, other bytes: a size-only check cannot tell.
    copy.write_bytes(plan.replace(b"plan", b"PLAN"))
    assert cache_blob(cache, plan).read_bytes() == plan == first.read_bytes()

    again = registry.pull(MODEL, tmp_path / "second", cache_dir=cache)
    assert again.cached
    assert copy.read_bytes() == plan


def test_editing_the_first_pulled_engine_in_place_costs_a_download_never_a_bad_copy(tmp_path):
    plan = b"plan bytes " * 1000
    registry = published_plan(tmp_path, plan)
    cache = tmp_path / "cache"
    first = Path(registry.pull(MODEL, tmp_path / "deploy", cache_dir=cache).path)
    # In place, same size: the cache's blob (the same inode) is edited with it.
    with open(first, "r+b") as handle:
        handle.write(b"PLAN")

    elsewhere = registry.pull(MODEL, tmp_path / "elsewhere", cache_dir=cache)
    assert not next(f for f in elsewhere.files if f.name == "engine").cached
    assert Path(elsewhere.path).read_bytes() == plan
    assert cache_blob(cache, plan).read_bytes() == plan

    redeploy = registry.pull(MODEL, tmp_path / "deploy", cache_dir=cache)
    assert redeploy.cached
    assert first.read_bytes() == plan


SHARED_MEMORY = Path("/dev/shm")


def test_a_cache_on_another_filesystem_gets_a_read_only_copy(tmp_path):
    if not SHARED_MEMORY.is_dir() or SHARED_MEMORY.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no /dev/shm on a filesystem other than the test's temporary folder")
    plan = b"copied plan " * 1000
    registry = published_plan(tmp_path, plan)
    with tempfile.TemporaryDirectory(dir=SHARED_MEMORY) as elsewhere:
        cache = Path(elsewhere) / "cache"
        first = Path(registry.pull(MODEL, tmp_path / "deploy", cache_dir=cache).path)
        blob = cache_blob(cache, plan)
        # No hard link across filesystems: the cache holds its own copy, which the deployed file's edits leave alone.
        assert not os.path.samefile(first, blob) and blob.read_bytes() == plan
        assert not blob.stat().st_mode & 0o222
        first.write_bytes(plan.replace(b"plan", b"PLAN"))
        again = registry.pull(MODEL, tmp_path / "again", cache_dir=cache)
        assert again.cached and Path(again.path).read_bytes() == plan


def test_deleting_the_first_deploy_folder_keeps_the_cache(tmp_path):
    plan = b"kept plan " * 1000
    registry = published_plan(tmp_path, plan)
    cache = tmp_path / "cache"
    registry.pull(MODEL, tmp_path / "deploy", cache_dir=cache)
    shutil.rmtree(tmp_path / "deploy")

    again = registry.pull(MODEL, tmp_path / "deploy", cache_dir=cache)
    assert again.cached
    assert Path(again.path).read_bytes() == plan


def test_a_corrupted_cache_blob_is_detected_and_downloaded_again(tmp_path):
    plan = b"engine plan " * 1000
    registry = published_plan(tmp_path, plan)
    cache = tmp_path / "cache"
    registry.pull(MODEL, tmp_path / "deploy", cache_dir=cache)
    blob = cache_blob(cache, plan)
    stat = blob.stat()
    blob.chmod(0o644)
    blob.write_bytes(plan.replace(b"engine", b"ENGINE"))
    # Put the mtime back too: the changed ctime (and the hash) still give the edit away.
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    again = registry.pull(MODEL, tmp_path / "elsewhere", cache_dir=cache)
    assert not next(f for f in again.files if f.name == "engine").cached
    assert Path(again.path).read_bytes() == plan
    assert blob.read_bytes() == plan

    third = registry.pull(MODEL, tmp_path / "third", cache_dir=cache)
    assert third.cached and Path(third.path).read_bytes() == plan


def test_a_cache_without_verification_records_is_hashed_once_then_trusted(tmp_path):
    plan = b"older cache " * 1000
    registry = published_plan(tmp_path, plan)
    cache = tmp_path / "cache"
    registry.pull(MODEL, tmp_path / "deploy", cache_dir=cache)
    for record in (cache / "blobs").rglob("*.verified"):
        record.unlink()

    again = registry.pull(MODEL, tmp_path / "again", cache_dir=cache)
    assert again.cached and Path(again.path).read_bytes() == plan
    assert list((cache / "blobs").rglob("*.verified"))


def test_a_garbled_verification_record_means_hashing_not_trusting(tmp_path):
    plan = b"record test " * 1000
    registry = published_plan(tmp_path, plan)
    cache = tmp_path / "cache"
    registry.pull(MODEL, tmp_path / "deploy", cache_dir=cache)
    blob = cache_blob(cache, plan)
    blob.with_name(blob.name + ".verified").write_text("{not json")
    blob.chmod(0o644)
    blob.write_bytes(b"x" * len(plan))

    again = registry.pull(MODEL, tmp_path / "again", cache_dir=cache)
    assert Path(again.path).read_bytes() == plan


def test_a_redeploy_into_the_same_folder_rewrites_only_what_changed(tmp_path):
    plan = b"redeploy " * 1000
    registry = published_plan(tmp_path, plan)
    cache = tmp_path / "cache"
    first = registry.pull(MODEL, tmp_path / "deploy", cache_dir=cache)
    engine, build = Path(first.path), tmp_path / "deploy" / "build.json"
    engine_inode, build_text = engine.stat().st_ino, build.read_text()
    build.write_text("{}")

    registry.pull(MODEL, tmp_path / "deploy", cache_dir=cache)
    assert engine.stat().st_ino == engine_inode
    assert build.read_text() == build_text


def test_a_cache_blob_damaged_behind_a_matching_record_never_reaches_a_new_folder(tmp_path):
    plan = os.urandom(3 * 1024 * 1024)
    registry = published_plan(tmp_path, plan)
    cache = tmp_path / "cache"
    registry.pull(MODEL, tmp_path / "deploy", cache_dir=cache)
    blob = cache_blob(cache, plan)
    blob.chmod(0o644)
    with open(blob, "r+b") as handle:
        handle.seek(len(plan) // 2)
        handle.write(b"\0" * 4096)
    # As after a crash that lost the blob's data but kept its record: the record matches the damaged blob's stat.
    stat = blob.stat()
    record = blob.with_name(blob.name + ".verified")
    record.write_text(
        json.dumps(
            {"inode": stat.st_ino, "device": stat.st_dev, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}
        )
    )

    again = registry.pull(MODEL, tmp_path / "elsewhere", cache_dir=cache)
    assert Path(again.path).read_bytes() == plan
    assert not next(f for f in again.files if f.name == "engine").cached
    assert blob.read_bytes() == plan
    assert {path.name for path in (tmp_path / "elsewhere").iterdir()} == {"build.json", "engine"}
