"""Time-based one-time passwords (RFC 6238, on HOTP of RFC 4226): the feed's second factor.

The secret (base32, 160 bits from :func:`new_secret`) lives with the user's entry in the
config, as the password hash does, and in the user's authenticator app (FreeOTP, Google
Authenticator, a hospital's hardware token…), which reads it from :func:`provisioning_uri`.
Codes are 6 digits for a 30-second step, SHA-1: what every authenticator app shows.

RFC 6238's test vector (SHA-1, 8 digits, the ASCII secret ``12345678901234567890``):

>>> secret = base64.b32encode(b"12345678901234567890").decode()
>>> code_at(secret, 59, digits=8), code_at(secret, 1111111109, digits=8)
('94287082', '07081804')
>>> matching_step(secret, code_at(secret, 1000), 1000 + 30) == 1000 // 30
True
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from urllib.parse import quote, urlencode

STEP_S = 30
DIGITS = 6


def new_secret() -> str:
    """A fresh random secret, base32 without padding (160 bits, as RFC 4226 advises)."""
    return base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=")


def secret_bytes(secret: str) -> bytes:
    """The key in a base32 secret (spaces and case ignored, padding optional); ValueError
    if it is not base32 or is shorter than 128 bits."""
    s = secret.replace(" ", "").upper()
    try:
        key = base64.b32decode(s + "=" * (-len(s) % 8))
    except (binascii.Error, ValueError):
        raise ValueError("not base32") from None
    if len(key) < 16:
        raise ValueError(f"{len(key) * 8} bits: at least 128 are needed")
    return key


def _hotp(key: bytes, counter: int, digits: int) -> str:
    mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)


def code_at(secret: str, t: float, digits: int = DIGITS) -> str:
    """The code an authenticator shows at Unix time ``t``."""
    return _hotp(secret_bytes(secret), int(t // STEP_S), digits)


def matching_step(secret: str, code: str, t: float, window: int = 1) -> int | None:
    """The time step whose code ``code`` is, looking ``window`` steps either side of ``t``
    (a phone's clock a little off, a code typed as it changed); None if none."""
    code = code.replace(" ", "").strip()
    if len(code) != DIGITS or not code.isdigit():
        return None
    key = secret_bytes(secret)
    now = int(t // STEP_S)
    found = None
    for step in range(now - window, now + window + 1):  # every candidate, in constant time
        if hmac.compare_digest(_hotp(key, step, DIGITS), code):
            found = step
    return found


def provisioning_uri(secret: str, username: str, issuer: str) -> str:
    """The ``otpauth://`` URI an authenticator app reads (as a QR code or pasted)."""
    label = quote(f"{issuer}:{username}", safe="")
    query = urlencode({"secret": secret, "issuer": issuer, "algorithm": "SHA1",
                       "digits": DIGITS, "period": STEP_S})  # fmt: skip
    return f"otpauth://totp/{label}?{query}"
