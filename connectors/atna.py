"""IHE ATNA: DICOM PS3.15 audit messages over syslog → canonical :class:`AccessEvent`.

The ``atna-syslog`` connector listens for RFC 5424 syslog messages whose MSG is a DICOM
``AuditMessage`` (the IHE ATNA "Record Audit Event" transaction, ITI-20):

* ``transport: tls`` (RFC 5425, the ATNA default, port 6514): TLS, octet-counting frames
  ``LEN SP MSG``; optional mutual TLS (``require_client_cert``) and an allow-list of peer
  certificate subjects / CNs (``allowed_subjects``);
* ``transport: tcp``: the same framing without TLS;
* ``transport: udp`` (RFC 5426, port 514): one message per datagram.

On TCP and TLS non-transparent framing (one message per line, RFC 6587 §3.4.2) is
tolerated too: a frame starting with ``<`` instead of a digit ends at the line feed after
``</AuditMessage>`` (pretty-printed XML spans lines), or at the first line feed if the
line holds no audit XML. A framing error (a bad length, an oversized frame, a connection
closed inside a frame) cannot be resynchronised, so the bytes from the bad frame on become
one dead-letter record (its ``meta["framing_error"]`` makes :meth:`normalize` raise
:class:`EventError` with the reason) and that connection is closed; the listener and the
other connections carry on.

Every TCP/TLS connection leaves a ledger receipt when it closes (records, bytes, peer, TLS
subject, SHA-256 of the bytes received; status ``accepted``, or ``error`` with the reason
after a framing or I/O error); a refused connection (failed handshake, missing client
certificate, subject not allowed, too many connections) leaves a ``rejected`` receipt with
the reason. UDP peers get one receipt each when the connector closes.

Mapping (the same rules as :mod:`connectors.fhir` for the equivalent FHIR AuditEvent,
CONTRACTS §3): see :func:`parse_audit_message`. Syslog has no application-level
acknowledgement: the sender cannot know what was lost, so every message is written to a
spool (:mod:`connectors.spool`) before the next one is read. With a spool directory (the
default under ``emrwatch connectors run``: ``<ingest.state_dir>/spool/<name>``) a crash
loses nothing the listener took: after a restart the spool is read on from the saved
checkpoint. Without one (``spool_dir: memory``) the spool is a bounded queue in memory. A
full spool stops reading from TCP senders (back-pressure).

>>> from emrwatch.events import AccessEvent
>>> e = AccessEvent.from_dict({"event_id": "e1", "ts": "2026-03-01T08:00:00+08:00",
...     "user_id": "dr7", "patient_id": "p9", "action": "export", "workstation": "ws-3",
...     "source": "emr"})
>>> msg = to_audit_message(e)
>>> msg[:6]
b'<110>1'
>>> back = parse_atna(msg)
>>> back.to_dict() == e.to_dict()
True
>>> octet_frame(b"<13>1 - - - - - -")[:3]
b'17 '
>>> parse_cx("12345^^^&1.2.3&ISO")
('12345', '', '1.2.3')
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as StdET
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import quoteattr

import defusedxml
import defusedxml.ElementTree as SafeET

from connectors.audit_codes import (
    ACTION_CODES,
    ACTION_OUT,
    CATEGORY_OUT,
    DCM,
    DICOM_EXPORT,
    EMERGENCY_OVERRIDE,
    EMERGENCY_PURPOSES,
    OUTCOMES,
    SOURCE_ROLE,
    event_category,
    is_emergency,
    refine_action,
    requestor_candidates,
)
from connectors.base import Connector, ConnectorConfigError, Ledger, Output, RawRecord
from connectors.net import peer_address, peer_identity, server_ssl_context, subject_allowed
from connectors.spool import FileSpool, MemorySpool, Spool, SpoolError
from emrwatch.events import AccessEvent, EventError, parse_ts

__all__ = [
    "AtnaSyslogConfig",
    "AtnaSyslogConnector",
    "SyslogMessage",
    "octet_frame",
    "parse_atna",
    "parse_audit_message",
    "parse_cx",
    "split_frames",
    "split_syslog",
    "to_audit_message",
]

log = logging.getLogger(__name__)

#: default ports when ``port`` is not set
DEFAULT_PORTS = {"tls": 6514, "tcp": 514, "udp": 514}
#: the SD-ID prefix and parameter carrying a message's own event id (RFC 5612 example PEN)
EVENT_ID_SD = "emrwatch@32473"
EVENT_ID_PARAM = "eventId"
_BOM = b"\xef\xbb\xbf"


# =========================================================================== configuration
def _f(default: Any, text: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class AtnaSyslogConfig:
    transport: Literal["tls", "tcp", "udp"] = _f(
        "tls", "tls (RFC 5425, octet counting), tcp (same framing, no TLS) or udp (RFC 5426)"
    )
    host: str = _f("127.0.0.1", "address to listen on (0.0.0.0 / :: for every interface)")
    port: int | None = _f(
        None, "port to listen on; 0 picks a free one; default 6514 (tls) or 514 (tcp, udp)"
    )
    cert_file: str = _f("", "tls: PEM server certificate (chain)")
    key_file: str = _f("", "tls: PEM private key (empty: in cert_file)")
    ca_file: str = _f("", "tls: PEM CA bundle that client certificates must chain to")
    require_client_cert: bool = _f(False, "tls: mutual TLS, refuse clients without a valid cert")
    allowed_subjects: list[str] = _f(
        [],
        "tls: client certificate CNs or full subjects ('CN=emr01,O=Hospital') allowed; "
        "empty: any (verified) client",
    )
    max_message_bytes: int = _f(1 << 20, "largest syslog message accepted (frame or datagram)")
    spool_dir: str = _f(
        "",
        "where received messages wait for the broker, surviving a crash; empty: "
        "<ingest.state_dir>/spool/<name> under 'emrwatch connectors run', else memory; "
        "'memory': a queue in memory (a crash loses what it holds)",
    )
    spool_max_bytes: int = _f(1 << 30, "spool on disk: largest backlog before senders wait")
    spool_fsync_s: float = _f(
        0.2, "spool on disk: fsync at most this often (a power cut loses at most this much)"
    )
    queue_size: int = _f(10000, "spool in memory: messages buffered before senders wait")
    max_connections: int = _f(256, "concurrent TCP/TLS connections; more are refused")
    idle_timeout_s: float = _f(600.0, "close a TCP/TLS connection silent this long (0: never)")
    handshake_timeout_s: float = _f(10.0, "tls: seconds allowed for the TLS handshake")
    allow_lf_framing: bool = _f(True, "tcp/tls: also accept one-message-per-line framing")
    strip_user_domain: bool = _f(
        False, "user ids 'alice@HOSP' / 'alias<alice@HOSP>' → 'alice' (default: kept as sent)"
    )
    patient_id_authorities: list[str] = _f(
        [],
        "only patient ids (CX) from these assigning authorities (namespace or OID); "
        "empty: the first patient object",
    )

    def validate(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.max_message_bytes < 64:
            raise ValueError("max_message_bytes must be at least 64")
        if self.queue_size < 1 or self.max_connections < 1:
            raise ValueError("queue_size and max_connections must be at least 1")
        if self.spool_max_bytes < 1 << 20 or self.spool_fsync_s < 0:
            raise ValueError("spool_max_bytes must be at least 1 MiB, spool_fsync_s >= 0")
        if self.transport == "tls":
            if not self.cert_file:
                raise ValueError("transport tls needs cert_file (and key_file)")
            if self.allowed_subjects and not (self.ca_file or self.require_client_cert):
                raise ValueError(
                    "allowed_subjects needs ca_file or require_client_cert: "
                    "client certificates are not asked for otherwise"
                )
        elif self.require_client_cert or self.allowed_subjects or self.ca_file:
            raise ValueError("require_client_cert, allowed_subjects and ca_file need transport tls")


# =========================================================================== syslog
@dataclass(frozen=True, slots=True)
class SyslogMessage:
    """One syslog message split into its header and MSG (the audit XML, BOM removed)."""

    format: str  # "rfc5424", "rfc3164" or "bare" (XML without a syslog header)
    pri: int | None
    timestamp: str
    hostname: str
    app_name: str
    msgid: str
    structured_data: dict[str, dict[str, str]]
    msg: bytes


_XML_START = re.compile(rb"\xef\xbb\xbf|<\?xml|<(?:[\w.-]+:)?AuditMessage[\s>/]")
_CLOSE_TAG = re.compile(rb"</(?:[\w.-]+:)?AuditMessage\s*>")
_SD_PARAM = re.compile(rb' ([^= \]"]{1,32})="((?:[^"\\]|\\.)*)"', re.S)
_SD_UNESCAPE = re.compile(rb"\\([\"\\\]])")


def split_syslog(data: bytes) -> SyslogMessage:
    """Split one syslog message (RFC 5424; RFC 3164-ish headers and bare XML tolerated).

    >>> m = split_syslog(b'<85>1 2026-03-01T08:00:00Z host app - ATNA [x@1 a="b\\\\"c"] <r/>')
    >>> m.pri, m.hostname, m.msgid, m.structured_data, m.msg
    (85, 'host', 'ATNA', {'x@1': {'a': 'b"c'}}, b'<r/>')
    >>> split_syslog(b'<13>Mar  1 08:00:00 host atna: <AuditMessage/>').msg
    b'<AuditMessage/>'
    >>> split_syslog(b"<999>1 - - - - - - <x/>")
    Traceback (most recent call last):
    ...
    emrwatch.events.EventError: syslog: bad PRI '<999>' (expected <0> to <191>)
    """
    data = data.strip(b" \t\r\n\x00")
    if not data:
        raise EventError("syslog: empty message")
    if data.startswith(_BOM) or not data.startswith(b"<") or not data[1:2].isdigit():
        return SyslogMessage("bare", None, "", "", "", "", {}, _xml_part(data, 0))
    close = data.find(b">", 1, 6)
    if close < 0 or not data[1:close].isdigit():
        raise EventError(f"syslog: bad PRI {_show(data[:6])}")
    pri = int(data[1:close])
    if pri > 191 or (close > 2 and data[1:2] == b"0"):
        raise EventError(f"syslog: bad PRI {_show(data[: close + 1])} (expected <0> to <191>)")
    pos = close + 1
    version = re.match(rb"[1-9][0-9]? ", data[pos : pos + 3])
    if version is None:  # RFC 3164: "<13>Mar  1 08:00:00 host tag: MSG"
        m = _XML_START.search(data, pos)
        if m is None:
            raise EventError("syslog (RFC 3164 header): no audit XML in the message")
        head = data[pos : m.start()].decode("utf-8", "replace").split()
        host = head[3] if len(head) > 3 else ""
        return SyslogMessage(
            "rfc3164", pri, " ".join(head[:3]), host, "", "", {}, _xml_part(data, m.start())
        )
    pos += version.end()
    fields: list[str] = []
    for name in ("TIMESTAMP", "HOSTNAME", "APP-NAME", "PROCID", "MSGID"):
        sp = data.find(b" ", pos)
        if sp < 0:
            raise EventError(f"syslog: header ends before {name}")
        fields.append(data[pos:sp].decode("utf-8", "replace"))
        pos = sp + 1
    sd, pos = _structured_data(data, pos)
    if pos < len(data) and data[pos : pos + 1] == b" ":
        pos += 1
    return SyslogMessage(
        "rfc5424", pri, fields[0], fields[1], fields[2], fields[4], sd, _xml_part(data, pos)
    )


def _structured_data(data: bytes, pos: int) -> tuple[dict[str, dict[str, str]], int]:
    if data[pos : pos + 1] == b"-":
        return {}, pos + 1
    if data[pos : pos + 1] != b"[":
        raise EventError(
            f"syslog: structured data must be '-' or '[...]', got {_show(data[pos : pos + 12])}"
        )
    sd: dict[str, dict[str, str]] = {}
    while data[pos : pos + 1] == b"[":
        end_id = pos + 1
        while end_id < len(data) and data[end_id] not in b" ]":
            end_id += 1
        sd_id = data[pos + 1 : end_id].decode("utf-8", "replace")
        if not sd_id or end_id >= len(data):
            raise EventError("syslog: malformed structured data element")
        params: dict[str, str] = {}
        pos = end_id
        while data[pos : pos + 1] == b" ":
            m = _SD_PARAM.match(data, pos)
            if m is None:
                raise EventError(f"syslog: malformed structured data parameter in [{sd_id}]")
            params[m.group(1).decode("utf-8", "replace")] = _SD_UNESCAPE.sub(
                rb"\1", m.group(2)
            ).decode("utf-8", "replace")
            pos = m.end()
        if data[pos : pos + 1] != b"]":
            raise EventError(f"syslog: structured data element [{sd_id}] is not closed")
        sd.setdefault(sd_id, params)
        pos += 1
    return sd, pos


def _xml_part(data: bytes, pos: int) -> bytes:
    msg = data[pos:].lstrip(b" \t\r\n")
    if msg.startswith(_BOM):
        msg = msg[3:].lstrip(b" \t\r\n")
    return msg.rstrip(b" \t\r\n\x00")


def _show(value: bytes, limit: int = 40) -> str:
    text = repr(value.decode("utf-8", "replace"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def octet_frame(msg: bytes) -> bytes:
    """RFC 5425/6587 octet-counting frame of one syslog message: ``b"LEN SP MSG"``."""
    return b"%d %s" % (len(msg), msg)


def split_frames(
    buf: bytes | bytearray, max_bytes: int, allow_lf: bool = True, final: bool = False
) -> tuple[list[bytes], int, str]:
    """Complete frames at the start of ``buf``: (frames, bytes consumed, framing error).

    Octet counting (``LEN SP MSG``) and, with ``allow_lf``, non-transparent framing (a frame
    that starts with ``<``). Stray CR/LF/NUL/space between frames are skipped. ``final``:
    the connection closed, so a partial frame is an error (a line without its LF is not).

    >>> split_frames(b"3 abc5 hello2 x", 100)
    ([b'abc', b'hello'], 12, '')
    >>> split_frames(b"<13>1 a\\n<13>1 b\\n", 100)
    ([b'<13>1 a', b'<13>1 b'], 16, '')
    >>> split_frames(b"9999 x", 100)[2]
    'frame length 9999... exceeds max_message_bytes 100'
    >>> split_frames(b"12x abc", 100)[2]
    "bad frame length '12x' (expected digits and a space)"
    """
    frames: list[bytes] = []
    pos = 0
    n = len(buf)
    width = len(str(max_bytes))
    while pos < n:
        b = buf[pos]
        if b in b"\r\n\x00 \t":
            pos += 1
            continue
        if 0x30 <= b <= 0x39:
            sp = pos
            limit = min(n, pos + width + 1)
            while sp < limit and 0x30 <= buf[sp] <= 0x39:
                sp += 1
            digits = bytes(buf[pos:sp])
            if sp - pos > width:
                error = f"frame length {digits.decode()}... exceeds max_message_bytes {max_bytes}"
                return frames, pos, error
            if sp == n:
                if final:
                    return frames, pos, "connection closed inside a frame header"
                break
            if buf[sp] != 0x20:
                bad = _show(bytes(buf[pos : sp + 1]))
                return frames, pos, f"bad frame length {bad} (expected digits and a space)"
            length = int(digits)
            if length == 0 or length > max_bytes:
                error = f"frame length {length} exceeds max_message_bytes {max_bytes}"
                return frames, pos, error if length else "frame length 0"
            if sp + 1 + length > n:
                if final:
                    return (
                        frames,
                        pos,
                        f"connection closed inside a frame ({n - sp - 1} of {length} bytes)",
                    )
                break
            frames.append(bytes(buf[sp + 1 : sp + 1 + length]))
            pos = sp + 1 + length
        elif b == 0x3C and allow_lf:
            end = _lf_end(buf, pos)
            if end < 0:
                if n - pos > max_bytes:
                    return frames, pos, f"line longer than max_message_bytes {max_bytes}"
                if final:
                    frames.append(bytes(buf[pos:n]).rstrip(b"\r\n\x00 "))
                    pos = n
                break
            if end - pos > max_bytes:
                return frames, pos, f"line longer than max_message_bytes {max_bytes}"
            frames.append(bytes(buf[pos:end]).rstrip(b"\r"))
            pos = end + 1
        else:
            expected = "an octet count or '<'" if allow_lf else "an octet count"
            got = _show(bytes(buf[pos : pos + 1]))
            return frames, pos, f"unexpected {got} at a frame start (expected {expected})"
    return frames, pos, ""


def _lf_end(buf: bytes | bytearray, pos: int) -> int:
    """Index of the LF ending the non-transparent frame at ``pos`` (-1: not yet received)."""
    lf = buf.find(b"\n", pos)
    if lf < 0:
        return -1
    first = bytes(buf[pos:lf])
    if _XML_START.search(first) and not _CLOSE_TAG.search(first):
        close = _CLOSE_TAG.search(buf, pos)  # multi-line XML: up to the closing tag's line end
        if close is None:
            return -1
        return buf.find(b"\n", close.end())
    return lf


# =========================================================================== DICOM audit XML
# The code tables (actions, IHE/DICOM event types, categories, outcomes, emergency codes,
# machine roles) and the rules that use them live in connectors.audit_codes, shared with
# connectors.fhir so that the two connectors cannot drift apart.
_FHIR_TYPES = "http://hl7.org/fhir/resource-types"
#: ParticipantObjectIDTypeCode → resource type (RFC 3881, DICOM, IHE XDS)
_ID_TYPES = {
    "1": "Patient",  # Medical Record Number
    "2": "Patient",  # Patient Number
    "3": "Encounter",  # Encounter Number
    "6": "Account",  # Account Number
    "8": "DiagnosticReport",  # Report Name
    "9": "DocumentReference",  # Report Number
    "110180": "ImagingStudy",  # Study Instance UID
    "110181": "ImagingStudy",  # SOP Class UID
    "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1": "DocumentReference",  # XDS DocumentEntry
    "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd": "List",  # XDS SubmissionSet
    "urn:uuid:d9d542f3-6cc4-48b6-8870-ea235fbc94c2": "List",  # XDS Folder
}
#: ParticipantObjectTypeCodeRole → resource type, when the id type says nothing
_ROLES = {
    "2": "Location",
    "3": "DocumentReference",  # Report
    "7": "List",
    "8": "Practitioner",  # Doctor
    "15": "Practitioner",  # Provider
    "18": "Schedule",
    "20": "Task",  # Job
}
_TRUE = frozenset({"true", "1"})


def parse_cx(value: str) -> tuple[str, str, str]:
    """An HL7 v2 CX identifier → (id, assigning authority namespace, universal id).

    >>> parse_cx("12345^^^HOSP&1.2.3&ISO^MR")
    ('12345', 'HOSP', '1.2.3')
    >>> parse_cx("p\\\\S\\\\1")
    ('p^1', '', '')
    """
    parts = value.split("^")
    ident = _hl7_unescape(parts[0].strip())
    hd = parts[3].split("&") if len(parts) > 3 else []
    namespace = _hl7_unescape(hd[0].strip()) if hd else ""
    universal = _hl7_unescape(hd[1].strip()) if len(hd) > 1 else ""
    return ident, namespace, universal


_HL7_ESC = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}
_HL7_ESC_RE = re.compile(r"\\([FSTRE])\\")


def _hl7_unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return _HL7_ESC_RE.sub(lambda m: _HL7_ESC[m.group(1)], value)


def _hl7_escape(value: str) -> str:
    return (
        value.replace("\\", "\\E\\")
        .replace("|", "\\F\\")
        .replace("^", "\\S\\")
        .replace("&", "\\T\\")
        .replace("~", "\\R\\")
    )


def _local(tag: Any) -> str:
    if type(tag) is not str:
        return ""
    return tag.rpartition("}")[2] if "}" in tag else tag


def _get(el: Any, name: str) -> str:
    """Attribute ``name`` as DICOM spells it, else any case / namespace variant (real feeds
    vary both), stripped; ``""`` when absent."""
    value = el.get(name)
    if value is None:
        if not el.attrib:
            return ""
        low = name.lower()
        for key, v in el.attrib.items():
            if key.rpartition("}")[2].lower() == low:
                value = v
                break
        else:
            return ""
    return value.strip()


def _code(el: Any) -> tuple[str, str]:
    """(code, system) of a coded element: DICOM 2011+ ``csd-code`` or RFC 3881 ``code``;
    ``codeSystemName`` or ``codeSystem``."""
    return (
        _get(el, "csd-code") or _get(el, "code"),
        _get(el, "codeSystemName") or _get(el, "codeSystem"),
    )


def _groups(el: Any) -> dict[str, list[Any]]:
    """Child elements by local name, in document order."""
    out: dict[str, list[Any]] = {}
    for child in el:
        name = _local(child.tag)
        found = out.get(name)
        if found is None:
            out[name] = [child]
        else:
            found.append(child)
    return out


def _children(el: Any, name: str) -> list[Any]:
    return [c for c in el if _local(c.tag) == name]


def _is_type(name: str) -> bool:
    return name[:1].isupper() and name.isalnum() and name.isascii()


def parse_xml(xml: bytes) -> Any:
    """The root element of audit XML, parsed by defusedxml: no DTD, no entities, no
    external references (billion laughs, XXE); every problem is an :class:`EventError`.

    >>> parse_xml(b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>')
    Traceback (most recent call last):
    ...
    emrwatch.events.EventError: XML refused: DTDs and entity declarations are not allowed (...)
    """
    try:
        return SafeET.fromstring(xml, forbid_dtd=True)
    except defusedxml.DefusedXmlException as exc:
        raise EventError(
            f"XML refused: DTDs and entity declarations are not allowed ({type(exc).__name__})"
        ) from None
    except StdET.ParseError as exc:
        raise EventError(f"invalid XML: {exc}") from None
    except (ValueError, LookupError, UnicodeError, RecursionError) as exc:
        raise EventError(f"invalid XML: {type(exc).__name__}: {exc}") from None


def parse_atna(
    data: bytes,
    *,
    strip_user_domain: bool = False,
    authorities: Sequence[str] = (),
) -> AccessEvent:
    """One syslog message (or bare audit XML) → event; :class:`EventError` says why not.

    The event id is the ``eventId`` parameter of a ``[emrwatch@32473 ...]`` structured data
    element when present, else ``"atna-"`` + the first 32 hex digits of the SHA-256 of the
    audit XML, so a re-delivered message (even with a new syslog header) keeps its id."""
    msg = split_syslog(data)
    if not msg.msg:
        raise EventError("syslog MSG is empty: no audit XML")
    if not msg.msg.startswith(b"<"):
        raise EventError(f"syslog MSG is not XML: starts with {_show(msg.msg[:20])}")
    event_id = ""
    for sd_id, params in msg.structured_data.items():
        if sd_id.startswith(EVENT_ID_SD.partition("@")[0]) and params.get(EVENT_ID_PARAM):
            event_id = params[EVENT_ID_PARAM]
            break
    if not event_id:
        event_id = "atna-" + hashlib.sha256(msg.msg).hexdigest()[:32]
    return parse_audit_message(
        parse_xml(msg.msg),
        event_id,
        strip_user_domain=strip_user_domain,
        authorities=authorities,
    )


def parse_audit_message(
    root: Any,
    event_id: str,
    *,
    strip_user_domain: bool = False,
    authorities: Sequence[str] = (),
) -> AccessEvent:
    """A parsed DICOM PS3.15 ``AuditMessage`` → event.

    * ``ts``: ``EventIdentification/@EventDateTime`` as sent (must carry an offset or Z);
    * ``action``: ``@EventActionCode`` C/R/U/D/E → create/view/update/delete/execute, refined
      by the EventID and EventTypeCode codes as for FHIR (print/export/copy/forward, DICOM
      110106 Export, FHIR REST codes), then DICOM 110112 Query and IHE ITI transactions;
    * ``outcome``: ``@EventOutcomeIndicator`` 0 → success, 4/8/12 → failure;
    * ``event_category``: 110114 User Authentication → authentication, 110113 Security
      Alert → security_alert; ``emergency``: PurposeOfUse ETREAT/BTG (event level or the
      requestor's) or EventTypeCode 110127 (Emergency Override Started); ``purpose``: the
      first event-level PurposeOfUse code, else the requestor's first;
    * ``user_id``/``workstation``: the ``ActiveParticipant`` with ``UserIsRequestor="true"``
      (a human one before a machine role 110150-110153; the first with a UserID), else the
      first participant: ``UserID`` and ``NetworkAccessPointID`` (else the Source Role ID
      participant's);
    * ``patient_id``: the CX id of the ``ParticipantObjectIdentification`` with TypeCode 1
      and TypeCodeRole 1 (or an id type "Patient"); ``resource_type``: the first other
      object's type (FHIR resource-types code, XDS/DICOM/RFC 3881 id type, else its role),
      default Patient; an Encounter object gives ``encounter_id``;
    * ``source``: ``AuditSourceIdentification/@AuditSourceID``.

    The code tables and the format-independent rules live in :mod:`connectors.audit_codes`,
    shared with :mod:`connectors.fhir`.
    """
    if _local(root.tag) != "AuditMessage":
        raise EventError(f"root element is {_local(root.tag) or '?'!r}, not AuditMessage")
    parts = _groups(root)
    idents = parts.get("EventIdentification")
    if not idents:
        raise EventError("AuditMessage has no EventIdentification")
    ev = idents[0]
    ev_parts = _groups(ev)
    ts = _get(ev, "EventDateTime")
    if not ts:
        raise EventError("EventIdentification has no EventDateTime")
    try:
        t = parse_ts(ts)
    except EventError as exc:
        raise EventError(f"EventDateTime: {exc}") from None
    except (OverflowError, ValueError, OSError) as exc:
        raise EventError(f"EventDateTime: bad timestamp {ts[:40]!r} ({exc})") from None

    codes = _iter_codes(ev_parts.get("EventID", ()))
    codes += _iter_codes(ev_parts.get("EventTypeCode", ()))
    category = event_category(codes)
    action = _action(_get(ev, "EventActionCode"), codes)
    outcome_code = _get(ev, "EventOutcomeIndicator") or "0"
    outcome = OUTCOMES.get(outcome_code.lower())
    if outcome is None:
        raise EventError(
            f"unknown EventOutcomeIndicator {outcome_code[:20]!r} (expected 0, 4, 8 or 12)"
        )

    participants = parts.get("ActiveParticipant", [])
    requestor, user_id = _requestor(participants)
    if strip_user_domain:
        user_id = _strip_domain(user_id)
    workstation = _get(requestor, "NetworkAccessPointID")
    if not workstation:
        for p in participants:
            if p is not requestor and SOURCE_ROLE in _roles(p):
                workstation = _get(p, "NetworkAccessPointID")
                if workstation:
                    break

    event_purposes = _iter_codes(ev_parts.get("PurposeOfUse", ()))
    own_purposes = _iter_codes(_children(requestor, "PurposeOfUse"))
    purposes = event_purposes or own_purposes
    emergency = is_emergency(codes, event_purposes, own_purposes)

    sources = parts.get("AuditSourceIdentification")
    source = ""
    if sources:
        source = _get(sources[0], "AuditSourceID") or _get(sources[0], "AuditEnterpriseSiteID")

    patient_id, resource_type, encounter_id = _objects(
        parts.get("ParticipantObjectIdentification", ()), category, authorities
    )
    return AccessEvent(
        event_id=event_id,
        ts=ts,
        t=t,
        user_id=user_id,
        patient_id=patient_id,
        action=action,
        resource_type=resource_type,
        workstation=workstation,
        outcome=outcome,
        emergency=emergency,
        purpose=purposes[0] if purposes else "",
        source=source,
        encounter_id=encounter_id,
        event_category=category,
    )


def _action(code: str | None, codes: list[str]) -> str:
    """EventActionCode refined (:func:`connectors.audit_codes.refine_action`):
    exfiltration > DICOM Export > FHIR REST > DICOM Query / IHE transaction > code."""
    if code is None or not code.strip():
        base = "view"
    else:
        found = ACTION_CODES.get(code.strip().upper())
        if found is None:
            raise EventError(f"unknown EventActionCode {code[:20]!r} (expected C, R, U, D or E)")
        base = found
    return refine_action(base, codes)


def _roles(participant: Any) -> list[str]:
    return _iter_codes(_children(participant, "RoleIDCode"))


def _is_requestor(participant: Any) -> bool:
    return _get(participant, "UserIsRequestor").lower() in _TRUE


def _requestor(participants: list[Any]) -> tuple[Any, str]:
    """The requesting participant and its UserID, by the rule shared with FHIR
    (:func:`connectors.audit_codes.requestor_candidates`): the first participant with
    ``UserIsRequestor="true"`` and a UserID, persons before machine roles 110150-110153;
    if none is marked a requestor, the first participant."""
    if not participants:
        raise EventError("AuditMessage has no ActiveParticipant")
    candidates = requestor_candidates(participants, _is_requestor, _roles)
    for p in candidates:
        user_id = _get(p, "UserID")
        if user_id:
            return p, user_id
    if _is_requestor(candidates[0]):
        raise EventError("the requesting ActiveParticipant has no UserID")
    raise EventError(
        'no ActiveParticipant with UserIsRequestor="true", and the first one has no UserID'
    )


def _strip_domain(user_id: str) -> str:
    """'alice@HOSP' → 'alice'; IHE XUA 'alias<alice@HOSP>' → 'alice'.

    >>> _strip_domain("alias<alice@HOSP>"), _strip_domain("bob@x.org"), _strip_domain("@x")
    ('alice', 'bob', '@x')
    """
    inner = user_id
    if inner.endswith(">") and "<" in inner:
        inner = inner[inner.rfind("<") + 1 : -1]
    name = inner.partition("@")[0].strip()
    return name or user_id


def _objects(
    objects: Iterable[Any], category: str, authorities: Sequence[str]
) -> tuple[str, str, str]:
    """(patient_id, resource_type, encounter_id) from the ParticipantObjectIdentifications."""
    patient_id = resource_type = encounter_id = ""
    seen_patient = False
    skipped: list[str] = []
    for po in objects:
        type_code = _get(po, "ParticipantObjectTypeCode")
        role = _get(po, "ParticipantObjectTypeCodeRole")
        object_id = _get(po, "ParticipantObjectID")
        id_types = [_code(x) for x in _children(po, "ParticipantObjectIDTypeCode")]
        rtype = _object_type(id_types, role, object_id)
        if (type_code == "1" and role == "1") or (rtype == "Patient" and type_code in ("1", "")):
            seen_patient = True
            if patient_id:
                continue
            ident, namespace, universal = parse_cx(object_id)
            if authorities and namespace not in authorities and universal not in authorities:
                skipped.append(f"{namespace or universal or '(none)'}")
                continue
            patient_id = ident
        elif rtype == "Encounter":
            if not encounter_id:
                encounter_id = parse_cx(object_id)[0]
        elif rtype and not resource_type:
            resource_type = rtype
    if not patient_id and category == "access":
        if skipped:
            raise EventError(
                f"no patient id from assigning authorities {list(authorities)} "
                f"(patient objects from: {', '.join(skipped[:5])})"
            )
        if seen_patient:
            raise EventError("patient ParticipantObjectID is empty")
        raise EventError(
            "no patient object (ParticipantObjectTypeCode 1 with ParticipantObjectTypeCodeRole 1)"
        )
    return patient_id, resource_type or "Patient", encounter_id


def _object_type(id_types: list[tuple[str, str]], role: str, object_id: str) -> str:
    for code, system in id_types:
        if not code:
            continue
        if system == _FHIR_TYPES or (_is_type(code) and not code.isdigit()):
            return code
        mapped = _ID_TYPES.get(code)
        if mapped:
            return mapped
    head, sep, rid = object_id.rpartition("/")  # a FHIR reference ".../Observation/123"
    if sep and rid:
        name = head.rpartition("/")[2]
        if _is_type(name):
            return name
    return _ROLES.get(role, "")


# =========================================================================== encoder


def _coded(tag: str, code: str, system: str, text: str = "") -> str:
    return (
        f"<{tag} csd-code={quoteattr(code)} codeSystemName={quoteattr(system)}"
        f" originalText={quoteattr(text or code)}/>"
    )


def _sd_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def to_audit_message(
    e: AccessEvent,
    *,
    pri: int = 110,
    hostname: str = "emr01",
    app_name: str = "emrwatch",
    assigning_authority: str = "1.2.840.99999.1",
    with_event_id: bool = True,
    bom: bool = True,
) -> bytes:
    """One RFC 5424 syslog message (not yet transport-framed: see :func:`octet_frame`)
    whose MSG is the DICOM audit XML of ``e``; :func:`parse_atna` reads it back to ``e``.

    The event id travels in ``[emrwatch@32473 eventId="..."]`` (``with_event_id=False``
    leaves it out: the parser then derives one from the XML)."""
    category = CATEGORY_OUT.get(e.event_category)
    if category is not None:
        event_id = category
    elif e.action == "query":
        event_id = ("110112", "Query")
    elif e.action == "export":
        event_id = (DICOM_EXPORT, "Export")
    else:
        event_id = ("110110", "Patient Record")
    parts = [
        f"<EventIdentification EventActionCode={quoteattr(ACTION_OUT.get(e.action, 'E'))}"
        f" EventDateTime={quoteattr(e.ts)}"
        f" EventOutcomeIndicator={quoteattr('0' if e.outcome == 'success' else '4')}>",
        _coded("EventID", event_id[0], DCM, event_id[1]),
    ]
    if e.action in ("print", "copy", "forward") or (
        e.action in ("query", "export") and event_id[0] not in ("110112", DICOM_EXPORT)
    ):
        sub = "search" if e.action == "query" else e.action
        parts.append(_coded("EventTypeCode", sub, "urn:emrwatch:subtype"))
    if e.emergency and e.event_category == "security_alert":
        parts.append(_coded("EventTypeCode", EMERGENCY_OVERRIDE, DCM, "Emergency Override Started"))
    purposes = [e.purpose] if e.purpose else []
    if e.emergency and not EMERGENCY_PURPOSES & set(purposes):
        purposes.append("BTG")
    for p in purposes:
        parts.append(_coded("PurposeOfUse", p, "2.16.840.1.113883.5.8"))
    parts.append("</EventIdentification>")
    ws = (
        f' NetworkAccessPointID={quoteattr(e.workstation)} NetworkAccessPointTypeCode="2"'
        if e.workstation
        else ""
    )
    parts.append(
        f'<ActiveParticipant UserID={quoteattr(e.user_id)} UserIsRequestor="true"{ws}>'
        + _coded("RoleIDCode", "PROV", "2.16.840.1.113883.5.110", "healthcare provider")
        + "</ActiveParticipant>"
    )
    parts.append(
        f'<ActiveParticipant UserID={quoteattr(hostname)} UserIsRequestor="false">'
        + _coded("RoleIDCode", "110152", DCM, "Destination Role ID")
        + "</ActiveParticipant>"
    )
    parts.append(
        f"<AuditSourceIdentification AuditSourceID={quoteattr(e.source or 'emr')}>"
        '<AuditSourceTypeCode csd-code="4"/></AuditSourceIdentification>'
    )
    if e.patient_id:
        cx = f"{_hl7_escape(e.patient_id)}^^^&{assigning_authority}&ISO"
        parts.append(
            f"<ParticipantObjectIdentification ParticipantObjectID={quoteattr(cx)}"
            ' ParticipantObjectTypeCode="1" ParticipantObjectTypeCodeRole="1">'
            + _coded("ParticipantObjectIDTypeCode", "2", "RFC-3881", "Patient Number")
            + "</ParticipantObjectIdentification>"
        )
    if e.resource_type and e.resource_type != "Patient":
        parts.append(
            "<ParticipantObjectIdentification"
            f" ParticipantObjectID={quoteattr(f'{e.resource_type}/{e.event_id}-r')}"
            ' ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="4">'
            + _coded("ParticipantObjectIDTypeCode", e.resource_type, _FHIR_TYPES)
            + "</ParticipantObjectIdentification>"
        )
    if e.encounter_id:
        parts.append(
            "<ParticipantObjectIdentification"
            f" ParticipantObjectID={quoteattr(_hl7_escape(e.encounter_id))}"
            ' ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="4">'
            + _coded("ParticipantObjectIDTypeCode", "3", "RFC-3881", "Encounter Number")
            + "</ParticipantObjectIdentification>"
        )
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?><AuditMessage>' + "".join(parts) + "</AuditMessage>"
    ).encode("utf-8")
    sd = f'[{EVENT_ID_SD} {EVENT_ID_PARAM}="{_sd_escape(e.event_id)}"]' if with_event_id else "-"
    stamp = e.ts if e.ts and " " not in e.ts else "-"
    header = f"<{pri}>1 {stamp} {hostname} {app_name} - IHE+DICOM {sd} ".encode()
    return header + (_BOM if bom else b"") + xml


# =========================================================================== the connector
class AtnaSyslogConnector(Connector):
    """Listens for IHE ATNA syslog (TLS/TCP/UDP); see the module docstring."""

    type = "atna-syslog"
    summary = "IHE ATNA audit messages (DICOM audit XML) over syslog: TLS, TCP or UDP listener"
    Config = AtnaSyslogConfig
    produces = frozenset({"access"})

    def __init__(
        self, config: AtnaSyslogConfig, name: str = "", ledger: Ledger | None = None
    ) -> None:
        super().__init__(config, name=name, ledger=ledger)
        self.config: AtnaSyslogConfig = config
        #: the bound port once started (useful with ``port: 0``)
        self.port = 0
        self._spool: Spool | None = None
        self._state_dir: Path | None = None
        self._closing = threading.Event()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._ctx: ssl.SSLContext | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._udp_peers: dict[str, list[int]] = {}
        self._authorities = tuple(config.patient_id_authorities)
        self.counters = {"connections": 0, "rejected": 0, "messages": 0, "framing_errors": 0}

    # ------------------------------------------------------------------ lifecycle
    def use_state_dir(self, directory: Path) -> None:
        self._state_dir = directory

    def spool_path(self) -> Path | None:
        """The spool directory, or None for a spool in memory."""
        where = self.config.spool_dir
        if where == "memory" or (not where and self._state_dir is None):
            return None
        return Path(where) if where else self._state_dir

    def _open_spool(self) -> Spool:
        if self._spool is None:
            cfg = self.config
            path = self.spool_path()
            if path is None:
                self._spool = MemorySpool(cfg.queue_size)
            else:
                try:
                    self._spool = FileSpool(
                        path, max_bytes=cfg.spool_max_bytes, fsync_s=cfg.spool_fsync_s
                    )
                except (OSError, SpoolError) as exc:
                    raise ConnectorConfigError(
                        f"connector {self.name!r}: spool {path}: {exc}"
                    ) from None
        return self._spool

    def start(self) -> None:
        with self._lock:
            if self._sock is not None or self._closing.is_set():
                return
            cfg = self.config
            self._open_spool()
            if cfg.transport == "tls":
                try:
                    self._ctx = server_ssl_context(
                        cfg.cert_file, cfg.key_file, cfg.ca_file, cfg.require_client_cert
                    )
                except ValueError as exc:
                    raise ConnectorConfigError(f"connector {self.name!r}: {exc}") from None
            port = DEFAULT_PORTS[cfg.transport] if cfg.port is None else cfg.port
            kind = socket.SOCK_DGRAM if cfg.transport == "udp" else socket.SOCK_STREAM
            family, _, _, _, addr = socket.getaddrinfo(cfg.host, port, 0, kind)[0]
            sock = socket.socket(family, kind)
            try:
                if kind == socket.SOCK_STREAM:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                else:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                sock.bind(addr)
                if kind == socket.SOCK_STREAM:
                    sock.listen(128)
            except OSError:
                sock.close()
                raise
            sock.settimeout(0.25)
            self._sock = sock
            self.port = sock.getsockname()[1]
            target = self._udp_loop if cfg.transport == "udp" else self._accept_loop
            t = threading.Thread(target=target, name=f"atna-{self.name}", daemon=True)
            self._threads.append(t)
            t.start()
            self._ready.set()
            log.info("%s: listening on %s %s:%d", self.name, cfg.transport, cfg.host, self.port)

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Block until :meth:`start` has bound the socket (tests, senders in-process)."""
        return self._ready.wait(timeout)

    def close(self) -> None:
        with self._lock:
            if self._closing.is_set():
                return
            self._closing.set()
            sock, self._sock = self._sock, None
            conns = list(self._conns)
        if sock is not None:
            sock.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(2.0)
        for peer, (records, size) in sorted(self._udp_peers.items()):
            self.ledger.receipt(self.name, f"udp {peer}", peer=peer, records=records, size=size)
        self._udp_peers.clear()
        if self._spool is not None:
            self._spool.close()

    def committed(self, checkpoint: Any) -> None:
        if self._spool is not None:
            self._spool.committed(checkpoint)

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "type": self.type,
            "name": self.name,
            "transport": cfg.transport,
            "host": cfg.host,
            "port": self.port,
            "listening": self._sock is not None,
            "mutual_tls": cfg.transport == "tls" and cfg.require_client_cert,
            "open_connections": len(self._conns),
            **(self._spool.describe() if self._spool is not None else {}),
            **self.counters,
        }

    # ------------------------------------------------------------------ records / normalize
    #: on stop, the runner reads on until records() has handed over the queued messages
    drain_on_stop = True

    def records(self, checkpoint: Any, stop: threading.Event) -> Iterator[RawRecord | None]:
        if self._sock is None and not self._closing.is_set():
            self.start()
        spool = self._open_spool()
        last = checkpoint
        for raw in spool.read(checkpoint, stop):
            if raw is not None and raw.checkpoint is not None:
                last = raw.checkpoint
            yield raw
        # A graceful stop: syslog has no acknowledgement, so hand over what the spool
        # holds (after closing the listener) instead of leaving it for the next run.
        self.close()
        yield from spool.pending(last)

    def normalize(self, raw: RawRecord) -> list[Output]:
        error = raw.meta.get("framing_error")
        if error:
            raise EventError(f"syslog framing: {error}")
        cfg = self.config
        return [
            parse_atna(
                raw.payload, strip_user_domain=cfg.strip_user_domain, authorities=self._authorities
            )
        ]

    # ------------------------------------------------------------------ listener internals
    def _put(self, payload: bytes, position: str, peer: str, meta: dict[str, Any]) -> bool:
        """Spool one message, waiting while the spool is full (TCP back-pressure)."""
        spool = self._spool
        if spool is None or not spool.append(payload, position, peer, meta):
            return False
        self.counters["messages"] += 1
        return True

    def _reject(self, peer: str, subject: str, reason: str) -> None:
        self.counters["rejected"] += 1
        log.warning("%s: refused %s: %s", self.name, peer, reason)
        unit = f"{self.config.transport} {peer}"
        who = f"{peer} {subject}" if subject else peer
        self.ledger.receipt(self.name, unit, peer=who, status="rejected", reason=reason)

    def _accept_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._closing.is_set():
            try:
                conn, addr = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closing.is_set():
                    break
                time.sleep(0.05)  # EMFILE and friends: do not spin
                continue
            peer = peer_address(addr)
            if len(self._conns) >= self.config.max_connections:
                self._reject(
                    peer,
                    "",
                    f"too many connections (max_connections {self.config.max_connections})",
                )
                conn.close()
                continue
            t = threading.Thread(
                target=self._serve, args=(conn, peer), daemon=True, name=f"atna-{peer}"
            )
            t.start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        cfg = self.config
        subject = ""
        conn.settimeout(cfg.handshake_timeout_s)
        with self._lock:
            if self._closing.is_set():
                conn.close()
                return
            self._conns.add(conn)
        try:
            if self._ctx is not None:
                try:
                    tls = self._ctx.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    self._reject(peer, "", f"TLS handshake failed: {_ssl_reason(exc)}")
                    return
                with self._lock:
                    self._conns.discard(conn)
                    self._conns.add(tls)
                conn = tls
                subject = peer_identity(tls)
                if cfg.allowed_subjects and not subject_allowed(subject, cfg.allowed_subjects):
                    reason = (
                        f"client certificate subject {subject!r} is not in allowed_subjects"
                        if subject
                        else "no client certificate (allowed_subjects is set)"
                    )
                    self._reject(peer, subject, reason)
                    return
            self.counters["connections"] += 1
            self._read(conn, peer, subject)
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _read(self, conn: socket.socket, peer: str, subject: str) -> None:
        """Read frames until EOF, a framing error, idleness or close; then the receipt."""
        cfg = self.config
        who = f"{peer} {subject}" if subject else peer
        meta = {"transport": cfg.transport}
        conn.settimeout(0.5)
        buf = bytearray()
        sha = hashlib.sha256()
        total = n = 0
        idle = 0.0
        reason = ""
        failed = final = False
        while not final:
            chunk = b""
            try:
                chunk = conn.recv(1 << 16)
            except TimeoutError:
                idle += 0.5
                if not self._closing.is_set() and not (
                    cfg.idle_timeout_s and idle >= cfg.idle_timeout_s
                ):
                    continue
                reason = reason or f"idle for {cfg.idle_timeout_s:g} s"
            except (ssl.SSLError, OSError) as exc:
                if not self._closing.is_set():
                    reason, failed = f"read failed: {_ssl_reason(exc)}", True
            if self._closing.is_set():
                reason = "connector closed"
                break
            if chunk:
                idle = 0.0
                total += len(chunk)
                sha.update(chunk)
                buf += chunk
            else:
                final = True
            frames, used, ferr = split_frames(
                buf, cfg.max_message_bytes, cfg.allow_lf_framing, final
            )
            for frame in frames:
                n += 1
                if not self._put(frame, f"{who} #{n}", who, meta):
                    reason, final = "connector closed", True
                    break
            if ferr:  # no resynchronising after a bad frame: dead-letter the rest, close
                n += 1
                self.counters["framing_errors"] += 1
                bad = bytes(buf[used : used + cfg.max_message_bytes])
                bad_meta = {**meta, "framing_error": ferr}
                self._put(bad, f"{who} #{n}", who, bad_meta)
                reason = reason or f"framing error: {ferr}"
                failed = final = True
            del buf[:used]
        self.ledger.receipt(
            self.name,
            f"{cfg.transport} {peer}",
            peer=who,
            records=n,
            size=total,
            status="error" if failed else "accepted",
            reason=reason,
            digest=sha.hexdigest(),
        )

    def _udp_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        cfg = self.config
        meta = {"transport": "udp"}
        while not self._closing.is_set():
            try:
                data, addr = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                if self._closing.is_set():
                    break
                continue
            peer = peer_address(addr)
            counts = self._udp_peers.setdefault(peer, [0, 0])
            counts[0] += 1
            counts[1] += len(data)
            m: dict[str, Any] = meta
            if len(data) > cfg.max_message_bytes:
                self.counters["framing_errors"] += 1
                error = f"datagram of {len(data)} bytes exceeds max_message_bytes"
                m = {**meta, "framing_error": f"{error} {cfg.max_message_bytes}"}
            self._put(data, f"{peer} #{counts[0]}", peer, m)


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    text = str(reason) if reason else (str(exc) or type(exc).__name__)
    return text[:200]


def _iter_codes(elements: Iterable[Any]) -> list[str]:
    return [c for c, _ in map(_code, elements) if c]
