"""Finding the newest checkpoint in a watched folder or S3 prefix, fetching it, and retraining into it."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import DIGITS_SPEC
from tests.s3_server import TEST_BUCKET
from tests.waiting import wait_until
from trtforge.errors import CheckpointError, SpecError
from trtforge.spec import WatchSpec, parse_spec
from trtforge.watch import glob_regex, local_checkpoint, newest_checkpoint, retrain_into

TRAIN_SOURCE = """
from pathlib import Path


def train(checkpoint):
    Path(checkpoint).write_bytes(b"weights of a freshly trained model")
    return {"train_loss": 0.25}


def crash(checkpoint):
    Path(checkpoint).write_bytes(b"half a checkpoint")
    raise RuntimeError("out of memory in epoch 3")
"""


def make_spec(folder: Path, watch: dict | None, **changes):
    """The digits spec with a trivial train entry point living in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer.py").write_text(TRAIN_SOURCE)
    data = yaml.safe_load(DIGITS_SPEC.read_text())
    data.pop("watch", None)
    data.update({"train": "trainer.py:train", **changes})
    if watch is not None:
        data["watch"] = watch
    return parse_spec(data, source=str(folder / "spec.yaml"), base_dir=folder)


def touch(path: Path, seconds_ago: float, content: bytes = b"weights") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    stamp = time.time() - seconds_ago
    os.utime(path, (stamp, stamp))
    return path


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        ("*.safetensors", ["a.safetensors", "digits-2024.safetensors"], ["sub/a.safetensors", "a.safetensors.tmp", "a.pt"]),
        ("**/*.pt", ["a.pt", "runs/7/last.pt", "x/y/z.pt"], ["a.pth", "runs/a.pt/x"]),
        ("ckpt-??.pt", ["ckpt-01.pt"], ["ckpt-1.pt", "ckpt-001.pt"]),
        ("[!b]*.pt", ["a.pt"], ["b.pt"]),
        ("run+1/(best).pt", ["run+1/(best).pt"], ["run1/best.pt"]),
    ],
)
def test_glob_patterns(pattern, matching, not_matching):
    regex = glob_regex(pattern)
    assert [name for name in matching if regex.fullmatch(name)] == matching
    assert [name for name in not_matching if regex.fullmatch(name)] == []


def test_newest_in_a_folder_by_time_ignoring_hidden_and_other_files(tmp_path):
    touch(tmp_path / "z-old.safetensors", 300)
    newest = touch(tmp_path / "a-new.safetensors", 100)
    touch(tmp_path / ".b-being-written.safetensors", 0)
    touch(tmp_path / "notes.txt", 0)
    touch(tmp_path / "sub" / "c.safetensors", 0)
    found = newest_checkpoint(WatchSpec(location=str(tmp_path)))
    assert (found.uri, found.name, found.size) == (str(newest), "a-new.safetensors", len(b"weights"))


def test_newest_across_sub_folders_with_a_double_star(tmp_path):
    touch(tmp_path / "run-1" / "last.pt", 200)
    touch(tmp_path / "last.pt", 100)
    newest = touch(tmp_path / "run-2" / "epoch-9" / "last.pt", 10)
    touch(tmp_path / ".cache" / "newer.pt", 0)
    found = newest_checkpoint(WatchSpec(location=str(tmp_path), pattern="**/last.pt"))
    assert found.uri == str(newest) and found.name == "run-2/epoch-9/last.pt"


def test_equal_times_are_broken_by_name(tmp_path):
    stamp = time.time() - 50
    for name in ("digits-20240101.safetensors", "digits-20240301.safetensors", "digits-20240201.safetensors"):
        touch(tmp_path / name, 0)
        os.utime(tmp_path / name, (stamp, stamp))
    assert newest_checkpoint(WatchSpec(location=str(tmp_path))).name == "digits-20240301.safetensors"


def test_missing_folder_and_empty_folder_say_which_setting_to_fix(tmp_path):
    with pytest.raises(CheckpointError, match=r"watch.location .*nowhere is not a folder"):
        newest_checkpoint(WatchSpec(location=str(tmp_path / "nowhere")))
    touch(tmp_path / "model.pt", 0)
    with pytest.raises(CheckpointError, match=r"no checkpoint matching '\*.safetensors' in .*fix watch.location / watch.pattern"):
        newest_checkpoint(WatchSpec(location=str(tmp_path)))


