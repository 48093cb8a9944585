"""Signatures on the documents emrwatch hands to someone outside the hospital (the security
assessment a regulator collects).

Two kinds:

* **Ed25519** (public key). The hospital signs with a private key only it holds
  (``emrwatch assessment-keygen``); the regulator verifies with the hospital's public key,
  which is no secret: one file per hospital, sent once, safe to mail or publish. Nobody who
  holds only the public key can sign.
* **HMAC-SHA256** (a shared secret). Simpler, but whoever can verify can also sign, and the
  regulator has to keep one secret per hospital.

A signature covers the document's canonical JSON (sorted keys, no spaces, UTF-8) without
its ``signature`` member, and is stored in it as ``{"method", "key_fingerprint", "value"}``.
The fingerprint names the key (for HMAC: never the key itself), so a document signed under
another key is told apart from an altered one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pipeline.history import key_fingerprint

HMAC_SHA256 = "HMAC-SHA256"
ED25519 = "Ed25519"


class SignatureError(ValueError):
    """A key that cannot be used, or a document whose signature does not hold."""


def canonical(doc: dict[str, Any]) -> bytes:
    """What a signature covers: ``doc`` without ``signature``, as canonical JSON."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class Signer(Protocol):
    @property
    def method(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    def sign_bytes(self, data: bytes) -> str: ...


class Verifier(Protocol):
    @property
    def method(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    def check(self, data: bytes, value: str) -> bool: ...


@dataclass(frozen=True)
class SharedKey:
    """An HMAC-SHA256 key shared by the signer and the verifier (signs and verifies)."""

    key: bytes
    method: str = HMAC_SHA256

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.key)

    def sign_bytes(self, data: bytes) -> str:
        return hmac.new(self.key, data, hashlib.sha256).hexdigest()

    def check(self, data: bytes, value: str) -> bool:
        return hmac.compare_digest(str(value), self.sign_bytes(data))


def _public_fingerprint(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key_fingerprint(raw)


@dataclass(frozen=True)
class PrivateKey:
    """An Ed25519 private key: signs."""

    key: Ed25519PrivateKey
    method: str = ED25519

    @property
    def fingerprint(self) -> str:
        return _public_fingerprint(self.key.public_key())

    def sign_bytes(self, data: bytes) -> str:
        return base64.b64encode(self.key.sign(data)).decode()


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key: verifies, cannot sign."""

    key: Ed25519PublicKey
    method: str = ED25519

    @property
    def fingerprint(self) -> str:
        return _public_fingerprint(self.key)

    def check(self, data: bytes, value: str) -> bool:
        try:
            self.key.verify(base64.b64decode(str(value), validate=True), data)
        except (InvalidSignature, ValueError):
            return False
        return True


def shared_key_from_env(name: str) -> SharedKey:
    """The HMAC key in ``$name`` (16 bytes or more)."""
    key = os.environ.get(name, "").encode()
    if not key:
        raise SignatureError(f"${name} is not set")
    if len(key) < 16:
        raise SignatureError(f"${name}: the signing key must be at least 16 bytes")
    return SharedKey(key)


def _passphrase(env: str | None) -> bytes | None:
    if not env:
        return None
    value = os.environ.get(env, "")
    if not value:
        raise SignatureError(f"${env} (the private key's passphrase) is not set")
    return value.encode()


def load_private_key(path: str | Path, passphrase_env: str | None = None) -> PrivateKey:
    """The Ed25519 private key in the PEM file ``path``, which only its owner may read (as
    ssh insists); encrypted keys take their passphrase from ``$passphrase_env``."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        data = p.read_bytes()
    except OSError as exc:
        raise SignatureError(f"{p}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SignatureError(
            f"{p}: a private key must be readable by its owner only (chmod 600 {p})"
        )
    try:
        key = serialization.load_pem_private_key(data, password=_passphrase(passphrase_env))
    except TypeError as exc:  # encrypted without a passphrase, or a passphrase for a plain key
        raise SignatureError(f"{p}: {exc} (--sign-key-passphrase-env)") from None
    except ValueError as exc:
        raise SignatureError(f"{p}: not a PEM private key, or a wrong passphrase ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{p}: an Ed25519 key is needed (emrwatch assessment-keygen)")
    return PrivateKey(key)


def load_public_key(path: str | Path) -> PublicKey:
    """The Ed25519 public key in the PEM file ``path``."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise SignatureError(f"{p}: {exc.strerror or exc}") from None
    if b"PRIVATE KEY" in data:
        raise SignatureError(f"{p}: this is a private key; give the public one (.pub)")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SignatureError(f"{p}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{p}: an Ed25519 public key is needed")
    return PublicKey(key)


def generate_key_pair(prefix: str | Path, passphrase_env: str | None = None) -> tuple[Path, Path]:
    """Write a new Ed25519 pair: ``prefix.key`` (private, owner-only, encrypted with
    ``$passphrase_env`` if given) and ``prefix.pub`` (public). Existing files are kept: a
    key the regulator already trusts is never overwritten."""
    key_path, pub_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for p in (key_path, pub_path):
        if p.exists():
            raise SignatureError(f"{p} exists: a key already given out is never overwritten")
    secret = _passphrase(passphrase_env)
    key = Ed25519PrivateKey.generate()
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(secret) if secret else serialization.NoEncryption()
    )
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    pub_path.write_bytes(public)
    return key_path, pub_path


def sign_document(doc: dict[str, Any], signer: Signer) -> dict[str, Any]:
    """``doc`` with a ``signature`` over its canonical JSON."""
    sig = {"method": signer.method, "key_fingerprint": signer.fingerprint,
           "value": signer.sign_bytes(canonical(doc))}  # fmt: skip
    return {**doc, "signature": sig}


def verify_document(doc: dict[str, Any], verifier: Verifier, who: str = "document") -> None:
    """Raise :class:`SignatureError` unless ``doc`` carries a valid signature by
    ``verifier``'s key, saying which: not signed, signed the other way, under another key,
    or altered."""
    sig = doc.get("signature")
    if not isinstance(sig, dict) or "value" not in sig:
        raise SignatureError(f"{who}: not signed")
    if sig.get("method") != verifier.method:
        raise SignatureError(
            f"{who}: signed with {sig.get('method')}, but the key given is {verifier.method}"
        )
    if sig.get("key_fingerprint") != verifier.fingerprint:
        raise SignatureError(
            f"{who}: signed under another key (fingerprint {sig.get('key_fingerprint')}, "
            f"the key given is {verifier.fingerprint})"
        )
    if not verifier.check(canonical(doc), str(sig["value"])):
        raise SignatureError(f"{who}: the signature does not match: the document was altered")
