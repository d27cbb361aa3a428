"""The storage interface under the registry: one suite, run on the directory store and on SeaweedFS."""

from __future__ import annotations

import json
import os
import threading

import pytest

from tests.s3_server import ACCESS_KEY, SECRET_KEY
from trtforge.errors import IntegrityError, NotFoundError, RegistryError
from trtforge.hashing import sha256_file
from trtforge.registry.s3 import S3Store, parse_s3_uri
from trtforge.registry.storage import MiB, PreconditionFailed, RegistryUnreachable, TransferSettings, open_store


@pytest.fixture
def store(registry_uri):
    return open_store(registry_uri, TransferSettings(part_size=5 * MiB, max_concurrency=4))


def run_together(count: int, work) -> list:
    """Start ``count`` threads that call ``work(index)`` at the same moment; their results or exceptions."""
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = work(index)
        except Exception as err:
            results[index] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_conditional_create_refuses_an_existing_key(store):
    etag = store.put_if_absent("m/versions/1/lock.json", b"first")
    with pytest.raises(PreconditionFailed):
        store.put_if_absent("m/versions/1/lock.json", b"second")
    stored = store.get("m/versions/1/lock.json")
    assert (stored.data, stored.etag) == (b"first", etag)


def test_compare_and_swap_needs_the_current_etag(store):
    first = store.put_if_absent("m/aliases/latest.json", b"v1")
    second = store.put_if_match("m/aliases/latest.json", b"v2", first)
    assert second != first
    with pytest.raises(PreconditionFailed):
        store.put_if_match("m/aliases/latest.json", b"v3", first)
    with pytest.raises(PreconditionFailed):
        store.put_if_match("m/aliases/absent.json", b"v1", second)
    assert store.get("m/aliases/latest.json").data == b"v2"
    assert store.get("m/aliases/absent.json") is None


def test_concurrent_conditional_creates_exactly_one_wins(store):
    results = run_together(12, lambda i: store.put_if_absent("m/versions/7/lock.json", f"writer {i}".encode()))
    winners = [i for i, result in enumerate(results) if isinstance(result, str)]
    losers = [result for result in results if isinstance(result, PreconditionFailed)]
    assert len(winners) == 1 and len(losers) == 11
    assert store.get("m/versions/7/lock.json").data == f"writer {winners[0]}".encode()


def test_concurrent_compare_and_swap_loses_no_update(store):
    key = "m/aliases/counter.json"
    store.put_if_absent(key, json.dumps({"count": 0}).encode())

    def increment(_index: int, times: int = 5) -> int:
        conflicts = 0
        for _ in range(times):
            while True:
                current = store.get(key)
                count = json.loads(current.data)["count"]
                try:
                    store.put_if_match(key, json.dumps({"count": count + 1}).encode(), current.etag)
                    break
                except PreconditionFailed:
                    conflicts += 1
        return conflicts

    results = run_together(4, increment)
    assert all(isinstance(conflicts, int) for conflicts in results), results
    assert json.loads(store.get(key).data)["count"] == 20


def test_list_children_head_and_delete(store):
    for key, body in {"m/versions/1/a/engine": b"12345", "m/versions/1/manifest.json": b"{}", "m/versions/2/lock.json": b"x"}.items():
        store.put_if_absent(key, body)
    assert [o.key for o in store.list("m/versions/1/")] == ["m/versions/1/a/engine", "m/versions/1/manifest.json"]
    assert store.children("m/versions/") == ["1", "2"]
    assert store.children("") == ["m"]
    assert store.head("m/versions/1/a/engine").size == 5
    assert store.head("m/versions/1/a/missing") is None
    store.delete("m/versions/1/a/engine")
    assert store.head("m/versions/1/a/engine") is None
    assert [o.key for o in store.list("m/")] == ["m/versions/1/manifest.json", "m/versions/2/lock.json"]


