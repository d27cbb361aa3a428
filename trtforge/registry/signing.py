"""Signed versions: a model-signing signature over a version's manifest and every file in it.

What is signed is the statement model-signing's own signer builds for a model folder (one
SHA-256 per file; an in-toto statement in a DSSE envelope in a Sigstore bundle), here for the
folder of a version: ``manifest.json`` and ``<tag>/<file>`` of every target, with the lock
and the signature itself left out. The digests are the ones the registry read back from
storage after uploading, so nothing is hashed twice, and a copy of a version's folder also
verifies with model-signing's own verifier.

Two signers: an elliptic-curve private key (PEM; P-256, P-384 or P-521) given by path, or
Sigstore keyless signing with the ambient OIDC identity of a CI job (which needs network
access to Sigstore). model-signing has no public call that signs digests it did not compute
itself, so this module uses the building blocks its public API is made of (manifest,
payload, signers, verifiers); the exact pin of model-signing in pyproject.toml keeps them
stable.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from trtforge.errors import IntegrityError, RegistryError

SIGNING_KEY_ENV = "TRTFORGE_SIGNING_KEY"
SIGNING_KEY_PASSWORD_ENV = "TRTFORGE_SIGNING_KEY_PASSWORD"
SIGSTORE_ENV = "TRTFORGE_SIGNING_SIGSTORE"
REQUIRE_ENV = "TRTFORGE_REQUIRE_SIGNATURE"
TRUSTED_KEY_ENV = "TRTFORGE_TRUSTED_KEY"
TRUSTED_IDENTITY_ENV = "TRTFORGE_TRUSTED_IDENTITY"
TRUSTED_ISSUER_ENV = "TRTFORGE_TRUSTED_OIDC_ISSUER"

_CURVES = ("secp256r1", "secp384r1", "secp521r1")
_NEW_KEY_HINT = (
    "create one with `openssl ecparam -name prime256v1 -genkey -noout -out signing-key.pem` and give pullers "
    "`openssl ec -in signing-key.pem -pubout -out signing-key.pub`"
)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


class SignatureError(IntegrityError):
    """A version's signature is missing, does not verify, or does not cover exactly what the version holds."""


@dataclass(frozen=True)
class KeySigner:
    """Sign with an elliptic-curve private key in a PEM file."""

    private_key: Path
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SigstoreSigner:
    """Sign keyless through Sigstore with the OIDC identity of the environment (a CI job's ambient token)."""

    staging: bool = False
    identity_token: str | None = field(default=None, repr=False)


Signer = KeySigner | SigstoreSigner


@dataclass(frozen=True)
class TrustedKey:
    """Accept signatures made with the private key of this PEM public key."""

    public_key: Path


@dataclass(frozen=True)
class TrustedIdentity:
    """Accept Sigstore signatures whose certificate names this identity, issued by this OIDC issuer."""

    identity: str
    oidc_issuer: str
    staging: bool = False


Trust = TrustedKey | TrustedIdentity


@dataclass(frozen=True)
class SignedContents:
    """What a valid signature vouches for: its subject and a SHA-256 per file name."""

    subject: str
    digests: dict[str, str]


