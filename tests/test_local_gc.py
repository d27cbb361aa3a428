"""The local work and cache folders stay bounded: `trtforge gc --local` and the cap every run applies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import REPO
from trtforge.errors import TrtforgeError
from trtforge.localcache import local_entries, mark_used, prune

MIB = 1024**2
HOUR = 3600.0


def entry(root: Path, relative: str, mib: int, hours_ago: float) -> Path:
    path = root / relative
    if path.suffix == ".npz":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * mib * MIB)
    else:
        path.mkdir(parents=True)
        (path / "model.onnx").write_bytes(b"\0" * mib * MIB)
    stamp = time.time() - hours_ago * HOUR
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture()
def artifacts(tmp_path) -> Path:
    root = tmp_path / "artifacts"
    entry(root, "work/vit/old-export", 3, hours_ago=72)
    entry(root, "cache/vit/precision/int8-entry", 2, hours_ago=48)
    entry(root, "cache/vit/reference-abc.npz", 1, hours_ago=30)
    entry(root, "work/vit/current-export", 4, hours_ago=0)
    (root / "runs" / "vit" / "run-1").mkdir(parents=True)
    return root


def names(entries) -> list[str]:
    return [e.path.name for e in entries]


def test_the_cap_removes_the_least_recently_used_first_and_never_a_recent_entry(artifacts):
    report = prune(artifacts, cap_bytes=5 * MIB)
    assert names(report.removed) == ["old-export", "int8-entry"]
    assert report.freed_bytes == 5 * MIB and report.kept_bytes == 5 * MIB
    assert names(local_entries(artifacts)) == ["reference-abc.npz", "current-export"]
    assert not [p for p in artifacts.rglob(".trtforge-removing-*")], "nothing half-removed is left behind"

    everything = prune(artifacts, cap_bytes=0)
    assert names(everything.removed) == ["reference-abc.npz"], "the entry used within the hour stays over the cap"
    assert (artifacts / "runs" / "vit" / "run-1").is_dir(), "run reports are not cache entries"


def test_older_than_goes_first_and_a_reused_entry_goes_last(artifacts):
    mark_used(artifacts / "work" / "vit" / "old-export")
    report = prune(artifacts, cap_bytes=None, older_than=timedelta(hours=36))
    assert names(report.removed) == ["int8-entry"]


def test_dry_run_removes_nothing(artifacts):
    before = local_entries(artifacts)
    report = prune(artifacts, cap_bytes=0, dry_run=True)
    assert len(report.removed) == 3
    assert local_entries(artifacts) == before


def test_a_missing_artifacts_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TrtforgeError, match="does not exist: pass the folder your runs wrote to with --artifacts"):
        prune(tmp_path / "nowhere", cap_bytes=0)


def trtforge(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TRTFORGE_")} | env
    command = [sys.executable, "-c", "from trtforge.cli import main; main()", *args]
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)


def test_the_command_prunes_by_age_and_cap_and_reports_json(artifacts):
    done = trtforge("gc", "--local", "--artifacts", str(artifacts), "--older-than", "40", "--max-gb", str(4.5 / 1024), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # 72 h and 48 h old by age; then the 30 h old reference for the cap (4 MiB kept of a 4.5 MiB cap).
    assert [Path(e["path"]).name for e in report["removed"]] == ["old-export", "int8-entry", "reference-abc.npz"]
    assert report["kept_bytes"] == 4 * MIB


def test_the_command_names_a_bad_cap_and_a_missing_folder_in_one_line(tmp_path, artifacts):
    bad_cap = trtforge("gc", "--local", "--artifacts", str(artifacts), TRTFORGE_LOCAL_CACHE_GB="lots")
    assert bad_cap.returncode == 1 and "Traceback" not in bad_cap.stderr
    assert bad_cap.stderr.strip().splitlines() == [
        "error: TRTFORGE_LOCAL_CACHE_GB='lots' is not a number: set it to the cap in GiB, e.g. 20"
    ]
    missing = trtforge("gc", "--local", "--artifacts", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert f"artifacts folder {tmp_path / 'nowhere'} does not exist" in missing.stderr
