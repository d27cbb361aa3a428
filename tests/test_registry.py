"""The engine registry end to end, on the directory store and on a real SeaweedFS server.

Races and crashes use real processes: publishers started at the same instant, alias moves
racing each other, a publisher killed with SIGKILL in the middle of an upload.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import signal
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.forking import run_then_exit
from tests.s3_server import TEST_BUCKET, running_seaweedfs
from tests.waiting import wait_until
from trtforge.errors import IntegrityError, NotFoundError, RegistryError, TrtforgeError
from trtforge.registry import Maintenance, Publisher, RegistryReader, TargetArtifacts, open_registry, open_registry_store
from trtforge.registry.manifest import read_manifest
from trtforge.registry.storage import MiB, RegistryUnreachable, TransferSettings

MODEL = "digits-cnn"
TAG = "ort1.32-cpu-fp32-b1_32_128"
ENVIRONMENT = {"python": "3.11.7", "onnxruntime": "1.32.0"}


def lineage(checkpoint: str = "c", spec: str = "s") -> dict[str, str]:
    return {
        "checkpoint_sha256": hashlib.sha256(checkpoint.encode()).hexdigest(),
        "spec_sha256": hashlib.sha256(spec.encode()).hexdigest(),
        "onnx_sha256": hashlib.sha256(b"onnx").hexdigest(),
        "calibration_sha256": None,
        "code_version": "0.1.0",
        "inputs_sha256": hashlib.sha256(f"{checkpoint}|{spec}".encode()).hexdigest(),
    }


def make_target(folder: Path, engine: bytes, tag: str = TAG, record: dict | None = None) -> TargetArtifacts:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "engine").write_bytes(engine)
    record = record or {"backend": "onnxruntime", "precision": "fp32", "device": "cpu", "runtime_version": "1.32.0"}
    record = {**record, "gate": {"metrics": {"accuracy": 0.97, "agreement": 0.99}}}
    (folder / "build.json").write_text(json.dumps(record))
    return TargetArtifacts(tag=tag, record=record, files={"engine": folder / "engine", "build.json": folder / "build.json"})


def publish_one(registry, folder: Path, engine: bytes = b"engine v1", checkpoint: str = "c", **kwargs):
    return registry.publish(MODEL, [make_target(folder, engine)], lineage=lineage(checkpoint), environment=ENVIRONMENT, **kwargs)


# --- round trips ---------------------------------------------------------------------------------


def test_publish_and_pull_round_trip(registry_uri, tmp_path):
    registry = open_registry(registry_uri)
    engine = os.urandom(300_000)
    manifest = publish_one(registry, tmp_path / "build", engine)

    assert manifest.version == 1 and registry.versions(MODEL) == [1]
    assert registry.aliases(MODEL) == {"latest": 1}
    stored = registry.manifest(MODEL, 1)
    assert stored == manifest
    assert stored.targets[TAG].files["engine"].sha256 == hashlib.sha256(engine).hexdigest()
    assert stored.lineage.checkpoint_sha256 == lineage()["checkpoint_sha256"]

    pulled = registry.pull(MODEL, tmp_path / "deploy", cache_dir=tmp_path / "cache")
    assert (pulled.version, pulled.tag, pulled.cached) == (1, TAG, False)
    assert Path(pulled.path).read_bytes() == engine
    assert json.loads((tmp_path / "deploy" / "build.json").read_text())["backend"] == "onnxruntime"
    assert pulled.build["gate"]["metrics"]["accuracy"] == 0.97

    again = registry.pull(MODEL, tmp_path / "deploy", cache_dir=tmp_path / "cache")
    assert again.cached and Path(again.path).read_bytes() == engine


class ReadOnlyStore:
    """A store as a deployment with read-only credentials sees it: every write is refused."""

    WRITES = ("put_if_absent", "put_if_match", "put", "delete", "upload_file", "abort_upload", "check_conditional_writes")

    def __init__(self, store):
        self._store = store
        self.uri = store.uri

    def __getattr__(self, name):
        if name in self.WRITES:
            raise AssertionError(f"{name} called on a read-only store")
        return getattr(self._store, name)


def test_each_role_works_alone_and_reading_never_writes(registry_uri, tmp_path):
    store = open_registry_store(registry_uri)
    publisher = Publisher(store)
    manifest = publisher.publish(MODEL, [make_target(tmp_path / "build", b"engine v1")], lineage=lineage("first"), environment=ENVIRONMENT)
    publisher.promote(MODEL, 1, "prod")
    publisher.put_timing_cache("trt11.4-sm90", b"cache")

    reader = RegistryReader(ReadOnlyStore(store))
    assert reader.models() == [MODEL]
    assert (reader.versions(MODEL), reader.aliases(MODEL), reader.resolve(MODEL, alias="prod")) == ([1], {"latest": 1, "prod": 1}, 1)
    assert reader.manifest(MODEL, 1) == manifest
    assert reader.find_by_lineage(MODEL, lineage("first")["inputs_sha256"]) == 1
    assert reader.alias_history(MODEL, "prod").version == 1
    assert reader.describe(MODEL).versions[0].version == 1
    assert reader.get_timing_cache("trt11.4-sm90") == b"cache"
    pulled = reader.pull(MODEL, tmp_path / "deploy", alias="prod", cache_dir=tmp_path / "cache")
    assert Path(pulled.path).read_bytes() == b"engine v1"

    assert Maintenance(ReadOnlyStore(store)).verify(MODEL, 1).verified
    assert open_registry(registry_uri).versions(MODEL) == [1]


def test_versions_aliases_and_lineage(registry_uri, tmp_path):
    registry = open_registry(registry_uri)
    publish_one(registry, tmp_path / "one", b"engine 1", checkpoint="first")
    publish_one(registry, tmp_path / "two", b"engine 2", checkpoint="second", aliases=["latest", "staging"])

    assert registry.versions(MODEL) == [1, 2]
    assert registry.resolve(MODEL) == 2
    assert registry.find_by_lineage(MODEL, lineage("first")["inputs_sha256"]) == 1
    assert registry.find_by_lineage(MODEL, lineage("second")["inputs_sha256"]) == 2
    assert registry.find_by_lineage(MODEL, lineage("third")["inputs_sha256"]) is None

    registry.promote(MODEL, 1, "prod")
    assert registry.aliases(MODEL) == {"latest": 2, "prod": 1, "staging": 2}
    assert registry.resolve(MODEL, alias="prod") == 1
    pulled = registry.pull(MODEL, tmp_path / "deploy", alias="prod", cache_dir=tmp_path / "cache")
    assert Path(pulled.path).read_bytes() == b"engine 1"

    # Rolling back and forward is a promote; the alias keeps where it pointed before.
    registry.promote(MODEL, 2, "prod")
    history = registry.alias_history(MODEL, "prod")
    assert history.version == 2 and [move.version for move in history.history] == [1]

    listing = registry.describe(MODEL)
    assert [(v.version, v.aliases) for v in listing.versions] == [(1, []), (2, ["latest", "prod", "staging"])]
    assert listing.versions[0].targets[0].gate["metrics"]["accuracy"] == 0.97


def test_missing_model_version_and_alias_are_named(registry_uri, tmp_path):
    registry = open_registry(registry_uri)
    with pytest.raises(NotFoundError, match=f"no model '{MODEL}' in registry .*holds no models yet"):
        registry.resolve(MODEL)
    publish_one(registry, tmp_path / "one")
    with pytest.raises(NotFoundError, match="no model 'resnet' in registry .*models here: digits-cnn"):
        registry.pull("resnet", tmp_path / "deploy")
    with pytest.raises(NotFoundError, match=f"{MODEL} has no version 5 .*its versions: 1"):
        registry.manifest(MODEL, 5)
    with pytest.raises(NotFoundError, match=f"{MODEL} has no alias 'prod' .*its aliases: latest"):
        registry.resolve(MODEL, alias="prod")
    with pytest.raises(NotFoundError, match="has no version 9"):
        registry.promote(MODEL, 9, "prod")


@pytest.mark.parametrize(
    "call, problem",
    [
        (lambda r, t: r.publish("../evil", [make_target(t, b"x")], lineage={}, environment={}), "invalid model name '../evil'"),
        (lambda r, t: r.publish("a/b", [make_target(t, b"x")], lineage={}, environment={}), "invalid model name 'a/b'"),
        (lambda r, t: r.publish(MODEL, [make_target(t, b"x", tag="x/../../y")], lineage={}, environment={}), "invalid target tag"),
        (lambda r, t: r.publish(MODEL, [make_target(t, b"x")], lineage={}, environment={}, aliases=["../x"]), "invalid alias"),
        (
            lambda r, t: r.publish(
                MODEL, [TargetArtifacts(TAG, {}, {"../engine": make_target(t, b"x").files["engine"]})], lineage={}, environment={}
            ),
            "invalid file name '../engine'",
        ),
        (lambda r, t: r.publish(MODEL, [TargetArtifacts(TAG, {}, {"engine": t / "absent"})], lineage={}, environment={}), "does not exist"),
        (lambda r, t: r.publish(MODEL, [], lineage={}, environment={}), "no target passed its gate"),
        (lambda r, t: r.publish(MODEL, [make_target(t, b"x")], lineage={}, environment={"when": object()}), "cannot be stored as JSON"),
        (lambda r, t: r.pull(MODEL, t / "deploy", version=0), "invalid version 0"),
        (lambda r, t: r.pull(MODEL, t / "deploy", alias=".."), "invalid alias"),
        (lambda r, t: r.pull(MODEL, t / "deploy", arch="volta"), "invalid GPU architecture"),
        (lambda r, t: r.put_timing_cache("../trt10-sm90", b"x"), "invalid timing-cache key"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(registry_uri, tmp_path, call, problem):
    registry = open_registry(registry_uri)
    publish_one(registry, tmp_path / "published")
    before = [info.key for info in registry.store.list("")]
    with pytest.raises(RegistryError, match=re.escape(problem)):
        call(registry, tmp_path)
    assert [info.key for info in registry.store.list("")] == before


def test_timing_caches_are_shared_blobs(registry_uri):
    registry = open_registry(registry_uri)
    assert registry.get_timing_cache("trt10.3-sm90") is None
    registry.put_timing_cache("trt10.3-sm90", b"cache one")
    registry.put_timing_cache("trt10.3-sm90", b"cache two")
    assert registry.get_timing_cache("trt10.3-sm90") == b"cache two"
    assert registry.models() == []


def test_multipart_engine_round_trips_through_publish_and_pull(registry_uri, tmp_path):
    registry = open_registry(registry_uri, transfer=TransferSettings(part_size=5 * MiB, max_concurrency=4))
    engine = os.urandom(20 * MiB)
    manifest = publish_one(registry, tmp_path / "build", engine)
    assert manifest.targets[TAG].files["engine"].size == 20 * MiB
    pulled = registry.pull(MODEL, tmp_path / "deploy", cache_dir=tmp_path / "cache")
    assert hashlib.sha256(Path(pulled.path).read_bytes()).digest() == hashlib.sha256(engine).digest()


# --- integrity -----------------------------------------------------------------------------------


def corrupt(registry_uri: str, key: str, data: bytes, request) -> None:
    """Change an object's bytes behind the registry's back, as a failing disk or a hand edit would."""
    if registry_uri.startswith("file://"):
        path = Path(registry_uri.removeprefix("file://"), key)
        path.chmod(0o644)
        path.write_bytes(data)
    else:
        server = request.getfixturevalue("seaweedfs")
        prefix = registry_uri.removeprefix(f"s3://{TEST_BUCKET}/")
        server.client().put_object(Bucket=TEST_BUCKET, Key=f"{prefix}/{key}", Body=data)


def test_corrupted_object_fails_the_pull_naming_the_file(registry_uri, tmp_path, request):
    registry = open_registry(registry_uri)
    publish_one(registry, tmp_path / "build", b"the real engine")
    key = f"{MODEL}/versions/1/{TAG}/engine"
    corrupt(registry_uri, key, b"a forged engine", request)

    with pytest.raises(IntegrityError, match=f"{key} is corrupted: .*SHA-256") as caught:
        registry.pull(MODEL, tmp_path / "deploy", cache_dir=tmp_path / "cache")
    assert registry_uri in str(caught.value)
    assert not (tmp_path / "deploy").exists()
    assert not any(path.is_file() for path in (tmp_path / "cache").rglob("*"))


def test_tampered_manifest_is_refused(registry_uri, tmp_path, request):
    registry = open_registry(registry_uri)
    manifest = publish_one(registry, tmp_path / "build")
    forged = manifest.model_dump(mode="json")
    forged["targets"][TAG]["files"]["../../../etc/cron.d/x"] = forged["targets"][TAG]["files"]["engine"]
    corrupt(registry_uri, f"{MODEL}/versions/1/manifest.json", json.dumps(forged).encode(), request)
    with pytest.raises(IntegrityError, match="manifest.json is not a valid manifest: .*invalid file name"):
        registry.pull(MODEL, tmp_path / "deploy", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "deploy").exists()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    document=json_values
    | st.fixed_dictionaries(
        {"model": st.sampled_from([MODEL, "../x"]), "version": st.integers(-2, 3), "created_at": st.text(max_size=30)},
        optional={"targets": json_values, "lineage": json_values, "environment": json_values, "format": json_values},
    )
)
def test_manifest_reader_only_ever_raises_the_user_error(document):
    try:
        manifest = read_manifest(json.dumps(document).encode(), "registry/manifest.json", MODEL, 1)
    except TrtforgeError as err:
        assert "registry/manifest.json" in str(err)
    else:
        assert manifest.model == MODEL and manifest.version == 1


@given(raw=st.binary(max_size=200))
def test_manifest_reader_refuses_arbitrary_bytes(raw):
    with pytest.raises(IntegrityError, match="registry/manifest.json"):
        read_manifest(raw, "registry/manifest.json", MODEL, 1)


# --- races and crashes ---------------------------------------------------------------------------


def _publish_at_once(uri: str, folder: str, engine: bytes, barrier, results) -> None:
    registry = open_registry(uri)
    target = make_target(Path(folder), engine)
    barrier.wait()
    manifest = registry.publish(MODEL, [target], lineage=lineage(folder), environment=ENVIRONMENT)
    results.put((engine, manifest.version))


def _promote_at_once(uri: str, version: int, barrier, results) -> None:
    registry = open_registry(uri)
    barrier.wait()
    registry.promote(MODEL, version, "prod")
    results.put(version)


def _run_children(target, argument_lists, timeout: float = 60) -> list:
    # Forked children start in milliseconds; each opens its own registry (and S3 client) after the fork.
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(len(argument_lists))
    results = context.Queue()
    children = [context.Process(target=run_then_exit, args=(target, *arguments, barrier, results)) for arguments in argument_lists]
    for child in children:
        child.start()
    collected = [results.get(timeout=timeout) for _ in children]
    for child in children:
        child.join(timeout)
        assert child.exitcode == 0
    return collected


def test_concurrent_publishers_get_distinct_complete_versions(registry_uri, tmp_path):
    engines = [f"engine from publisher {i}".encode() * 1000 for i in range(3)]
    results = _run_children(_publish_at_once, [(registry_uri, str(tmp_path / f"p{i}"), engines[i]) for i in range(3)])

    registry = open_registry(registry_uri)
    assert sorted(version for _, version in results) == [1, 2, 3]
    assert registry.versions(MODEL) == [1, 2, 3]
    for engine, version in results:
        pulled = registry.pull(MODEL, tmp_path / f"deploy{version}", version=version, cache_dir=tmp_path / "cache")
        assert Path(pulled.path).read_bytes() == engine
    # 'latest' only moves forward, whichever publisher finished last.
    assert registry.aliases(MODEL) == {"latest": 3}


def test_concurrent_alias_moves_lose_no_update(registry_uri, tmp_path):
    registry = open_registry(registry_uri)
    for version in range(1, 5):
        publish_one(registry, tmp_path / f"v{version}", f"engine {version}".encode(), checkpoint=str(version))
    moved = _run_children(_promote_at_once, [(registry_uri, version) for version in range(1, 5)])

    assert sorted(moved) == [1, 2, 3, 4]
    record = registry.alias_history(MODEL, "prod")
    # Every move landed once: the losers of each race re-read the alias and moved it from there.
    visited = [record.version, *(move.version for move in record.history)]
    assert sorted(visited) == [1, 2, 3, 4]


def _publish_slowly(uri: str, folder: str) -> None:
    registry = open_registry(uri, transfer=TransferSettings(part_size=5 * MiB, max_concurrency=1, max_bandwidth=4 * MiB))
    target = make_target(Path(folder), os.urandom(24 * MiB))
    registry.publish(MODEL, [target], lineage=lineage("killed"), environment=ENVIRONMENT)


def test_publisher_killed_mid_upload_leaves_no_version(registry_uri, tmp_path):
    registry = open_registry(registry_uri)
    publisher = multiprocessing.get_context("fork").Process(target=_publish_slowly, args=(registry_uri, str(tmp_path / "slow")))
    publisher.start()
    try:
        wait_until(
            lambda: any(u.key.endswith("/engine") for u in registry.store.pending_uploads("")),
            timeout=30,
            what="the upload to start",
            interval=0.05,
        )
    finally:
        os.kill(publisher.pid, signal.SIGKILL)
        publisher.join(30)
    assert publisher.exitcode == -signal.SIGKILL

    assert registry.versions(MODEL) == []
    with pytest.raises(NotFoundError):
        registry.resolve(MODEL)
    leftovers = [info.key for info in registry.store.list(f"{MODEL}/versions/1/")]
    assert f"{MODEL}/versions/1/lock.json" in leftovers

    manifest = publish_one(registry, tmp_path / "next", b"engine after the crash")
    assert manifest.version == 2 and registry.versions(MODEL) == [2]
    assert registry.aliases(MODEL) == {"latest": 2}

    # A version younger than gc's age is left alone: its publisher may still be at work.
    assert registry.gc(older_than=timedelta(hours=1)).versions == []
    preview = registry.gc(older_than=timedelta(0), dry_run=True)
    assert [(v.model, v.version) for v in preview.versions] == [(MODEL, 1)] and len(preview.uploads) == 1
    assert [info.key for info in registry.store.list(f"{MODEL}/versions/1/")] == leftovers

    report = registry.gc(older_than=timedelta(0))
    assert [(v.model, v.version) for v in report.versions] == [(MODEL, 1)]
    assert [u.key for u in report.uploads] == [f"{MODEL}/versions/1/{TAG}/engine"]
    # All that stays is gc's claim on the number: an empty manifest, which is no version to readers.
    assert [(info.key, info.size) for info in registry.store.list(f"{MODEL}/versions/1/")] == [(f"{MODEL}/versions/1/manifest.json", 0)]
    assert registry.versions(MODEL) == [2]
    assert registry.store.pending_uploads("") == []
    pulled = registry.pull(MODEL, tmp_path / "deploy", cache_dir=tmp_path / "cache")
    assert (pulled.version, Path(pulled.path).read_bytes()) == (2, b"engine after the crash")


def test_server_stopped_mid_run_gives_a_clear_error(tmp_path, monkeypatch):
    with running_seaweedfs(tmp_path / "private-server") as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        uri = f"s3://{TEST_BUCKET}/registry"
        registry = open_registry(uri, transfer=TransferSettings(part_size=5 * MiB, max_concurrency=1, max_bandwidth=4 * MiB))
        publish_one(registry, tmp_path / "first", b"engine 1")

        outcome: list[BaseException] = []

        def publish_slowly() -> None:
            try:
                publish_one(registry, tmp_path / "second", os.urandom(24 * MiB), checkpoint="second")
            except BaseException as err:
                outcome.append(err)

        publisher = threading.Thread(target=publish_slowly)
        publisher.start()
        wait_until(lambda: registry.store.pending_uploads(""), timeout=30, what="the upload to start", interval=0.05)
        server.stop(grace=0)
        publisher.join(120)

    assert len(outcome) == 1 and isinstance(outcome[0], RegistryUnreachable), outcome
    message = str(outcome[0])
    assert "cannot reach the S3 server for s3://trtforge-tests/registry" in message and "after 3 attempts" in message
    assert server.endpoint not in message and str(server.ports["s3.port"]) not in message
    with pytest.raises(RegistryUnreachable, match="cannot reach the S3 server .* after 3 attempts"):
        registry.pull(MODEL, tmp_path / "deploy", cache_dir=tmp_path / "cache")


def test_a_large_object_changed_on_the_server_is_refused_and_the_deployed_folder_kept(registry_uri, tmp_path, request):
    registry = open_registry(registry_uri, transfer=TransferSettings(part_size=5 * MiB, max_concurrency=4))
    first = os.urandom(12 * MiB)
    publish_one(registry, tmp_path / "v1", first)
    deploy, cache = tmp_path / "deploy", tmp_path / "cache"
    registry.pull(MODEL, deploy, cache_dir=cache)
    second = os.urandom(12 * MiB)
    publish_one(registry, tmp_path / "v2", second, checkpoint="second")
    key = f"{MODEL}/versions/2/{TAG}/engine"
    # One byte changed in the middle of a ranged part, the size kept: only the SHA-256 can tell.
    corrupt(registry_uri, key, second[: 7 * MiB] + bytes([second[7 * MiB] ^ 1]) + second[7 * MiB + 1 :], request)

    with pytest.raises(IntegrityError, match=f"{key} is corrupted: it has {12 * MiB} bytes with SHA-256 .*nothing was written"):
        registry.pull(MODEL, deploy, cache_dir=cache)
    assert sorted(path.name for path in deploy.iterdir()) == ["build.json", "engine"]
    assert (deploy / "engine").read_bytes() == first
    assert not (cache / "blobs" / "sha256" / hashlib.sha256(second).hexdigest()[:2] / hashlib.sha256(second).hexdigest()).exists()
    assert not [path for path in cache.rglob("*") if ".tmp-" in path.name]