def _environ(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def env_flag(name: str, env: Mapping[str, str] | None = None) -> bool:
    value = _environ(env).get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise RegistryError(f"{name}={value!r} is neither on nor off: set it to 1 or 0")


def signer_from_env(env: Mapping[str, str] | None = None) -> Signer | None:
    """$TRTFORGE_SIGNING_KEY (with $TRTFORGE_SIGNING_KEY_PASSWORD if encrypted), or $TRTFORGE_SIGNING_SIGSTORE=1; None if neither."""
    env = _environ(env)
    key = env.get(SIGNING_KEY_ENV, "").strip()
    sigstore = env_flag(SIGSTORE_ENV, env)
    if key and sigstore:
        raise RegistryError(f"both {SIGNING_KEY_ENV} and {SIGSTORE_ENV} are set: choose key-based or Sigstore keyless signing, not both")
    if key:
        return KeySigner(Path(key), env.get(SIGNING_KEY_PASSWORD_ENV) or None)
    if sigstore:
        return SigstoreSigner()
    return None


def trust_from_env(env: Mapping[str, str] | None = None) -> Trust | None:
    """$TRTFORGE_TRUSTED_KEY, or $TRTFORGE_TRUSTED_IDENTITY with $TRTFORGE_TRUSTED_OIDC_ISSUER; None if neither."""
    env = _environ(env)
    key = env.get(TRUSTED_KEY_ENV, "").strip()
    identity = env.get(TRUSTED_IDENTITY_ENV, "").strip()
    issuer = env.get(TRUSTED_ISSUER_ENV, "").strip()
    if key and identity:
        raise RegistryError(f"both {TRUSTED_KEY_ENV} and {TRUSTED_IDENTITY_ENV} are set: trust a key or a Sigstore identity, not both")
    if key:
        return TrustedKey(Path(key))
    if identity or issuer:
        if not (identity and issuer):
            raise RegistryError(
                f"Sigstore trust needs both {TRUSTED_IDENTITY_ENV} (e.g. the CI workflow's identity) and {TRUSTED_ISSUER_ENV}"
            )
        return TrustedIdentity(identity, issuer)
    return None


def signature_required_by_env(env: Mapping[str, str] | None = None) -> bool:
    return env_flag(REQUIRE_ENV, env)


def _reason(err: Exception) -> str:
    from cryptography.exceptions import InvalidSignature

    if isinstance(err, InvalidSignature):
        return "the signature was not made with this key, or what it signs was altered"
    text = " ".join(str(err).split())
    return (text[:300] or type(err).__name__).rstrip(". ")


def _read_pem(path: Path, what: str, fix: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise RegistryError(f"cannot read the {what} {path}: {err.strerror}; {fix}") from None


def _check_curve(key, path: Path, what: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) or key.curve.name not in _CURVES:
        kind = key.curve.name if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) else type(key).__name__
        raise RegistryError(
            f"{what} {path} is a {kind} key, but signatures use elliptic-curve keys on P-256, P-384 or P-521: {_NEW_KEY_HINT}"
        )


class VersionSigner:
    """A signer loaded and checked up front, so that a bad key fails a publish before anything is uploaded."""

    def __init__(self, config: Signer):
        self.config = config
        if isinstance(config, KeySigner):
            self._signer = self._load_key(config)
        elif isinstance(config, SigstoreSigner):
            self._signer = self._load_sigstore(config)
        else:
            raise TypeError(f"signer must be a KeySigner or a SigstoreSigner, not {type(config).__name__}")

    @staticmethod
    def _load_key(config: KeySigner):
        from cryptography.hazmat.primitives import serialization

        path = Path(config.private_key)
        fix = f"set {SIGNING_KEY_ENV} to a PEM elliptic-curve private key"
        data = _read_pem(path, "signing key", fix)
        password = config.password.encode() if config.password else None
        try:
            key = serialization.load_pem_private_key(data, password)
        except TypeError as err:
            raise RegistryError(
                f"signing key {path}: {_reason(err)}; set {SIGNING_KEY_PASSWORD_ENV} to its password, or unset it"
            ) from None
        except ValueError:
            raise RegistryError(f"signing key {path} is not a PEM private key, or {SIGNING_KEY_PASSWORD_ENV} is wrong; {fix}") from None
        _check_curve(key, path, "signing key")
        from model_signing._signing import sign_ec_key

        return sign_ec_key.Signer(path, password)

    @staticmethod
    def _load_sigstore(config: SigstoreSigner):
        try:
            from model_signing._signing import sign_sigstore

            return sign_sigstore.Signer(use_ambient_credentials=True, use_staging=config.staging, identity_token=config.identity_token)
        except Exception as err:  # sigstore fetches its trust root over the network and fails in many ways
            raise RegistryError(
                f"cannot set up Sigstore signing ({type(err).__name__}: {_reason(err)}): keyless signing needs network access "
                f"to Sigstore; sign with a key instead by setting {SIGNING_KEY_ENV}"
            ) from None

    def sign(self, subject: str, digests: Mapping[str, str], unsigned: Iterable[str]) -> bytes:
        """The signature object (a Sigstore bundle, JSON) over ``digests``: file name -> SHA-256 (hex)."""
        from model_signing import manifest
        from model_signing._hashing.hashing import Digest
        from model_signing._signing.signing import Payload

        serialization = manifest._FileSerialization("sha256", allow_symlinks=False, ignore_paths=[PurePosixPath(n) for n in unsigned])
        items = [
            manifest.FileManifestItem(path=PurePosixPath(name), digest=Digest("sha256", bytes.fromhex(sha256)))
            for name, sha256 in sorted(digests.items())
        ]
        payload = Payload(manifest.Manifest(subject, items, serialization))
        try:
            signature = self._signer.sign(payload)
        except Exception as err:  # Sigstore: no OIDC token, network, transparency log; a key signer does not fail here
            raise RegistryError(
                f"signing {subject} failed ({type(err).__name__}: {_reason(err)}): Sigstore keyless signing needs an OIDC "
                f"identity (a CI job allowed to request an ID token); or sign with a key by setting {SIGNING_KEY_ENV}"
            ) from None
        with tempfile.TemporaryDirectory(prefix="trtforge-sign-") as folder:
            path = Path(folder) / "signature.sig"
            signature.write(path)
            return path.read_bytes()


class VersionVerifier:
    """Checks signature objects against one trusted key or Sigstore identity."""

    def __init__(self, trust: Trust):
        self.trust = trust
        if isinstance(trust, TrustedKey):
            self.description = f"the trusted key {trust.public_key}"
            self._verifier, self._signature_type = self._load_key(trust)
        elif not isinstance(trust, TrustedIdentity):
            raise TypeError(f"trust must be a TrustedKey or a TrustedIdentity, not {type(trust).__name__}")
        else:
            self.description = f"the Sigstore identity {trust.identity} ({trust.oidc_issuer})"
            self._verifier, self._signature_type = self._load_sigstore(trust)

    @staticmethod
    def _load_key(trust: TrustedKey):
        from cryptography.hazmat.primitives import serialization

        path = Path(trust.public_key)
        fix = f"pass --trusted-key or set {TRUSTED_KEY_ENV} to the PEM public key of the publisher's signing key"
        data = _read_pem(path, "trusted key", fix)
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError):
            raise RegistryError(
                f"trusted key {path} is not a PEM public key; {fix} (`openssl ec -in signing-key.pem -pubout` prints it)"
            ) from None
        _check_curve(key, path, "trusted key")
        from model_signing._signing import sign_ec_key, sign_sigstore_pb

        return sign_ec_key.Verifier(path), sign_sigstore_pb.Signature

    @staticmethod
    def _load_sigstore(trust: TrustedIdentity):
        try:
            from model_signing._signing import sign_sigstore

            verifier = sign_sigstore.Verifier(identity=trust.identity, oidc_issuer=trust.oidc_issuer, use_staging=trust.staging)
        except Exception as err:  # the trust root comes over the network
            raise RegistryError(
                f"cannot set up Sigstore verification ({type(err).__name__}: {_reason(err)}): it needs network access to "
                f"Sigstore's trust root; verify with a key instead ({TRUSTED_KEY_ENV})"
            ) from None
        return verifier, sign_sigstore.Signature

    def verify(self, signature: bytes, where: str) -> SignedContents:
        """The signed contents of a signature object; SignatureError naming ``where`` unless it verifies."""
        try:
            with tempfile.TemporaryDirectory(prefix="trtforge-verify-") as folder:
                path = Path(folder) / "signature.sig"
                path.write_bytes(signature)
                parsed = self._signature_type.read(path)
                # model-signing prints format warnings; keep stdout for the command's own output (--json).
                with contextlib.redirect_stdout(sys.stderr):
                    signed = self._verifier.verify(parsed)
        except Exception as err:  # the signature object is untrusted: its parser may raise anything
            raise SignatureError(f"{where} does not verify with {self.description}: {_reason(err)}") from None
        digests = {}
        for descriptor in signed.resource_descriptors():
            if descriptor.digest.algorithm != "sha256":
                raise SignatureError(f"{where} signs {descriptor.identifier} with {descriptor.digest.algorithm}, not SHA-256")
            digests[descriptor.identifier] = descriptor.digest.digest_hex
        return SignedContents(subject=signed.model_name, digests=digests)
