"""Network helpers shared by the listening connectors (ATNA syslog, HL7 MLLP).

* :func:`server_ssl_context` builds a TLS server context (TLS 1.2+), optionally requiring
  client certificates signed by ``ca_file`` (mutual TLS).
* :func:`peer_identity` renders the subject of the peer certificate of a TLS socket as
  ``"CN=emr01,O=Hospital"`` (``""`` for plain sockets or peers without a certificate).
* :func:`subject_cn` picks the common name out of such a string.

>>> subject_cn("CN=emr01,O=Hospital")
'emr01'
>>> subject_cn("O=Hospital")
''
>>> format_subject(((("organizationName", "Hospital"),), (("commonName", "emr01"),)))
'CN=emr01,O=Hospital'
>>> import socket
>>> a, b = socket.socketpair()
>>> peer_identity(a)
''
>>> a.close(); b.close()
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "format_subject",
    "peer_address",
    "peer_identity",
    "server_ssl_context",
    "subject_cn",
    "subject_allowed",
]

#: short names of the usual X.509 subject attributes (RFC 4514)
_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
    "emailAddress": "emailAddress",
}


def server_ssl_context(
    cert_file: str, key_file: str, ca_file: str = "", require_client_cert: bool = False
) -> ssl.SSLContext:
    """A TLS server context presenting ``cert_file``/``key_file``.

    With ``ca_file`` client certificates are verified against it (optional unless
    ``require_client_cert``); ``require_client_cert`` without ``ca_file`` falls back to the
    system trust store. Raises ``ValueError`` when the certificate or key is missing."""
    if not cert_file:
        raise ValueError("TLS needs cert_file (PEM certificate chain)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No TLS 1.3 session tickets: log senders never read from the connection, so tickets
    # would sit unread in their receive buffer, and closing a socket with unread data sends
    # a RST that makes our side drop frames it has not read yet.
    ctx.num_tickets = 0
    try:
        ctx.load_cert_chain(cert_file, key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"cannot load certificate {cert_file!r} / key {key_file!r}: {exc}"
        ) from None
    if ca_file:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load CA file {ca_file!r}: {exc}") from None
    elif require_client_cert:
        ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif ca_file:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def format_subject(subject: Iterable[Iterable[tuple[str, Any]]]) -> str:
    """``ssl.getpeercert()['subject']`` as an RFC 4514 string: most specific RDN first
    (``"CN=emr01,O=Hospital"``), special characters escaped."""
    rdns: list[str] = []
    for rdn in subject:
        rdns.append("+".join(f"{_SHORT.get(k, k)}={_escape(str(v))}" for k, v in rdn))
    return ",".join(reversed(rdns))


def _escape(value: str) -> str:
    out = "".join("\\" + ch if ch in '",+;<>\\' else ch for ch in value)
    if out[:1] in ("#", " "):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def _split_subject(subject: str) -> list[tuple[str, str]]:
    """RFC 4514 string → [(attribute, unescaped value)] (multi-valued RDNs flattened)."""
    parts: list[tuple[str, str]] = []
    key, value, in_key, i = "", "", True, 0
    while i <= len(subject):
        ch = subject[i] if i < len(subject) else ","
        if ch == "\\" and i + 1 < len(subject):
            value += subject[i + 1] if not in_key else ""
            i += 2
            continue
        if in_key and ch == "=":
            in_key = False
        elif ch in ",+":
            if key.strip():
                parts.append((key.strip(), value.strip()))
            key, value, in_key = "", "", True
        elif in_key:
            key += ch
        else:
            value += ch
        i += 1
    return parts


def peer_identity(sock: socket.socket) -> str:
    """The subject of the verified peer certificate of a TLS socket, ``""`` otherwise
    (plain socket, no certificate, or a certificate that was not verified)."""
    if not isinstance(sock, ssl.SSLSocket):
        return ""
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):
        return ""
    if not cert:
        return ""
    subject: Any = cert.get("subject", ())  # typeshed's union misses the RDN nesting
    return format_subject(subject)


def subject_cn(subject: str) -> str:
    """The ``CN`` of a subject rendered by :func:`peer_identity` (``""`` without one).

    >>> subject_cn(r"CN=Smith\\, John,O=Hospital")
    'Smith, John'
    """
    for key, value in _split_subject(subject):
        if key.upper() == "CN":
            return value
    return ""


def subject_allowed(subject: str, allowed: Sequence[str]) -> bool:
    """Whether a peer subject passes an allow-list: an empty list allows anyone; otherwise
    an entry matches the whole subject string or its CN (exact, case-sensitive)."""
    if not allowed:
        return True
    cn = subject_cn(subject)
    return any(a == subject or (cn and a == cn) for a in allowed)


def peer_address(addr: Any) -> str:
    """``ip:port`` of a socket address (``[v6]:port`` for IPv6)."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)
