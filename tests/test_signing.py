"""Document signatures (pipeline.signing): what they cover and how they fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.signing import (
    SharedKey,
    SignatureError,
    generate_key_pair,
    load_private_key,
    load_public_key,
    sign_document,
    verify_document,
)

DOC = {"hospital": "Hôpital Sainte-Anne", "log": {"accesses": 7, "sources": {"b": 1, "a": 6}}}


def test_a_signature_covers_the_content_not_its_layout(tmp_path: Path) -> None:
    key, pub = generate_key_pair(tmp_path / "h")
    signer, verifier = load_private_key(key), load_public_key(pub)
    assert signer.fingerprint == verifier.fingerprint
    signed = sign_document(DOC, signer)
    # written out with other indentation and key order, and read back: still verifies
    text = json.dumps(signed, indent=4, sort_keys=False, ensure_ascii=True)
    again = json.loads(text)
    again["log"] = {"sources": {"a": 6, "b": 1}, "accesses": 7}
    verify_document(again, verifier)
    # a signature is over the body only: signing twice gives one valid signature
    verify_document(sign_document(signed, signer), verifier)
    for changed in (
        {**signed, "hospital": "Hopital Sainte-Anne"},
        {**signed, "log": {"accesses": 7, "sources": {"a": 6, "b": 2}}},
        {**signed, "note": "added"},
    ):
        with pytest.raises(SignatureError, match="altered"):
            verify_document(changed, verifier)


def test_broken_signatures_are_refused_in_words(tmp_path: Path) -> None:
    key, pub = generate_key_pair(tmp_path / "h")
    verifier = load_public_key(pub)
    signed = sign_document(DOC, load_private_key(key))
    bad = {**signed, "signature": {**signed["signature"], "value": "not base64!"}}
    with pytest.raises(SignatureError, match="altered"):
        verify_document(bad, verifier)
    with pytest.raises(SignatureError, match="not signed"):
        verify_document({**DOC, "signature": "yes"}, verifier, "County General")
    shared = sign_document(DOC, SharedKey(b"k" * 32))
    verify_document(shared, SharedKey(b"k" * 32))
    with pytest.raises(SignatureError, match="signed with HMAC-SHA256"):
        verify_document(shared, verifier)
    with pytest.raises(SignatureError, match="another key"):
        verify_document(shared, SharedKey(b"j" * 32))
    assert "k" * 16 not in json.dumps(shared)  # the shared key is named, never written


def test_key_files_that_cannot_sign_are_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.key").write_text("hello")
    (tmp_path / "junk.key").chmod(0o600)
    with pytest.raises(SignatureError, match="not a PEM private key"):
        load_private_key(tmp_path / "junk.key")
    with pytest.raises(SignatureError, match="not a PEM public key"):
        load_public_key(tmp_path / "junk.key")
    with pytest.raises(SignatureError, match="No such file"):
        load_private_key(tmp_path / "none.key")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ecdsa = ec.generate_private_key(ec.SECP256R1())
    pem = ecdsa.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "ec.key").write_bytes(pem)
    (tmp_path / "ec.key").chmod(0o600)
    with pytest.raises(SignatureError, match="an Ed25519 key is needed"):
        load_private_key(tmp_path / "ec.key")