def test_local_checkpoint_is_the_file_itself(tmp_path):
    path = touch(tmp_path / "a.safetensors", 0)
    assert local_checkpoint(str(path), tmp_path / "cache") == path
    with pytest.raises(CheckpointError, match=r"missing.safetensors does not exist"):
        local_checkpoint(str(tmp_path / "missing.safetensors"), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def put_modified_after(client, key: str, body: bytes, *, after: str) -> None:
    """Put ``key`` until its LastModified is later than ``after``'s: S3 times have one-second resolution, and the watcher
    tells checkpoints (and a checkpoint from its replacement) apart by them."""
    earlier = client.head_object(Bucket=TEST_BUCKET, Key=after)["LastModified"]

    def stored_later() -> bool:
        client.put_object(Bucket=TEST_BUCKET, Key=key, Body=body)
        return client.head_object(Bucket=TEST_BUCKET, Key=key)["LastModified"] > earlier

    wait_until(stored_later, timeout=30, what=f"{key} stored with a LastModified after {after}'s")


def test_newest_on_s3_then_fetched_once_and_again_after_a_new_upload(s3_env, tmp_path):
    client = s3_env.client()
    prefix = f"watch-{uuid.uuid4().hex[:8]}/checkpoints"
    client.put_object(Bucket=TEST_BUCKET, Key=f"{prefix}/b-older.safetensors", Body=b"older weights")
    put_modified_after(client, f"{prefix}/a-newer.safetensors", b"newer weights", after=f"{prefix}/b-older.safetensors")
    client.put_object(Bucket=TEST_BUCKET, Key=f"{prefix}/.a-partial.safetensors", Body=b"partial")
    client.put_object(Bucket=TEST_BUCKET, Key=f"{prefix}/readme.txt", Body=b"not a checkpoint")

    found = newest_checkpoint(WatchSpec(location=f"s3://{TEST_BUCKET}/{prefix}/"))
    assert found.uri == f"s3://{TEST_BUCKET}/{prefix}/a-newer.safetensors" and found.size == len(b"newer weights")

    cache = tmp_path / "cache"
    local = local_checkpoint(found.uri, cache)
    assert local.read_bytes() == b"newer weights" and local.name == "a-newer.safetensors"
    first_write = local.stat()
    assert local_checkpoint(found.uri, cache) == local, "fetched once"
    again = local.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first_write.st_ino, first_write.st_mtime_ns), "fetched once: not rewritten"

    replaced_key = f"{prefix}/a-newer.safetensors"
    put_modified_after(client, replaced_key, b"replaced weights", after=replaced_key)
    replaced = local_checkpoint(found.uri, cache)
    assert replaced != local and replaced.read_bytes() == b"replaced weights"
    assert not [p for p in cache.rglob("*") if p.name.endswith(".partial")]

    with pytest.raises(CheckpointError, match=r"gone.safetensors does not exist"):
        local_checkpoint(f"s3://{TEST_BUCKET}/{prefix}/gone.safetensors", cache)
    with pytest.raises(CheckpointError, match="names no object"):
        local_checkpoint(f"s3://{TEST_BUCKET}/", cache)


def test_retrain_writes_a_new_visible_checkpoint_into_the_folder(tmp_path):
    incoming = tmp_path / "incoming"
    touch(incoming / "digits-cnn-old.safetensors", 60)
    spec = make_spec(tmp_path / "spec", {"location": str(incoming), "retrain_first": True})
    result = retrain_into(spec, tmp_path / "work")
    assert result.train_metrics == {"train_loss": 0.25}
    written = Path(result.checkpoint.uri)
    assert written.parent == incoming and written.name.startswith("digits-cnn-") and written.suffix == ".safetensors"
    assert written.read_bytes() == b"weights of a freshly trained model"
    assert sorted(p.name for p in incoming.iterdir()) == sorted(["digits-cnn-old.safetensors", written.name])
    assert newest_checkpoint(spec.watch).uri == str(written)


def test_retrain_uploads_to_an_s3_location(s3_env, tmp_path):
    location = f"s3://{TEST_BUCKET}/watch-{uuid.uuid4().hex[:8]}"
    spec = make_spec(tmp_path / "spec", {"location": location, "retrain_first": True})
    result = retrain_into(spec, tmp_path / "work")
    assert result.checkpoint.uri.startswith(location + "/digits-cnn-")
    assert newest_checkpoint(spec.watch) == result.checkpoint
    assert local_checkpoint(result.checkpoint.uri, tmp_path / "cache").read_bytes() == b"weights of a freshly trained model"
    assert list((tmp_path / "work").iterdir()) == []


def test_a_crashing_train_entry_point_leaves_nothing_behind(tmp_path):
    incoming = tmp_path / "incoming"
    spec = make_spec(tmp_path / "spec", {"location": str(incoming), "retrain_first": True}, train="trainer.py:crash")
    with pytest.raises(CheckpointError, match=r"train entry point 'trainer.py:crash' failed: RuntimeError: out of memory in epoch 3"):
        retrain_into(spec, tmp_path / "work")
    assert list(incoming.iterdir()) == []


def test_retrain_refuses_a_pattern_its_checkpoint_would_not_match(tmp_path):
    spec = make_spec(tmp_path / "spec", {"location": str(tmp_path / "in"), "pattern": "*.pt", "retrain_first": True})
    with pytest.raises(
        SpecError, match=r"watch.pattern '\*.pt' does not match 'digits-cnn-.*\.safetensors'.*use a pattern such as '\*.safetensors'"
    ):
        retrain_into(spec, tmp_path / "work")


def test_watch_section_validation_and_resolution(tmp_path):
    spec = make_spec(tmp_path / "spec", {"location": "incoming"})
    assert spec.watch.location == str((tmp_path / "spec" / "incoming").resolve())
    assert make_spec(tmp_path / "s3", {"location": "s3://models/digits"}).watch.location == "s3://models/digits"
    for watch, message in (
        ({"location": "https://example.com/ckpt"}, "watch.location: 'https://example.com/ckpt' must be a folder or s3://BUCKET/PREFIX"),
        ({"location": "in", "pattern": "../*.pt"}, "watch.pattern: '../\\*.pt' must be a relative glob"),
        ({"location": "in", "pattern": "/abs/*.pt"}, "watch.pattern: '/abs/\\*.pt' must be a relative glob"),
        ({"location": ""}, "watch.location: String should have at least 1 character"),
    ):
        with pytest.raises(SpecError, match=message):
            make_spec(tmp_path / "bad", watch)
    with pytest.raises(SpecError, match="watch.retrain_first needs a 'train' entry point"):
        make_spec(tmp_path / "bad", {"location": "in", "retrain_first": True}, train=None)


def test_where_checkpoints_are_watched_does_not_change_the_spec_hash(tmp_path):
    without = make_spec(tmp_path / "a", None)
    watched = make_spec(tmp_path / "b", {"location": "s3://models/digits", "retrain_first": True})
    assert without.sha256() == watched.sha256()
    assert make_spec(tmp_path / "c", None, export={"opset": 17}).sha256() != without.sha256()