def test_multipart_file_round_trips_intact(store, registry_uri, tmp_path, request):
    source = tmp_path / "engine.bin"
    source.write_bytes(os.urandom(20 * MiB + 12345))
    uploaded = store.upload_file("m/versions/1/t/engine", source)
    assert (uploaded.sha256, uploaded.size) == (sha256_file(source), source.stat().st_size)
    copy = tmp_path / "copy.bin"
    store.download_file("m/versions/1/t/engine", copy)
    assert copy.read_bytes() == source.read_bytes()
    if registry_uri.startswith("s3://"):
        server = request.getfixturevalue("seaweedfs")
        head = server.client().head_object(Bucket=store.bucket, Key=f"{store.prefix}/m/versions/1/t/engine", ChecksumMode="ENABLED")
        # Five parts of 5 MiB, each checked by the server against the CRC32 sent with it.
        assert head["ChecksumCRC32"].endswith("-5")


def test_directory_store_never_overwrites_a_published_file(tmp_path):
    store = open_store(f"file://{tmp_path / 'registry'}")
    source = tmp_path / "engine"
    source.write_bytes(b"first engine")
    store.upload_file("m/versions/1/t/engine", source)
    source.write_bytes(b"other engine")
    with pytest.raises(PreconditionFailed):
        store.upload_file("m/versions/1/t/engine", source)
    published = tmp_path / "registry" / "m" / "versions" / "1" / "t" / "engine"
    assert published.read_bytes() == b"first engine"
    assert published.stat().st_mode & 0o222 == 0
    assert store.pending_uploads("") == []


@pytest.mark.parametrize("key", ["../escape", "m//x", "m/./x", ".hidden/x", "m/.lock", "/absolute", ""])
def test_keys_that_could_escape_are_refused(store, key):
    with pytest.raises(RegistryError, match="invalid object key"):
        store.put_if_absent(key, b"x")


def test_unfinished_multipart_uploads_are_listed_and_aborted(s3_registry_uri, seaweedfs):
    store = open_store(s3_registry_uri)
    client = seaweedfs.client()
    started = client.create_multipart_upload(Bucket=store.bucket, Key=f"{store.prefix}/m/versions/3/t/engine")
    client.upload_part(
        Bucket=store.bucket, Key=f"{store.prefix}/m/versions/3/t/engine", UploadId=started["UploadId"], PartNumber=1, Body=b"x" * 1024
    )
    pending = store.pending_uploads("m/")
    assert [(p.key, p.upload_id) for p in pending] == [("m/versions/3/t/engine", started["UploadId"])]
    store.abort_upload(pending[0])
    assert store.pending_uploads("m/") == []


def test_probe_passes_on_a_server_that_enforces_conditions(s3_registry_uri):
    store = open_store(s3_registry_uri)
    store.check_conditional_writes()
    assert store.list("") == []


class IgnoresIfNoneMatch(S3Store):
    """Stands in for S3-compatible servers that accept ``If-None-Match: *`` and write anyway."""

    def put_if_absent(self, key: str, data: bytes) -> str:
        return self.put(key, data)


def test_probe_refuses_a_server_that_ignores_conditions(s3_registry_uri):
    store = IgnoresIfNoneMatch(*parse_s3_uri(s3_registry_uri), TransferSettings())
    with pytest.raises(RegistryError, match="does not enforce conditional writes .*If-None-Match"):
        store.check_conditional_writes()
    assert store.list("") == []


def test_missing_bucket_is_named(s3_env):
    store = open_store("s3://no-such-bucket-for-trtforge/registry")
    with pytest.raises(NotFoundError, match="S3 bucket 'no-such-bucket-for-trtforge' does not exist"):
        store.list("m/")
    with pytest.raises(NotFoundError, match="S3 bucket 'no-such-bucket-for-trtforge' does not exist"):
        store.get("m/aliases/latest.json")


