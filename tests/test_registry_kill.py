"""Crash-safety of publishing: a real publisher killed with SIGKILL after each step, a re-run, then gc.

The publisher is a forked child that publishes for real (signed, to the directory store and
to the SeaweedFS server) and sends itself SIGKILL at one named step (``TRTFORGE_CRASH_AT``,
see trtforge/registry/crashpoints.py). After every kill and every re-run: each visible
version is complete and its signature verifies, aliases point only at complete versions,
every successful run added exactly one version, and gc removes what the killed run left and
nothing else.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.forking import run_then_exit
from tests.test_registry import ENVIRONMENT, MODEL, lineage, make_target
from tests.test_signing import KeyPair, write_key_pair
from trtforge.cli import app
from trtforge.errors import RegistryError
from trtforge.registry import KeySigner, open_registry
from trtforge.registry.crashpoints import CRASH_ENV, PAUSE_ENV, POINTS
from trtforge.registry.storage import MiB, TransferSettings
from trtforge.staging import Staging

ALIASES = ["latest", "prod"]
# The killed publisher's engine is large enough for a multipart upload on S3 (5 MiB parts).
KILLED_ENGINE_SIZE = 6 * MiB
MANIFEST_WRITTEN = ("published", "mid-alias-move")


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory) -> KeyPair:
    return write_key_pair(tmp_path_factory.mktemp("kill-keys"), "publisher")


def publish(registry, folder: Path, engine: bytes, checkpoint: str, key: KeyPair):
    return registry.publish(
        MODEL, [make_target(folder, engine)], lineage=lineage(checkpoint), environment=ENVIRONMENT, aliases=ALIASES, signer=key.signer
    )


def _publish_until(uri: str, folder: str, private_key: str, variable: str, step: str, outcome=None) -> None:
    """Child process: publish for real, stopping itself at ``step``; reports how a resumed publish ended."""
    os.environ[variable] = step
    registry = open_registry(uri, transfer=TransferSettings(part_size=5 * MiB, max_concurrency=1))
    target = make_target(Path(folder), os.urandom(KILLED_ENGINE_SIZE))
    try:
        registry.publish(
            MODEL, [target], lineage=lineage("killed"), environment=ENVIRONMENT, aliases=ALIASES, signer=KeySigner(Path(private_key))
        )
    except RegistryError as err:
        if outcome is None:
            raise
        outcome.put(str(err))
        return
    if outcome is not None:
        outcome.put("published")


def assert_consistent(registry, key: KeyPair) -> None:
    """Every visible version is whole and signed; every alias points at one of them."""
    versions = registry.versions(MODEL)
    for version in versions:
        report = registry.verify(MODEL, version, trust=key.trust, require_signature=True)
        assert report.verified, report.problems
    for alias, version in registry.aliases(MODEL).items():
        assert version in versions, f"alias {alias} points at version {version}, which is not complete"
        assert registry.resolve(MODEL, alias=alias) == version


def keys(registry, prefix: str = "") -> list[str]:
    return [info.key for info in registry.store.list(prefix)]


@pytest.mark.parametrize("step", POINTS)
def test_publisher_killed_at_each_step_then_rerun_and_gc(registry_uri, tmp_path, signing_key, step):
    registry = open_registry(registry_uri)
    assert publish(registry, tmp_path / "first", b"engine 1", "1", signing_key).version == 1

    child = multiprocessing.get_context("fork").Process(
        target=_publish_until, args=(registry_uri, str(tmp_path / "killed"), str(signing_key.private), CRASH_ENV, step)
    )
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL, f"the publisher was not killed at {step!r} (exit code {child.exitcode})"

    got_manifest = step in MANIFEST_WRITTEN
    complete = [1, 2] if got_manifest else [1]
    assert registry.versions(MODEL) == complete
    assert registry.aliases(MODEL) == ({"latest": 2, "prod": 1} if step == "mid-alias-move" else {"latest": 1, "prod": 1})
    assert_consistent(registry, signing_key)
    if not got_manifest:
        assert f"{MODEL}/versions/2/lock.json" in keys(registry, f"{MODEL}/versions/2/")
    assert bool(registry.store.pending_uploads("")) == (step == "mid-upload")

    rerun = publish(registry, tmp_path / "rerun", b"engine after the crash", "3", signing_key)
    assert rerun.version == 3
    assert registry.versions(MODEL) == [*complete, 3]
    assert registry.aliases(MODEL) == {"latest": 3, "prod": 3}
    assert_consistent(registry, signing_key)

    # A leftover younger than gc's age is left alone: its publisher could still be at work.
    young = registry.gc(older_than=timedelta(hours=1))
    assert (young.versions, young.uploads) == ([], [])
    kept = [key for key in keys(registry) if got_manifest or not key.startswith(f"{MODEL}/versions/2/")]
    report = registry.gc(older_than=timedelta(0))
    assert [(v.model, v.version) for v in report.versions] == ([] if got_manifest else [(MODEL, 2)])
    assert len(report.uploads) == (1 if step == "mid-upload" else 0)
    claim = [] if got_manifest else [f"{MODEL}/versions/2/manifest.json"]
    assert keys(registry) == sorted(kept + claim)
    assert registry.store.pending_uploads("") == []
    assert registry.versions(MODEL) == [*complete, 3]
    assert_consistent(registry, signing_key)
    again = registry.gc(older_than=timedelta(0))
    assert (again.versions, again.staging, again.uploads) == ([], [], [])

    assert publish(registry, tmp_path / "after-gc", b"engine 4", "4", signing_key).version == 4


def test_gc_claims_a_stalled_version_so_its_publisher_cannot_complete_it(registry_uri, tmp_path, signing_key):
    """A publisher frozen between its uploads and its manifest wakes up after gc collected its version."""
    context = multiprocessing.get_context("fork")
    outcome = context.Queue()
    child = context.Process(
        target=run_then_exit,
        args=(_publish_until, registry_uri, str(tmp_path / "stalled"), str(signing_key.private), PAUSE_ENV, "uploaded", outcome),
    )
    child.start()
    try:
        _, status = os.waitpid(child.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"the publisher ended instead of stalling (wait status {status})"
        registry = open_registry(registry_uri)
        report = registry.gc(older_than=timedelta(0))
        assert [(v.model, v.version) for v in report.versions] == [(MODEL, 1)]
    finally:
        os.kill(child.pid, signal.SIGCONT)
    message = outcome.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0
    assert f"version 1 of {MODEL} was removed by 'trtforge gc' while it was being published" in message

    assert registry.versions(MODEL) == []
    assert [(info.key, info.size) for info in registry.store.list(f"{MODEL}/versions/")] == [(f"{MODEL}/versions/1/manifest.json", 0)]
    # The number stays spent: the next publish cannot be mistaken for the collected one.
    assert publish(registry, tmp_path / "next", b"engine 2", "2", signing_key).version == 2
    assert_consistent(registry, signing_key)


def test_gc_claim_loses_to_a_published_manifest(registry_uri, tmp_path, signing_key):
    registry = open_registry(registry_uri)
    publish(registry, tmp_path / "first", b"engine 1", "1", signing_key)
    manifest = registry.store.get(f"{MODEL}/versions/1/manifest.json").data
    assert registry.maintenance._claim_unfinished(MODEL, 1) is False
    assert registry.store.get(f"{MODEL}/versions/1/manifest.json").data == manifest
    assert_consistent(registry, signing_key)


def test_gc_removes_stale_staging_and_leaves_versions_alone(registry_uri, tmp_path, signing_key):
    registry = open_registry(registry_uri)
    publish(registry, tmp_path / "first", b"engine 1", "1", signing_key)
    staged = tmp_path / "model.onnx"
    staged.write_bytes(b"converted onnx" * 100)
    staging = Staging(registry, MODEL, "run-7")
    staging.put("model.onnx", staged)
    staging.put("target-0/engine", staged)

    assert registry.gc(older_than=timedelta(hours=1)).staging == []
    preview = registry.gc(older_than=timedelta(0), dry_run=True)
    assert [(s.model, s.run, s.objects) for s in preview.staging] == [(MODEL, "run-7", 2)]
    assert len(keys(registry, f"{MODEL}/staging/")) == 2

    uri_option = ["--registry", registry_uri]
    result = CliRunner().invoke(app, ["gc", "--older-than", "0", *uri_option])
    assert result.exit_code == 0, result.output
    assert f"removed staging of {MODEL} run run-7 (2 objects, 2800 bytes)" in result.stdout
    assert keys(registry, f"{MODEL}/staging/") == []
    assert registry.versions(MODEL) == [1]
    assert_consistent(registry, signing_key)
