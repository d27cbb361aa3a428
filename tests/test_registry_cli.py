"""The registry commands: ls, show, pull, promote, gc; text and --json; errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from tests.test_registry import MODEL, TAG, publish_one
from trtforge.cli import app
from trtforge.registry import open_registry

runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def test_commands_on_a_registry_from_the_environment(tmp_path, monkeypatch):
    uri = f"file://{tmp_path / 'registry'}"
    monkeypatch.setenv("TRTFORGE_REGISTRY", uri)
    registry = open_registry(uri)
    publish_one(registry, tmp_path / "one", b"engine 1", checkpoint="1")
    publish_one(registry, tmp_path / "two", b"engine 2", checkpoint="2")

    listing = json.loads(invoke("ls", MODEL, "--json"))
    assert [v["version"] for v in listing["versions"]] == [1, 2] and listing["aliases"] == {"latest": 2}
    assert listing["versions"][1]["targets"][0]["tag"] == TAG
    text = invoke("ls", MODEL)
    assert "version 2" in text and "[latest]" in text and "accuracy=0.97" in text

    assert json.loads(invoke("show", MODEL, "1", "--json")) == registry.manifest(MODEL, 1).model_dump(mode="json")
    assert registry.manifest(MODEL, 2).targets[TAG].files["engine"].sha256 in invoke("show", MODEL, "2")

    pulled = json.loads(
        invoke("pull", MODEL, "--version", "1", "-o", str(tmp_path / "deploy"), "--cache-dir", str(tmp_path / "cache"), "--json")
    )
    assert (pulled["version"], pulled["tag"], pulled["cached"]) == (1, TAG, False)
    assert Path(pulled["path"]).read_bytes() == b"engine 1"
    assert "from the local cache" in invoke(
        "pull", MODEL, "--target", TAG, "--version", "1", "-o", str(tmp_path / "deploy"), "--cache-dir", str(tmp_path / "cache")
    )

    assert "prod -> version 1" in invoke("promote", MODEL, "1", "--alias", "prod")
    assert registry.aliases(MODEL) == {"latest": 2, "prod": 1}
    report = json.loads(invoke("gc", "--older-than", "0", "--dry-run", "--json"))
    assert (report["dry_run"], report["versions"], report["uploads"]) == (True, [], [])


def test_default_registry_is_artifacts_registry_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("TRTFORGE_REGISTRY", raising=False)
    monkeypatch.chdir(tmp_path)
    publish_one(open_registry(None), tmp_path / "build")
    assert (tmp_path / "artifacts" / "registry" / MODEL / "versions" / "1" / "manifest.json").is_file()
    assert json.loads(invoke("ls", MODEL, "--json"))["registry"] == f"file://{tmp_path / 'artifacts' / 'registry'}"
    other = tmp_path / "elsewhere"
    assert "no model 'digits-cnn'" in runner.invoke(app, ["ls", MODEL, "--registry", f"file://{other}"]).exception.args[0]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from trtforge.cli import main; main()", *args], capture_output=True, text=True, timeout=60
    )


def test_errors_are_one_line_without_traceback(tmp_path):
    uri = f"file://{tmp_path / 'registry'}"
    publish_one(open_registry(uri), tmp_path / "build")
    for args, message in [
        (["pull", "resnet", "-o", str(tmp_path / "x"), "--registry", uri], "error: no model 'resnet' in registry"),
        (["show", MODEL, "7", "--registry", uri], f"error: {MODEL} has no version 7"),
        (["promote", MODEL, "1", "--alias", "a/b", "--registry", uri], "error: invalid alias 'a/b'"),
        (["ls", MODEL, "--registry", "ftp://host/registry"], "is not file://PATH or s3://BUCKET/PREFIX"),
    ]:
        result = run_cli(*args)
        assert result.returncode == 1, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_puller_runs_with_the_core_install_only(tmp_path):
    """pull, ls and show must not import torch, onnx, onnxruntime or Prefect (absent on inference hosts)."""
    uri = f"file://{tmp_path / 'registry'}"
    publish_one(open_registry(uri), tmp_path / "build")
    script = (
        "import json, sys\n"
        "from trtforge.cli import app\n"
        f"for args in (['ls', {MODEL!r}], ['show', {MODEL!r}, '1'], ['pull', {MODEL!r}, '-o', {str(tmp_path / 'deploy')!r}]):\n"
        f"    try:\n        app(args + ['--registry', {uri!r}, '--json'], standalone_mode=False)\n"
        "    except SystemExit as exit:\n        assert not exit.code, exit.code\n"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'prefect', 'tensorrt', 'modelopt') if m in sys.modules]\n"
        "print(json.dumps(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "deploy" / "engine").read_bytes() == b"engine v1"