def test_wrong_credentials_are_named_without_revealing_them(s3_registry_uri, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = open_store(s3_registry_uri)
    with pytest.raises(RegistryError, match="refused the credentials") as caught:
        store.get("m/aliases/latest.json")
    message = str(caught.value)
    assert "not-the-secret" not in message and SECRET_KEY not in message and ACCESS_KEY not in message
    assert "127.0.0.1" not in message


def test_unreachable_endpoint_is_named_without_revealing_it(s3_registry_uri, monkeypatch):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    store = open_store(s3_registry_uri)
    with pytest.raises(RegistryUnreachable, match="cannot reach the S3 server .* after 2 attempts") as caught:
        store.get("m/aliases/latest.json")
    assert str(port) not in str(caught.value)


@pytest.mark.parametrize(
    "uri, problem",
    [
        ("http://example/registry", "is not file://PATH or s3://BUCKET/PREFIX"),
        ("file://", "names no folder"),
        ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("s3://bucket/a/../b", "may not contain"),
    ],
)
def test_bad_registry_uris_are_explained(uri, problem):
    with pytest.raises(RegistryError, match=problem):
        open_store(uri)


# --- transfers corrupted for real ------------------------------------------------------------------


def _flip_first_byte(request, **_) -> None:
    """A botocore ``before-send`` hook: the bytes on the wire differ from those hashed and signed."""
    body = request.body
    data = body.read() if hasattr(body, "read") else bytes(body)
    request.body = bytes([data[0] ^ 0xFF]) + data[1:]


@pytest.mark.parametrize("size, operation", [(1 * MiB, "PutObject"), (12 * MiB, "UploadPart")])
def test_an_upload_corrupted_in_flight_is_refused_and_leaves_nothing(s3_registry_uri, tmp_path, size, operation):
    store = open_store(s3_registry_uri, TransferSettings(part_size=5 * MiB, max_concurrency=2))
    source = tmp_path / "engine"
    source.write_bytes(os.urandom(size))
    store._client.meta.events.register(f"before-send.s3.{operation}", _flip_first_byte)

    with pytest.raises(IntegrityError, match="was corrupted on its way to the server .* nothing was stored: publish again"):
        store.upload_file("m/versions/1/t/engine", source)
    assert store.head("m/versions/1/t/engine") is None
    assert store.pending_uploads("") == []


@pytest.mark.parametrize("size, operation", [(1 * MiB, "PutObject"), (12 * MiB, "CompleteMultipartUpload")])
def test_an_object_changed_on_the_server_before_the_check_is_refused_and_deleted(seaweedfs, s3_registry_uri, tmp_path, size, operation):
    store = open_store(s3_registry_uri, TransferSettings(part_size=5 * MiB, max_concurrency=2))
    source = tmp_path / "engine"
    source.write_bytes(os.urandom(size))
    full_key = f"{store.prefix}/m/versions/1/t/engine"

    def overwrite(**_) -> None:
        # Another writer replaces the object, same size, between the upload and its check.
        seaweedfs.client().put_object(Bucket=store.bucket, Key=full_key, Body=os.urandom(size))

    store._client.meta.events.register(f"after-call.s3.{operation}", overwrite)
    with pytest.raises(IntegrityError, match="what the server stored .* is not what was sent from .* it was deleted: publish again"):
        store.upload_file("m/versions/1/t/engine", source)
    assert store.head("m/versions/1/t/engine") is None


def test_a_transfer_hashes_the_bytes_it_moves(store, tmp_path):
    source = tmp_path / "engine.bin"
    source.write_bytes(os.urandom(11 * MiB + 7))
    uploaded = store.upload_file("m/versions/1/t/engine", source)
    copy = tmp_path / "copy.bin"
    downloaded = store.download_file("m/versions/1/t/engine", copy)
    assert uploaded == downloaded
    assert (downloaded.sha256, downloaded.size) == (sha256_file(copy), copy.stat().st_size)
