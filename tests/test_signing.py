"""Signed releases: publish signs a version with model-signing; pull and verify check it.

Every attack is made on a real store (a directory registry and the SeaweedFS server) by
changing objects behind the registry's back, and each one must refuse the pull with its
reason before anything is downloaded or written.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import model_signing
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.s3_server import TEST_BUCKET
from tests.test_registry import ENVIRONMENT, MODEL, TAG, json_values, lineage, make_target
from trtforge.cli import app
from trtforge.errors import IntegrityError, RegistryError
from trtforge.registry import KeySigner, SignatureError, TrustedKey, open_registry
from trtforge.registry.signing import VersionSigner, VersionVerifier

runner = CliRunner()
SIGNING_VARIABLES = (
    "TRTFORGE_SIGNING_KEY",
    "TRTFORGE_SIGNING_KEY_PASSWORD",
    "TRTFORGE_SIGNING_SIGSTORE",
    "TRTFORGE_REQUIRE_SIGNATURE",
    "TRTFORGE_TRUSTED_KEY",
    "TRTFORGE_TRUSTED_IDENTITY",
    "TRTFORGE_TRUSTED_OIDC_ISSUER",
)


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path

    @property
    def signer(self) -> KeySigner:
        return KeySigner(self.private)

    @property
    def trust(self) -> TrustedKey:
        return TrustedKey(self.public)


def write_key_pair(folder: Path, name: str, key=None, password: bytes | None = None) -> KeyPair:
    key = key or ec.generate_private_key(ec.SECP256R1())
    folder.mkdir(parents=True, exist_ok=True)
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    private = folder / f"{name}.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    public = folder / f"{name}.pub"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return KeyPair(private, public)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, KeyPair]:
    folder = tmp_path_factory.mktemp("keys")
    return {
        "publisher": write_key_pair(folder, "publisher"),
        "intruder": write_key_pair(folder, "intruder", ec.generate_private_key(ec.SECP384R1())),
        "rsa": write_key_pair(folder, "rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "encrypted": write_key_pair(folder, "encrypted", password=b"correct horse"),
    }


@pytest.fixture(autouse=True)
def no_signing_environment(monkeypatch):
    """Tests set the signing variables they mean to use; none leak in from the shell."""
    for name in SIGNING_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def publish(registry, folder: Path, engine: bytes, signer=None, checkpoint: str = "c", **kwargs):
    return registry.publish(
        MODEL, [make_target(folder, engine)], lineage=lineage(checkpoint), environment=ENVIRONMENT, signer=signer, **kwargs
    )


def object_bytes(registry, key: str) -> bytes:
    return registry.store.get(key).data


def plant(registry_uri: str, key: str, data: bytes, request) -> None:
    """Create or overwrite an object behind the registry's back, as someone with write access to the bucket could."""
    if registry_uri.startswith("file://"):
        path = Path(registry_uri.removeprefix("file://"), key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.chmod(0o644)
        path.write_bytes(data)
    else:
        prefix = registry_uri.removeprefix(f"s3://{TEST_BUCKET}/")
        request.getfixturevalue("seaweedfs").client().put_object(Bucket=TEST_BUCKET, Key=f"{prefix}/{key}", Body=data)


def version_key(version: int, name: str) -> str:
    return f"{MODEL}/versions/{version}/{name}"


def assert_nothing_fetched(tmp_path: Path) -> None:
    assert not (tmp_path / "deploy").exists()
    assert not any(path.is_file() for path in (tmp_path / "cache").rglob("*"))


# --- the signed round trip -----------------------------------------------------------------------


def test_signed_version_pulls_and_verifies_with_the_trusted_key(registry_uri, tmp_path, keys):
    registry = open_registry(registry_uri)
    engine = b"a signed engine" * 1000
    manifest = publish(registry, tmp_path / "build", engine, signer=keys["publisher"].signer)
    assert registry.store.head(version_key(1, "signature.sig")) is not None

    pulled = registry.pull(MODEL, tmp_path / "deploy", cache_dir=tmp_path / "cache", trust=keys["publisher"].trust)
    assert Path(pulled.path).read_bytes() == engine
    assert pulled.signature_verified_with == f"the trusted key {keys['publisher'].public}"

    report = registry.verify(MODEL, 1, trust=keys["publisher"].trust)
    assert (report.verified, report.signature, report.unexpected, report.problems) == (True, "valid", [], [])
    assert sorted(f.name for f in report.files if f.status == "ok") == [f"{TAG}/build.json", f"{TAG}/engine"]
    checked = {f.name: f.sha256 for f in report.files}
    assert checked[f"{TAG}/engine"] == manifest.targets[TAG].files["engine"].sha256 == hashlib.sha256(engine).hexdigest()
    assert [v.signed for v in registry.describe(MODEL).versions] == [True]


def test_signature_is_model_signings_own_over_the_manifest_and_every_file(registry_uri, tmp_path, keys):
    """A copy of the version's folder verifies with model-signing's public verifier, and fails it once a file changes."""
    registry = open_registry(registry_uri)
    publish(registry, tmp_path / "build", b"engine bytes", signer=keys["publisher"].signer)
    copy = tmp_path / "copy"
    prefix = f"{MODEL}/versions/1/"
    for info in registry.store.list(prefix):
        local = copy / info.key[len(prefix) :]
        local.parent.mkdir(parents=True, exist_ok=True)
        registry.store.download_file(info.key, local)
    verifier = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=keys["publisher"].public)
    verifier.verify(copy, copy / "signature.sig")

    bundle = json.loads((copy / "signature.sig").read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    signed = {resource["name"]: resource["digest"] for resource in statement["predicate"]["resources"]}
    assert set(signed) == {"manifest.json", f"{TAG}/engine", f"{TAG}/build.json"}
    assert statement["subject"][0]["name"] == f"{MODEL}/versions/1"

    (copy / "manifest.json").write_bytes((copy / "manifest.json").read_bytes().replace(b'"3.11.7"', b'"3.11.8"'))
    with pytest.raises(ValueError, match=r"Hash mismatch for \W*manifest\.json"):
        verifier.verify(copy, copy / "signature.sig")


# --- attacks -------------------------------------------------------------------------------------


def modify_engine(registry, registry_uri, request, keys, tmp_path):
    plant(registry_uri, version_key(1, f"{TAG}/engine"), b"a forged engine", request)


def modify_manifest(registry, registry_uri, request, keys, tmp_path):
    forged = object_bytes(registry, version_key(1, "manifest.json")).replace(b"0.97", b"0.99")
    plant(registry_uri, version_key(1, "manifest.json"), forged, request)


def add_file(registry, registry_uri, request, keys, tmp_path):
    plant(registry_uri, version_key(1, f"{TAG}/libplugin.so"), b"\x7fELF native code", request)


def swap_in_another_versions_signature(registry, registry_uri, request, keys, tmp_path):
    publish(registry, tmp_path / "second", b"second engine", signer=keys["publisher"].signer, checkpoint="2")
    plant(registry_uri, version_key(1, "signature.sig"), object_bytes(registry, version_key(2, "signature.sig")), request)


def re_sign_with_another_key(registry, registry_uri, request, keys, tmp_path):
    """Forge the engine and its manifest entry consistently, and sign the forgery with the intruder's key."""
    scratch = open_registry(f"file://{tmp_path / 'intruder-registry'}")
    publish(scratch, tmp_path / "forged", b"a forged engine", signer=keys["intruder"].signer)
    for name in ("manifest.json", "signature.sig", f"{TAG}/engine", f"{TAG}/build.json"):
        plant(registry_uri, version_key(1, name), object_bytes(scratch, version_key(1, name)), request)


def remove_signature(registry, registry_uri, request, keys, tmp_path):
    registry.store.delete(version_key(1, "signature.sig"))


ATTACKS = {
    "modified file": (
        modify_engine,
        IntegrityError,
        rf"{TAG}/engine is corrupted: it has 15 bytes with SHA-256 \w+, but the manifest records",
        "valid",
    ),
    "modified manifest": (
        modify_manifest,
        SignatureError,
        "manifest.json has SHA-256 \\w+, but the signature vouches for \\w+: the manifest was changed after signing",
        "invalid",
    ),
    "added file": (add_file, SignatureError, f"holds {TAG}/libplugin.so, which its signed manifest does not list", "valid"),
    "another version's signature": (
        swap_in_another_versions_signature,
        SignatureError,
        f"signature.sig was made for {MODEL}/versions/2, not {MODEL}/versions/1: it was copied from another version",
        "invalid",
    ),
    "signed by another key": (
        re_sign_with_another_key,
        SignatureError,
        "signature.sig does not verify with the trusted key .*publisher.pub: Key mismatch",
        "invalid",
    ),
    "signature removed": (remove_signature, SignatureError, "signature.sig is missing: .* was published unsigned", "missing"),
}


@pytest.mark.parametrize("attack", ATTACKS, ids=list(ATTACKS))
def test_tampered_version_refuses_the_pull_with_the_reason(registry_uri, tmp_path, keys, request, attack):
    tamper, error, reason, signature_status = ATTACKS[attack]
    registry = open_registry(registry_uri)
    publish(registry, tmp_path / "build", b"the real engine", signer=keys["publisher"].signer)
    tamper(registry, registry_uri, request, keys, tmp_path)

    with pytest.raises(error, match=reason) as refused:
        registry.pull(
            MODEL, tmp_path / "deploy", version=1, cache_dir=tmp_path / "cache", require_signature=True, trust=keys["publisher"].trust
        )
    assert "nothing was written" in str(refused.value)
    assert_nothing_fetched(tmp_path)

    report = registry.verify(MODEL, 1, trust=keys["publisher"].trust)
    assert not report.verified and report.problems
    assert report.signature == signature_status
    if attack == "modified file":
        assert [f.status for f in report.files if f.name == f"{TAG}/engine"] == ["modified"]
    if attack == "added file":
        assert report.unexpected == [f"{TAG}/libplugin.so"]


def test_unsigned_pull_still_checks_checksums_but_not_the_signature(tmp_path, keys):
    registry = open_registry(f"file://{tmp_path / 'registry'}")
    publish(registry, tmp_path / "build", b"unsigned engine")
    pulled = registry.pull(MODEL, tmp_path / "deploy", cache_dir=tmp_path / "cache")
    assert pulled.signature_verified_with is None and Path(pulled.path).read_bytes() == b"unsigned engine"

    report = registry.verify(MODEL, 1)
    assert (report.verified, report.signature) == (True, "missing")
    required = registry.verify(MODEL, 1, require_signature=True, trust=keys["publisher"].trust)
    assert not required.verified and required.signature == "missing"


# --- configuration from the environment and the command line ---------------------------------------


def test_environment_signs_publishes_and_requires_signatures_on_pull(tmp_path, keys, monkeypatch):
    uri = f"file://{tmp_path / 'registry'}"
    registry = open_registry(uri)
    monkeypatch.setenv("TRTFORGE_SIGNING_KEY", str(keys["encrypted"].private))
    monkeypatch.setenv("TRTFORGE_SIGNING_KEY_PASSWORD", "correct horse")
    registry.publish(MODEL, [make_target(tmp_path / "one", b"engine 1")], lineage=lineage("1"), environment=ENVIRONMENT)
    monkeypatch.delenv("TRTFORGE_SIGNING_KEY")
    registry.publish(MODEL, [make_target(tmp_path / "two", b"engine 2")], lineage=lineage("2"), environment=ENVIRONMENT)
    assert [v.signed for v in registry.describe(MODEL).versions] == [True, False]

    monkeypatch.setenv("TRTFORGE_REQUIRE_SIGNATURE", "1")
    monkeypatch.setenv("TRTFORGE_TRUSTED_KEY", str(keys["encrypted"].public))
    pulled = registry.pull(MODEL, tmp_path / "deploy1", version=1, cache_dir=tmp_path / "cache")
    assert pulled.signature_verified_with == f"the trusted key {keys['encrypted'].public}"
    with pytest.raises(SignatureError, match="versions/2/signature.sig is missing"):
        registry.pull(MODEL, tmp_path / "deploy2", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "deploy2").exists()
    # An explicit choice on the command line wins over the environment's default.
    assert registry.pull(MODEL, tmp_path / "deploy2", cache_dir=tmp_path / "cache", require_signature=False).version == 2

    result = runner.invoke(app, ["pull", MODEL, "-o", str(tmp_path / "cli"), "--registry", uri, "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 1 and isinstance(result.exception, SignatureError)
    text = runner.invoke(
        app, ["pull", MODEL, "--version", "1", "-o", str(tmp_path / "cli"), "--registry", uri, "--cache-dir", str(tmp_path / "cache")]
    )
    assert text.exit_code == 0 and f"signature verified with the trusted key {keys['encrypted'].public}" in text.stdout


def test_verify_command_reports_and_sets_the_exit_code(tmp_path, keys, request):
    uri = f"file://{tmp_path / 'registry'}"
    registry = open_registry(uri)
    publish(registry, tmp_path / "build", b"engine", signer=keys["publisher"].signer)
    args = ["verify", MODEL, "1", "--registry", uri, "--trusted-key", str(keys["publisher"].public)]

    ok = runner.invoke(app, [*args, "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["signature"] == "valid"
    unchecked = runner.invoke(app, ["verify", MODEL, "1", "--registry", uri])
    assert unchecked.exit_code == 0 and "signature: not checked (no trusted key" in unchecked.stdout

    add_file(registry, uri, request, keys, tmp_path)
    failed = runner.invoke(app, args)
    assert failed.exit_code == 1
    assert "FAILED" in failed.stdout and f"added     {TAG}/libplugin.so" in failed.stdout
    assert "is not listed in the manifest" in failed.stdout


def test_pull_with_signature_needs_only_the_core_install(tmp_path, keys):
    uri = f"file://{tmp_path / 'registry'}"
    publish(open_registry(uri), tmp_path / "build", b"engine v1", signer=keys["publisher"].signer)
    script = (
        "import json, sys\n"
        "from trtforge.cli import app\n"
        "args = ['pull', 'digits-cnn', '-o', sys.argv[1], '--registry', sys.argv[2], '--require-signature', '--trusted-key', sys.argv[3], '--json']\n"
        "try:\n    app(args, standalone_mode=False)\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'prefect', 'tensorrt', 'modelopt') if m in sys.modules]\n"
        "print(json.dumps(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "deploy"), uri, str(keys["publisher"].public)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == []
    assert (tmp_path / "deploy" / "engine").read_bytes() == b"engine v1"


# --- bad configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "configure, problem",
    [
        (lambda k, t: KeySigner(t / "absent.pem"), "cannot read the signing key .*absent.pem: No such file"),
        (lambda k, t: KeySigner(k["rsa"].private), "signing key .*rsa.pem is a RSAPrivateKey key, but signatures use elliptic-curve keys"),
        (lambda k, t: KeySigner(k["publisher"].public), "signing key .*publisher.pub is not a PEM private key"),
        (
            lambda k, t: KeySigner(k["encrypted"].private),
            "Password was not given but private key is encrypted; set TRTFORGE_SIGNING_KEY_PASSWORD",
        ),
        (
            lambda k, t: KeySigner(k["encrypted"].private, password="wrong"),
            "is not a PEM private key, or TRTFORGE_SIGNING_KEY_PASSWORD is wrong",
        ),
    ],
    ids=["missing key", "rsa key", "public key", "no password", "wrong password"],
)
def test_bad_signing_key_fails_the_publish_before_anything_is_written(tmp_path, keys, configure, problem):
    registry = open_registry(f"file://{tmp_path / 'registry'}")
    with pytest.raises(RegistryError, match=problem):
        publish(registry, tmp_path / "build", b"engine", signer=configure(keys, tmp_path))
    assert registry.store.list("") == []


@pytest.mark.parametrize(
    "variables, problem",
    [
        ({"TRTFORGE_SIGNING_KEY": "k.pem", "TRTFORGE_SIGNING_SIGSTORE": "1"}, "choose key-based or Sigstore keyless signing, not both"),
        ({"TRTFORGE_SIGNING_SIGSTORE": "maybe"}, "TRTFORGE_SIGNING_SIGSTORE='maybe' is neither on nor off"),
    ],
)
def test_contradictory_signing_environment_is_refused(tmp_path, monkeypatch, variables, problem):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    registry = open_registry(f"file://{tmp_path / 'registry'}")
    with pytest.raises(RegistryError, match=problem):
        registry.publish(MODEL, [make_target(tmp_path / "build", b"x")], lineage=lineage(), environment=ENVIRONMENT)
    assert registry.store.list("") == []


@pytest.mark.parametrize(
    "pull_arguments, variables, problem",
    [
        ({"require_signature": True}, {}, "a signature is required but no key is trusted: pass --trusted-key"),
        ({}, {"TRTFORGE_REQUIRE_SIGNATURE": "1"}, "a signature is required but no key is trusted"),
        ({"trust": "private"}, {}, "trusted key .*publisher.pem is not a PEM public key"),
        ({"trust": "rsa"}, {}, "trusted key .*rsa.pub is a RSAPublicKey key"),
        ({}, {"TRTFORGE_REQUIRE_SIGNATURE": "yes", "TRTFORGE_TRUSTED_IDENTITY": "ci@example.org"}, "needs both TRTFORGE_TRUSTED_IDENTITY"),
        ({}, {"TRTFORGE_REQUIRE_SIGNATURE": "2"}, "TRTFORGE_REQUIRE_SIGNATURE='2' is neither on nor off"),
    ],
    ids=[
        "no trusted key",
        "no trusted key from environment",
        "private key as trusted key",
        "rsa trusted key",
        "half a Sigstore identity",
        "bad flag",
    ],
)
def test_bad_trust_configuration_is_refused_before_the_pull(tmp_path, keys, monkeypatch, pull_arguments, variables, problem):
    registry = open_registry(f"file://{tmp_path / 'registry'}")
    publish(registry, tmp_path / "build", b"engine", signer=keys["publisher"].signer)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    if "trust" in pull_arguments:
        pair = keys["publisher"] if pull_arguments["trust"] == "private" else keys[pull_arguments["trust"]]
        pull_arguments = {"trust": TrustedKey(pair.private if pull_arguments["trust"] == "private" else pair.public)}
    with pytest.raises(RegistryError, match=problem):
        registry.pull(MODEL, tmp_path / "deploy", cache_dir=tmp_path / "cache", **pull_arguments)
    assert_nothing_fetched(tmp_path)


# --- the signature object is untrusted input ---------------------------------------------------------


@pytest.fixture(scope="module")
def real_signature(keys) -> bytes:
    digests = {"manifest.json": "ab" * 32, f"{TAG}/engine": "cd" * 32}
    return VersionSigner(keys["publisher"].signer).sign(f"{MODEL}/versions/1", digests, ["lock.json", "signature.sig"])


@settings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=300) | json_values.map(lambda value: json.dumps(value).encode()))
def test_arbitrary_signature_bytes_only_ever_raise_signature_error(keys, raw):
    with pytest.raises(SignatureError, match="registry/signature.sig does not verify with the trusted key"):
        VersionVerifier(keys["publisher"].trust).verify(raw, "registry/signature.sig")


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_a_signature_changed_anywhere_fails_or_vouches_for_the_same_content(keys, real_signature, data):
    verifier = VersionVerifier(keys["publisher"].trust)
    original = verifier.verify(real_signature, "signature.sig")
    assert original.subject == f"{MODEL}/versions/1" and original.digests["manifest.json"] == "ab" * 32
    position = data.draw(st.integers(0, len(real_signature) - 1))
    replacement = data.draw(st.integers(0, 255).filter(lambda byte: byte != real_signature[position]))
    changed = real_signature[:position] + bytes([replacement]) + real_signature[position + 1 :]
    try:
        result = verifier.verify(changed, "signature.sig")
    except SignatureError:
        return
    assert result == original
