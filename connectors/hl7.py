"""HL7 v2 ADT over MLLP: admissions, transfers and discharges become the ``encounters`` context.

The ``hl7-mllp`` connector is a listener (TCP, optionally TLS with client certificates) for
the Minimal Lower Layer Protocol: every message is framed as ``0x0B <message> 0x1C 0x0D``.
It parses HL7 v2 itself (no third-party HL7 library): segments end with CR (LF and CRLF are
tolerated), the field separator and the encoding characters come from MSH-1/MSH-2, fields
split into repetitions (``~``), components (``^``) and subcomponents (``&``), and the escape
sequences ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` (plus ``\\X..\\`` hex, ``\\.br\\``,
``\\H\\``/``\\N\\``) are decoded after splitting. ``""`` (the HL7 explicit null) reads as empty.

What becomes which row (CONTRACTS §2, ``encounters.csv``):

==================  ====================================================================
column              from
==================  ====================================================================
encounter_id        PV1-19 visit number (component 1); fallback ``encounter_id_fallback``
                    (default PID-18 account number)
patient_id          PID-3: the repetition whose assigning authority (CX-4, namespace or
                    universal id) or identifier type (CX-5) is ``patient_id_authority``;
                    without that setting the first repetition. (PID-2 if PID-3 is empty.)
department_id       ``department_field`` (default PV1-3.1, the point of care), translated
                    through ``department_map`` when the value is a key of it
start               PV1-44 admit date/time; for A01/A04 without it EVN-6, EVN-2, MSH-7
end                 PV1-45 discharge date/time; A03 without it: EVN-6, EVN-2, MSH-7;
                    A13 (cancel discharge, if configured) always clears it
attending_user_id   PV1-7 component 1 (first repetition)
==================  ====================================================================

Events: A01 admit, A02 transfer, A03 discharge, A04 register outpatient and A08 update
produce the encounter row (``events`` can add A05, A06, A07, A12, A13); A11 (cancel admit /
visit) deletes it: the runner writes a tombstone and the workers forget the encounter, so
it explains no access from then on. Every other message (other ADT events, ORU, SIU, ...)
is acknowledged with AA and produces nothing.

**Transfers (A02).** The encounters table has one row per encounter with one department,
and a context row is an upsert that replaces the whole row. A transfer therefore re-emits
the encounter with the *new* department (PV1-3): from then on the receiving ward's staff are
"caring" and the former ward's are not. So that the former ward's accesses *before* the
transfer stay explained, with ``transfer_history`` (default on) an A02 also emits a closed
row for the prior location (PV1-6): ``encounter_id = "<visit>@<prior department>"``, start =
the admit time, end = the transfer time (EVN-6, EVN-2, MSH-7). Normalising is stateless, so
after several transfers each such row starts at the admission, not at the earlier transfer
(a slight over-explanation, never an unexplained legitimate access). A12 (cancel transfer,
if listed in ``events``) re-emits the encounter with PV1-3, which in an A12 is the location
restored; the prior-location row of the cancelled transfer stays (it covers that ward only
up to the transfer).

**Patients rows.** A ``ContextUpdate`` replaces the whole row, and PID carries no
sensitivity / VIP / employee columns, so a ``patients`` row from PID would reset those to
"not set" (sensitivity 1, not VIP) for a patient loaded from ``patients.csv``. It is
therefore only emitted with ``emit_patients: true`` (A01, A04, A08): use it when ADT is the
only source of patients. The row has patient_id, family_name (PID-5.1), given_name
(PID-5.2) and address (PID-11, first repetition, non-empty parts joined with ", ").

**Timestamps.** ``YYYYMMDD[HH[MM[SS[.S{1,4}]]]][+/-ZZZZ]``; without an offset they are read
in ``timezone`` (default Asia/Shanghai). Rows carry ISO 8601 with the offset.

**Acknowledgements.** Each message gets an HL7 ACK (original mode): MSH with sending and
receiving application/facility swapped, ``MSA-1`` AA/AE/AR, ``MSA-2`` = the message's MSH-10.
The ACK is sent only from the :class:`~connectors.base.RawRecord` callbacks, i.e. after the
runner has the output (or the dead letter) acknowledged by the broker: AA on ``ack()``,
AE (content errors) or AR (framing errors: oversized, interrupted frame, bad encoding
characters) on ``reject(reason)`` with the reason in MSA-3 and ERR-8. If the broker is down
no ACK is sent and the sender retransmits: at-least-once, and since the context topic is
compacted and keyed by encounter id a retransmitted message is an idempotent upsert.

Malformed input (no MSH, bad encoding characters, bytes outside a frame, a frame over
``max_message_bytes``, a frame cut by a new start block or by the connection closing)
becomes a raw record whose :meth:`~Hl7MllpConnector.normalize` raises
:class:`~emrwatch.events.EventError`: it is dead-lettered with the reason and, when a control
id can be found, answered with AE/AR. The connection keeps working.

>>> msg = parse_message(
...     b"MSH|^~\\\\&|ADT|H|EW|H|202403010830||ADT^A01|C1|P|2.5\\rPID|1||P1^^^H^MR\\r"
... )
>>> msg.get("MSH", 9, 2), msg.get("PID", 3, 4), msg.control_id
('A01', 'H', 'C1')
>>> hl7_timestamp("202403010830", "Asia/Shanghai")
'2024-03-01T08:30:00+08:00'
>>> unescape("A\\\\T\\\\B \\\\F\\\\ x\\\\E\\\\y", Encoding())
'A&B | x\\\\y'
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import queue
import re
import selectors
import socket
import ssl
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

from connectors.base import Connector, ContextUpdate, Ledger, Output, RawRecord
from emrwatch.events import EventError
from emrwatch.timeutil import DEFAULT_TIMEZONE
from emrwatch.timeutil import zone as _zone

__all__ = [
    "Ack",
    "AdtMapper",
    "Encoding",
    "Hl7Error",
    "Hl7Message",
    "Hl7MllpConnector",
    "MllpClient",
    "build_ack",
    "escape",
    "frame",
    "hl7_timestamp",
    "parse_message",
    "to_adt",
    "unescape",
]

log = logging.getLogger(__name__)

VT, FS, CR = 0x0B, 0x1C, 0x0D
START_BLOCK, END_BLOCK = b"\x0b", b"\x1c\x0d"

#: the ADT trigger events that produce encounter rows by default
DEFAULT_EVENTS = ("A01", "A02", "A03", "A04", "A08", "A11")
#: every event ``events`` may list
SUPPORTED_EVENTS = frozenset(
    {"A01", "A02", "A03", "A04", "A05", "A06", "A07", "A08", "A11", "A12", "A13"}
)
#: events that may take the admit time from the event time when PV1-44 is empty
_ADMIT_EVENTS = frozenset({"A01", "A04", "A05"})
_PATIENT_EVENTS = frozenset({"A01", "A04", "A08"})

#: MSH-18 character sets (HL7 table 0211) → Python codecs
CHARSETS = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "8859/1": "latin-1",
    "ISO IR100": "latin-1",
    "8859/2": "iso8859-2",
    "8859/5": "iso8859-5",
    "8859/7": "iso8859-7",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "GB 18030-2000": "gb18030",
    "GB18030": "gb18030",
    "BIG-5": "big5",
    "KS X 1001": "euc-kr",
    "ISO IR87": "iso2022_jp",
}

_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
_FIELD_PATH = re.compile(r"^([A-Z][A-Z0-9]{2})-(\d+)(?:\.(\d+))?(?:\.(\d+))?$")
_TS = re.compile(
    r"^(\d{4})(\d{2})(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,4}))?)?)?)?([+-]\d{4})?$"
)


class Hl7Error(EventError):
    """An HL7 message (or frame) that cannot be used; the message says why."""


# ---------------------------------------------------------------------------- parsing
@dataclass(frozen=True, slots=True)
class Encoding:
    """The delimiters of one message (MSH-1 and MSH-2)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""

    @property
    def msh2(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation

    @classmethod
    def from_msh(cls, fs: str, chars: str) -> Encoding:
        """Validate MSH-1/MSH-2: distinct, printable, non-alphanumeric, 4 or 5 characters."""
        if len(fs) != 1 or fs.isalnum() or fs.isspace() or not fs.isprintable():
            raise Hl7Error(f"bad field separator {fs!r} in MSH-1")
        if len(chars) not in (4, 5):
            raise Hl7Error(f"bad encoding characters {chars!r} in MSH-2 (expected 4 like ^~\\&)")
        every = fs + chars
        if len(set(every)) != len(every) or any(
            c.isalnum() or c.isspace() or not c.isprintable() for c in chars
        ):
            raise Hl7Error(f"bad encoding characters {chars!r} in MSH-2")
        return cls(fs, chars[0], chars[1], chars[2], chars[3], chars[4:5])


DEFAULT_ENCODING = Encoding()


def unescape(value: str, enc: Encoding = DEFAULT_ENCODING) -> str:
    """Decode HL7 escape sequences in one (already split) leaf value. Unknown or unterminated
    sequences are kept as they are."""
    e = enc.escape
    if not e or e not in value:
        return value
    out: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        j = value.find(e, i)
        if j < 0:
            break
        k = value.find(e, j + 1)
        if k < 0:
            break
        out.append(value[i:j])
        rep = _escape_value(value[j + 1 : k], enc)
        out.append(value[j : k + 1] if rep is None else rep)
        i = k + 1
    out.append(value[i:])
    return "".join(out)


def _escape_value(code: str, enc: Encoding) -> str | None:
    simple = {
        "F": enc.field,
        "S": enc.component,
        "T": enc.subcomponent,
        "R": enc.repetition,
        "E": enc.escape,
        "P": enc.truncation or None,
        "H": "",
        "N": "",
        ".br": "\n",
        ".sp": "\n",
    }
    if code in simple:
        return simple[code]
    if code[:1] == "X" and len(code) % 2 == 1:
        try:
            data = bytes.fromhex(code[1:])
        except ValueError:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")
    return None


def escape(value: str, enc: Encoding = DEFAULT_ENCODING) -> str:
    """Escape delimiters (and line breaks, as ``\\.br\\``) in a value for a message.

    >>> escape("A|B^C&D~E\\\\F")
    'A\\\\F\\\\B\\\\S\\\\C\\\\T\\\\D\\\\R\\\\E\\\\E\\\\F'
    """
    e = enc.escape
    value = value.replace(e, f"{e}E{e}")
    for ch, code in (
        (enc.field, "F"),
        (enc.component, "S"),
        (enc.subcomponent, "T"),
        (enc.repetition, "R"),
    ):
        value = value.replace(ch, f"{e}{code}{e}")
    if enc.truncation:
        value = value.replace(enc.truncation, f"{e}P{e}")
    return (
        value.replace("\r\n", f"{e}.br{e}").replace("\r", f"{e}.br{e}").replace("\n", f"{e}.br{e}")
    )


class Hl7Message:
    """A parsed HL7 v2 message: segments of fields, kept raw and unescaped on access.

    ``fields[n]`` of a segment is field n (for MSH, field 1 is the field separator and field
    2 the encoding characters, as in the standard's numbering)."""

    __slots__ = ("encoding", "segments", "_index")

    def __init__(self, segments: list[list[str]], encoding: Encoding) -> None:
        self.segments = segments
        self.encoding = encoding
        self._index: dict[str, list[str]] = {}
        for seg in segments:
            self._index.setdefault(seg[0], seg)

    def segment(self, name: str) -> list[str] | None:
        """The first segment called ``name`` (its raw fields), or None."""
        return self._index.get(name)

    def all(self, name: str) -> list[list[str]]:
        return [s for s in self.segments if s[0] == name]

    def raw(self, seg: str, n: int) -> str:
        s = self._index.get(seg)
        return s[n] if s is not None and 0 <= n < len(s) else ""

    def repetitions(self, seg: str, n: int) -> list[str]:
        """The raw repetitions of a field ([] when empty)."""
        f = self.raw(seg, n)
        if not f:
            return []
        if seg == "MSH" and n in (1, 2):
            return [f]
        return f.split(self.encoding.repetition)

    def component(self, value: str, comp: int = 1, sub: int = 1) -> str:
        """Component ``comp`` (subcomponent ``sub``) of one raw repetition, unescaped;
        the HL7 explicit null ``""`` reads as ``""`` (empty)."""
        enc = self.encoding
        comps = value.split(enc.component)
        if comp - 1 >= len(comps):
            return ""
        c = comps[comp - 1]
        if enc.subcomponent in c:
            subs = c.split(enc.subcomponent)
            c = subs[sub - 1] if sub - 1 < len(subs) else ""
        elif sub > 1:
            return ""
        if c == '""':
            return ""
        return unescape(c, enc).strip()

    def get(self, seg: str, n: int, comp: int = 1, sub: int = 1, rep: int = 0) -> str:
        """One value: segment ``seg``, field ``n``, component, subcomponent, repetition."""
        if seg == "MSH" and n in (1, 2):
            return self.raw(seg, n)
        reps = self.repetitions(seg, n)
        if rep >= len(reps):
            return ""
        return self.component(reps[rep], comp, sub)

    def path(self, spec: str) -> str:
        """A value by path: ``"PV1-3"``, ``"PV1-3.1"``, ``"PID-3.4.1"`` (first repetition)."""
        seg, n, comp, sub = parse_field_path(spec)
        return self.get(seg, n, comp, sub)

    @property
    def message_type(self) -> str:
        return self.get("MSH", 9, 1).upper()

    @property
    def trigger(self) -> str:
        return (self.get("MSH", 9, 2) or self.get("EVN", 1)).upper()

    @property
    def control_id(self) -> str:
        return self.get("MSH", 10)

    def __repr__(self) -> str:
        kind = f"{self.message_type}^{self.trigger}"
        return f"Hl7Message({kind} {self.control_id!r}, {len(self.segments)} segments)"


def parse_field_path(spec: str) -> tuple[str, int, int, int]:
    """``"PV1-3.1"`` → ``("PV1", 3, 1, 1)``; a ValueError names the bad path."""
    m = _FIELD_PATH.match(spec.strip().upper())
    if not m:
        raise ValueError(f"bad HL7 field path {spec!r} (expected like PV1-19 or PV1-3.1)")
    seg, n, comp, sub = m.groups()
    return seg, int(n), int(comp or 1), int(sub or 1)


def _text_start(text: str) -> str:
    return text.lstrip("\ufeff \t\r\n\x00")


def parse_message(data: bytes | str, encoding: str = "utf-8") -> Hl7Message:
    """Parse one HL7 v2 message. Bytes are decoded with the MSH-18 character set when it is
    known, else ``encoding``. Raises :class:`Hl7Error` (an EventError) when unusable."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        charset = _charset_of(raw) or encoding
        try:
            text = raw.decode(charset)
        except (UnicodeDecodeError, LookupError) as exc:
            raise Hl7Error(
                f"message is not valid {charset} text ({exc}); set MSH-18 or encoding"
            ) from None
    else:
        text = data
    text = _text_start(text)
    if not text.startswith("MSH"):
        if text[:3] in ("FHS", "BHS"):
            raise Hl7Error("HL7 batches (FHS/BHS) are not supported: send one message per frame")
        raise Hl7Error(f"no MSH segment at the start of the message: {text[:20]!r}")
    if len(text) < 8:
        raise Hl7Error("MSH segment is truncated")
    fs = text[3]
    lines = text.replace("\r\n", "\r").replace("\n", "\r").split("\r")
    first = lines[0]
    chars_end = first.find(fs, 4)
    chars = first[4:] if chars_end < 0 else first[4:chars_end]
    enc = Encoding.from_msh(fs, chars)
    msh = ["MSH", fs, chars, *(first[chars_end + 1 :].split(fs) if chars_end >= 0 else [])]
    segments: list[list[str]] = [msh]
    for no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name = line[:3]
        if not _SEGMENT_ID.fullmatch(name) or (len(line) > 3 and line[3] != fs):
            raise Hl7Error(f"segment {no} is not an HL7 segment: {line[:30]!r}")
        segments.append(line.split(fs))
    return Hl7Message(segments, enc)


def _charset_of(raw: bytes) -> str:
    """The Python codec named by MSH-18 ('' when absent or unknown)."""
    end = len(raw)
    for b in (b"\r", b"\n"):
        i = raw.find(b, 0, end)
        if i >= 0:
            end = i
    first = raw[:end].decode("latin-1").lstrip("\ufeff\xef\xbb\xbf \t\x00")
    if not first.startswith("MSH") or len(first) < 4:
        return ""
    parts = first.split(first[3])
    if len(parts) <= 17:
        return ""
    name = parts[17].split(parts[1][1:2] or "~")[0].strip().upper() if parts[1] else parts[17]
    return CHARSETS.get(name.strip().upper(), "")


@dataclass(frozen=True, slots=True)
class _Header:
    """What an ACK needs, taken from the MSH of a message that may be otherwise broken."""

    fs: str = "|"
    chars: str = "^~\\&"
    fields: tuple[str, ...] = ()

    def f(self, n: int) -> str:
        """Raw MSH-n (n >= 3)."""
        i = n - 2
        return self.fields[i] if 0 <= i < len(self.fields) else ""

    @property
    def control_id(self) -> str:
        return self.f(10).strip()

    @classmethod
    def parse(cls, payload: bytes) -> _Header | None:
        head = payload[:4096]
        if head[:3] == b"\xef\xbb\xbf":
            head = head[3:]
        end = len(head)
        for b in (b"\r", b"\n"):
            i = head.find(b)
            if 0 <= i < end:
                end = i
        text = _text_start(head[:end].decode("latin-1"))
        if not text.startswith("MSH") or len(text) < 5:
            return None
        fs = text[3]
        if fs.isalnum() or fs.isspace():
            return None
        parts = text.split(fs)
        return cls(fs, parts[1] if len(parts) > 1 else "", tuple(parts[1:]))


# ---------------------------------------------------------------------------- timestamps
def hl7_timestamp(value: str, tz: str | ZoneInfo | timezone = DEFAULT_TIMEZONE) -> str:
    """An HL7 DTM/TS ``YYYYMMDD[HH[MM[SS[.S{1,4}]]]][+/-ZZZZ]`` as ISO 8601 with the UTC
    offset; without an offset it is local time in ``tz``. ValueError when malformed.

    >>> hl7_timestamp("20240301083015.25+0100")
    '2024-03-01T08:30:15.250000+01:00'
    >>> hl7_timestamp("20240301")
    '2024-03-01T00:00:00+08:00'
    """
    v = value.strip()
    m = _TS.match(v)
    if not m:
        raise ValueError(f"bad HL7 timestamp {value!r}")
    y, mo, d, hh, mi, ss, frac, off = m.groups()
    if off:
        sign = 1 if off[0] == "+" else -1
        oh, om = int(off[1:3]), int(off[3:5])
        if oh > 14 or om > 59:
            raise ValueError(f"bad UTC offset in HL7 timestamp {value!r}")
        zone: Any = timezone(sign * timedelta(hours=oh, minutes=om))
    else:
        zone = _zone(tz) if isinstance(tz, str) else tz
    try:
        dt = datetime(
            int(y),
            int(mo),
            int(d),
            int(hh or 0),
            int(mi or 0),
            int(ss or 0),
            int((frac or "0").ljust(6, "0")),
            tzinfo=zone,
        )
    except ValueError:
        raise ValueError(f"bad HL7 timestamp {value!r}") from None
    return dt.isoformat()


def to_hl7_timestamp(iso: str, tz: str = DEFAULT_TIMEZONE) -> str:
    """ISO 8601 → ``YYYYMMDDHHMMSS+ZZZZ`` (naive input is local time in ``tz``).

    >>> to_hl7_timestamp("2024-03-01T08:30:00+08:00")
    '20240301083000+0800'
    """
    dt = datetime.fromisoformat(iso.strip())
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=_zone(tz))
    return dt.strftime("%Y%m%d%H%M%S%z")


# ---------------------------------------------------------------------------- mapping
class AdtMapper:
    """ADT messages → ``encounters`` (and optionally ``patients``) context rows."""

    def __init__(self, config: Hl7MllpConfig | None = None) -> None:
        c = config or Hl7MllpConfig()
        self.config = c
        self.zone = _zone(c.timezone)
        self.events = frozenset(e.upper() for e in c.events)
        self.fallback = (
            parse_field_path(c.encounter_id_fallback) if c.encounter_id_fallback else None
        )
        self.department = parse_field_path(c.department_field)
        self.authority = c.patient_id_authority.strip().upper()
        self.department_map = dict(c.department_map)

    def rows(self, payload: bytes | str) -> list[ContextUpdate]:
        """The context rows of one message ([] for messages it ignores); Hl7Error if unusable."""
        if isinstance(payload, (bytes, bytearray)):
            hdr = _Header.parse(bytes(payload))
            if hdr is None:
                parse_message(payload, self.config.encoding)  # raises with the reason
                raise Hl7Error("no MSH segment")  # pragma: no cover - parse_message raised
            # cheap early exit for what we ignore, before decoding the whole message
            mtype = hdr.f(9)
            comp = hdr.chars[:1] or "^"
            parts = mtype.split(comp)
            if parts[0].strip().upper() != "ADT":
                Encoding.from_msh(hdr.fs, hdr.chars)
                return []
        msg = parse_message(payload, self.config.encoding)
        return self.rows_of(msg)

    def rows_of(self, msg: Hl7Message) -> list[ContextUpdate]:
        if msg.message_type != "ADT":
            return []
        event = msg.trigger
        if event not in self.events:
            return []
        out: list[ContextUpdate] = []
        patient_id = self._patient_id(msg)
        encounter_id = msg.get("PV1", 19)
        if not encounter_id and self.fallback is not None:
            encounter_id = msg.get(*self.fallback)
        if encounter_id and event == "A11":  # cancel admit / visit: it never happened
            row = {"encounter_id": encounter_id, "patient_id": patient_id}
            out.append(ContextUpdate("encounters", row, delete=True))
        elif encounter_id:
            if not patient_id:
                raise Hl7Error(f"ADT^{event}: no patient identifier in PID-3")
            out.extend(self._encounter_rows(msg, event, encounter_id, patient_id))
        elif event != "A08":
            where = "PV1-19" + (f" or {self.config.encounter_id_fallback}" if self.fallback else "")
            raise Hl7Error(f"ADT^{event}: no visit number in {where}")
        if self.config.emit_patients and event in _PATIENT_EVENTS and patient_id:
            out.append(ContextUpdate("patients", self._patient_row(msg, patient_id)))
        return out

    # -------------------------------------------------------------- pieces
    def _patient_id(self, msg: Hl7Message) -> str:
        reps = msg.repetitions("PID", 3)
        if self.authority:
            for r in reps:
                names = {
                    msg.component(r, 4, 1).upper(),
                    msg.component(r, 4, 2).upper(),
                    msg.component(r, 5).upper(),
                }
                if self.authority in names:
                    pid = msg.component(r, 1)
                    if pid:
                        return pid
            if reps:
                raise Hl7Error(
                    f"no PID-3 identifier with assigning authority or type {self.authority!r}"
                )
            return ""
        for r in reps[:1]:
            pid = msg.component(r, 1)
            if pid:
                return pid
        return msg.get("PID", 2)

    def _ts(self, msg: Hl7Message, seg: str, n: int) -> str:
        v = msg.get(seg, n)
        if not v:
            return ""
        try:
            return hl7_timestamp(v, self.zone)
        except ValueError as exc:
            raise Hl7Error(f"{seg}-{n}: {exc}") from None

    def _event_time(self, msg: Hl7Message) -> str:
        return self._ts(msg, "EVN", 6) or self._ts(msg, "EVN", 2) or self._ts(msg, "MSH", 7)

    def _dept(self, value: str) -> str:
        return self.department_map.get(value, value)

    def _encounter_rows(
        self, msg: Hl7Message, event: str, encounter_id: str, patient_id: str
    ) -> list[ContextUpdate]:
        start = self._ts(msg, "PV1", 44)
        if not start and event in _ADMIT_EVENTS:
            start = self._event_time(msg)
        if not start:
            raise Hl7Error(
                f"ADT^{event} {encounter_id}: PV1-44 admit date/time is empty; "
                "an encounters row needs its start"
            )
        end = self._ts(msg, "PV1", 45)
        if event == "A03" and not end:
            end = self._event_time(msg)
        if event == "A13":
            end = ""
        seg, n, comp, sub = self.department
        dept = self._dept(msg.get(seg, n, comp, sub))
        row = {
            "encounter_id": encounter_id,
            "patient_id": patient_id,
            "department_id": dept,
            "start": start,
            "end": end,
            "attending_user_id": msg.get("PV1", 7),
        }
        out = [ContextUpdate("encounters", row)]
        if event == "A02" and self.config.transfer_history:
            prior = self._dept(msg.get("PV1", 6, comp if seg == "PV1" and n == 3 else 1))
            if prior and prior != dept:
                when = self._event_time(msg)
                if not when:
                    raise Hl7Error(
                        f"ADT^A02 {encounter_id}: no transfer time (EVN-6, EVN-2, MSH-7)"
                    )
                out.append(
                    ContextUpdate(
                        "encounters",
                        {
                            "encounter_id": f"{encounter_id}@{prior}",
                            "patient_id": patient_id,
                            "department_id": prior,
                            "start": start,
                            "end": when,
                            "attending_user_id": msg.get("PV1", 17) or msg.get("PV1", 7),
                        },
                    )
                )
        return out

    def _patient_row(self, msg: Hl7Message, patient_id: str) -> dict[str, str]:
        name = (msg.repetitions("PID", 5) or [""])[0]
        addr = (msg.repetitions("PID", 11) or [""])[0]
        parts = [
            msg.component(addr, 1, 1),
            msg.component(addr, 2),
            msg.component(addr, 3),
            msg.component(addr, 4),
            msg.component(addr, 5),
            msg.component(addr, 6),
        ]
        return {
            "patient_id": patient_id,
            "family_name": msg.component(name, 1, 1),
            "given_name": msg.component(name, 2),
            "address": ", ".join(p for p in parts if p),
        }


# ---------------------------------------------------------------------------- messages out
def frame(message: bytes | str) -> bytes:
    """One MLLP frame: ``0x0B message 0x1C 0x0D``."""
    data = message.encode("utf-8") if isinstance(message, str) else bytes(message)
    return START_BLOCK + data + END_BLOCK


def to_adt(
    row: Mapping[str, Any],
    event: str = "A01",
    control_id: str | None = None,
    *,
    patient: Mapping[str, Any] | None = None,
    prior_department: str = "",
    event_time: str = "",
    timezone: str = DEFAULT_TIMEZONE,
    sending: tuple[str, str] = ("EMRWATCH", "SIM"),
    receiving: tuple[str, str] = ("EMRWATCH", "HOSP"),
) -> bytes:
    """An HL7 v2.5 ADT message (CR-separated, UTF-8) for one ``encounters`` row, for tests,
    the simulator and benchmarks. ``control_id`` defaults to a digest of the content, so the
    same row gives the same message. ``patient`` (a ``patients`` row) fills PID-5/PID-11.

    >>> m = to_adt({"encounter_id": "V1", "patient_id": "P1", "department_id": "ORTH",
    ...             "start": "2024-03-01T08:30:00+08:00", "attending_user_id": "U7"})
    >>> rows = AdtMapper().rows(m)
    >>> rows[0].row["department_id"], rows[0].row["start"], rows[0].row["end"]
    ('ORTH', '2024-03-01T08:30:00+08:00', '')
    """
    event = event.upper()
    enc = DEFAULT_ENCODING

    def e(v: Any) -> str:
        return escape("" if v is None else str(v), enc)

    def ts(v: Any) -> str:
        return to_hl7_timestamp(str(v), timezone) if v else ""

    start, end = ts(row.get("start")), ts(row.get("end"))
    when = ts(event_time) if event_time else (end if event == "A03" and end else start)
    if control_id is None:
        digest = hashlib.sha1(
            repr((event, sorted((k, str(v)) for k, v in row.items()), prior_department)).encode()
        )
        control_id = digest.hexdigest()[:20]
    p = patient or {}
    name = f"{e(p.get('family_name', ''))}^{e(p.get('given_name', ''))}" if p else ""
    address = f"{e(p.get('address', ''))}" if p else ""
    pid = e(row.get("patient_id", ""))
    pv1 = [""] * 46
    pv1[0] = "PV1"
    pv1[1] = "1"
    pv1[2] = "O" if event == "A04" else "I"
    pv1[3] = f"{e(row.get('department_id', ''))}^^^HOSP"
    pv1[6] = f"{e(prior_department)}^^^HOSP" if prior_department else ""
    pv1[7] = e(row.get("attending_user_id", ""))
    pv1[19] = e(row.get("encounter_id", ""))
    pv1[44] = start
    pv1[45] = end
    segs = [
        f"MSH|^~\\&|{e(sending[0])}|{e(sending[1])}|{e(receiving[0])}|{e(receiving[1])}|{when}"
        f"||ADT^{event}^ADT_A01|{e(control_id)}|P|2.5||||||UNICODE UTF-8",
        f"EVN|{event}|{when}||||{when}",
        f"PID|1||{pid}^^^HOSP^MR||{name}||||||{address}",
        "|".join(pv1),
    ]
    return ("\r".join(segs) + "\r").encode("utf-8")


def build_ack(
    header: _Header | None,
    code: str = "AA",
    text: str = "",
    *,
    timezone_name: str = DEFAULT_TIMEZONE,
) -> bytes:
    """The original-mode ACK of a message whose MSH is ``header``: sending and receiving
    application/facility swapped, MSA-1 ``code``, MSA-2 its control id, and for AE/AR the
    reason in MSA-3 and ERR-8."""
    h = header or _Header()
    try:
        enc = Encoding.from_msh(h.fs, h.chars)
    except Hl7Error:
        enc = DEFAULT_ENCODING
        h = _Header(enc.field, enc.msh2, tuple(_clean(x, enc) for x in h.fields))
    fs, c = enc.field, enc.component

    def keep(v: str) -> str:  # no CR/LF or MLLP block characters in the reply
        return "".join(ch if ch >= " " else " " for ch in v)

    trigger = h.f(9).split(enc.component)[1] if enc.component in h.f(9) else ""
    now = datetime.now(_zone(timezone_name)).strftime("%Y%m%d%H%M%S%z")
    version = keep(h.f(12)) or "2.5"
    msh = fs.join(
        [
            "MSH",
            enc.msh2,
            keep(h.f(5)),
            keep(h.f(6)),
            keep(h.f(3)),
            keep(h.f(4)),
            now,
            "",
            f"ACK{c}{keep(trigger)}{c}ACK" if trigger else "ACK",
            uuid.uuid4().hex[:20],
            keep(h.f(11)) or "P",
            version,
        ]
    )
    ctrl = keep(h.control_id)
    segs = [msh]
    if code == "AA" or not text:
        segs.append(fs.join(["MSA", code, ctrl]))
    else:
        words = " ".join("".join(ch if ch >= " " else " " for ch in text).split())
        t = escape(words[:500], enc)
        segs.append(fs.join(["MSA", code, ctrl, escape(words[:80], enc)]))
        err = ["ERR", "", "", f"207{c}Application internal error{c}HL70357", "E", "", "", "", t]
        segs.append(fs.join(err))
    return ("\r".join(segs) + "\r").encode("utf-8")


def _clean(v: str, enc: Encoding) -> str:
    for ch in (enc.field, "\r", "\n"):
        v = v.replace(ch, " ")
    return v


@dataclass(frozen=True, slots=True)
class Ack:
    """A parsed HL7 ACK: MSA-1 code, MSA-2 control id, MSA-3 text, ERR-8 (or ERR-3) text."""

    code: str
    control_id: str
    text: str = ""
    error: str = ""
    raw: bytes = b""

    @property
    def ok(self) -> bool:
        return self.code in ("AA", "CA")

    @classmethod
    def parse(cls, data: bytes) -> Ack:
        msg = parse_message(data)
        if msg.segment("MSA") is None:
            raise Hl7Error("the reply has no MSA segment")
        return cls(
            code=msg.get("MSA", 1).upper(),
            control_id=msg.get("MSA", 2),
            text=msg.get("MSA", 3),
            error=msg.get("ERR", 8) or msg.get("ERR", 3, 2),
            raw=bytes(data),
        )


class MllpClient:
    """A small MLLP sender: frame a message, send it, wait for the ACK.

    >>> with MllpClient("127.0.0.1", 2575) as c:  # doctest: +SKIP
    ...     print(c.send(to_adt(row)).code)  # AA once the broker has it
    AA
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 2575,
        *,
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.sock: socket.socket | None = None
        self._buf = bytearray()

    def connect(self) -> MllpClient:
        if self.sock is None:
            s = socket.create_connection((self.host, self.port), timeout=self.timeout)
            if self.ssl_context is not None:
                try:
                    s = self.ssl_context.wrap_socket(
                        s, server_hostname=self.server_hostname or self.host
                    )
                except BaseException:
                    s.close()
                    raise
            self.sock = s
        return self

    def __enter__(self) -> MllpClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (framed or not): tests of malformed input."""
        self.connect()
        assert self.sock is not None
        self.sock.sendall(data)

    def send(
        self, message: bytes | str, *, wait: bool = True, timeout: float | None = None
    ) -> Ack | None:
        """Send one message; with ``wait`` return its parsed ACK (TimeoutError if none)."""
        self.send_raw(frame(message))
        return self.read_ack(timeout) if wait else None

    def read_frame(self, timeout: float | None = None) -> bytes:
        """The next framed message from the peer (TimeoutError / ConnectionError)."""
        self.connect()
        assert self.sock is not None
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            s = self._buf.find(START_BLOCK)
            if s >= 0:
                e = self._buf.find(b"\x1c", s + 1)
                if e >= 0:
                    data = bytes(self._buf[s + 1 : e])
                    del self._buf[: e + 1]
                    if self._buf[:1] == b"\r":
                        del self._buf[:1]
                    return data
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no ACK from the MLLP peer")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("no ACK from the MLLP peer") from None
            if not chunk:
                raise ConnectionError("the MLLP peer closed the connection")
            self._buf += chunk

    def read_ack(self, timeout: float | None = None) -> Ack:
        return Ack.parse(self.read_frame(timeout))


# ---------------------------------------------------------------------------- framing
@dataclass(slots=True)
class _Item:
    payload: bytes
    error: str = ""
    #: AR (framing) or AE (content) for rejects
    reject_code: str = "AE"
    #: False: bytes outside frames, nobody waits for an ACK
    answerable: bool = True


_WS = b" \t\r\n\x00"


class _Framer:
    """Incremental MLLP deframer; never raises, malformed input becomes error items."""

    def __init__(self, max_bytes: int) -> None:
        self.max = max_bytes
        self.buf = bytearray()
        self.state = 0  # 0 between frames, 1 inside a frame, 2 skipping an oversized frame
        self.scan = 0
        self.garbage = bytearray()
        self.garbage_n = 0

    def _keep_garbage(self, chunk: bytes | bytearray) -> None:
        if not chunk.strip(_WS) and not self.garbage_n:
            return
        self.garbage_n += len(chunk)
        room = self.max - len(self.garbage)
        if room > 0:
            self.garbage += chunk[:room]

    def _garbage_item(self, out: list[_Item]) -> None:
        if self.garbage_n and self.garbage.strip(_WS):
            out.append(
                _Item(
                    bytes(self.garbage),
                    f"{self.garbage_n} byte(s) outside an MLLP frame "
                    "(expected 0x0B <message> 0x1C 0x0D)",
                    "AR",
                    answerable=False,
                )
            )
        self.garbage = bytearray()
        self.garbage_n = 0

    def feed(self, data: bytes) -> list[_Item]:
        out: list[_Item] = []
        buf = self.buf
        buf += data
        while buf:
            if self.state == 0:
                i = buf.find(START_BLOCK)
                self._keep_garbage(buf if i < 0 else buf[:i])
                if i < 0:
                    buf.clear()
                    if self.garbage_n > self.max:
                        self._garbage_item(out)
                    break
                self._garbage_item(out)
                del buf[: i + 1]
                self.state, self.scan = 1, 0
            elif self.state == 1:
                j = buf.find(b"\x1c", self.scan)
                k = buf.find(START_BLOCK, self.scan, j if j >= 0 else len(buf))
                if k >= 0:
                    out.append(
                        _Item(
                            bytes(buf[: min(k, self.max)]),
                            "MLLP frame interrupted by a new start block (0x0B) before its end",
                            "AR",
                        )
                    )
                    del buf[: k + 1]
                    self.scan = 0
                    continue
                if j < 0:
                    if len(buf) > self.max:
                        out.append(self._oversized(buf))
                        buf.clear()
                        self.state = 2
                    else:
                        self.scan = len(buf)
                    break
                if j > self.max:
                    out.append(self._oversized(buf))
                else:
                    out.append(_Item(bytes(buf[:j])))
                del buf[: j + 1]
                if buf[:1] == b"\r":
                    del buf[:1]
                self.state, self.scan = 0, 0
            else:
                j = buf.find(b"\x1c")
                if j < 0:
                    buf.clear()
                    break
                del buf[: j + 1]
                self.state = 0
        return out

    def _oversized(self, buf: bytearray) -> _Item:
        return _Item(
            bytes(buf[: self.max]), f"MLLP frame larger than max_message_bytes ({self.max})", "AR"
        )

    def finish(self) -> list[_Item]:
        """The connection closed: what is left is an error."""
        out: list[_Item] = []
        if self.state == 1 and self.buf.strip(_WS):
            out.append(
                _Item(
                    bytes(self.buf[: self.max]),
                    "the connection closed inside an MLLP frame (no 0x1C end block)",
                    "AR",
                )
            )
        elif self.state == 0:
            self._garbage_item(out)
        self.buf.clear()
        self.state = 0
        return out


# ---------------------------------------------------------------------------- the connector
@dataclass
class Hl7MllpConfig:
    host: str = field(default="0.0.0.0", metadata={"help": "address to listen on"})
    port: int = field(default=2575, metadata={"help": "TCP port (0 = any free port)"})
    cert_file: str = field(
        default="", metadata={"help": "TLS certificate chain (PEM); empty = plain TCP"}
    )
    key_file: str = field(default="", metadata={"help": "TLS private key (PEM)"})
    ca_file: str = field(
        default="", metadata={"help": "CA bundle that verifies client certificates"}
    )
    require_client_cert: bool = field(
        default=False, metadata={"help": "refuse TLS clients without a valid certificate"}
    )
    allowed_subjects: list[str] = field(
        default_factory=list,
        metadata={"help": "client certificate subjects or CNs allowed to connect (empty: any)"},
    )
    timezone: str = field(
        default=DEFAULT_TIMEZONE,
        metadata={"help": "hospital timezone for HL7 timestamps without a UTC offset"},
    )
    encoding: str = field(
        default="utf-8", metadata={"help": "character set when MSH-18 does not name a known one"}
    )
    events: list[str] = field(
        default_factory=lambda: list(DEFAULT_EVENTS),
        metadata={"help": "ADT trigger events that produce encounter rows (others: AA, no output)"},
    )
    patient_id_authority: str = field(
        default="",
        metadata={
            "help": "pick the PID-3 identifier whose assigning authority (CX-4) or type "
            "(CX-5) is this; empty = the first repetition"
        },
    )
    encounter_id_fallback: str = field(
        default="PID-18",
        metadata={"help": "field with the encounter id when PV1-19 is empty ('' = none)"},
    )
    department_field: str = field(
        default="PV1-3.1", metadata={"help": "field with the department (point of care)"}
    )
    department_map: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "HL7 department values → department_id (unmapped values pass as is)"},
    )
    transfer_history: bool = field(
        default=True,
        metadata={"help": "A02 also emits a closed '<visit>@<prior dept>' row for PV1-6"},
    )
    emit_patients: bool = field(
        default=False,
        metadata={
            "help": "A01/A04/A08 also emit patients rows from PID; they REPLACE the whole row "
            "(sensitivity/vip/employee reset), so only when ADT is the patients source"
        },
    )
    max_message_bytes: int = field(
        default=1_048_576, metadata={"help": "larger frames are dead-lettered (AR)"}
    )
    max_connections: int = field(default=64, metadata={"help": "concurrent connections"})
    ack_timeout_s: float = field(
        default=30.0,
        metadata={
            "help": "how long an ACK may take to reach a slow peer, and how long a connection "
            "the peer half-closed waits for outstanding ACKs"
        },
    )
    handshake_timeout_s: float = field(default=10.0, metadata={"help": "TLS handshake timeout"})
    queue_size: int = field(
        default=10_000, metadata={"help": "received messages waiting for the runner"}
    )

    def validate(self) -> None:
        try:
            _zone(self.timezone)
        except ValueError as exc:
            raise ValueError(f"timezone: {exc}") from None
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a TCP port")
        if self.max_message_bytes < 64:
            raise ValueError("max_message_bytes: must be at least 64")
        if self.max_connections < 1 or self.queue_size < 1:
            raise ValueError("max_connections and queue_size must be at least 1")
        if self.ack_timeout_s <= 0 or self.handshake_timeout_s <= 0:
            raise ValueError("ack_timeout_s and handshake_timeout_s must be positive")
        bad = sorted({e.upper() for e in self.events} - SUPPORTED_EVENTS)
        if bad:
            raise ValueError(f"events: {bad} not supported; choose from {sorted(SUPPORTED_EVENTS)}")
        for key in ("encounter_id_fallback", "department_field"):
            value = getattr(self, key)
            if value or key == "department_field":
                try:
                    parse_field_path(value)
                except ValueError as exc:
                    raise ValueError(f"{key}: {exc}") from None
        if (
            self.key_file or self.ca_file or self.require_client_cert or self.allowed_subjects
        ) and not self.cert_file:
            raise ValueError("cert_file: required for TLS (key_file/ca_file/client certs are set)")
        try:
            "x".encode(self.encoding)
        except LookupError:
            raise ValueError(f"encoding: unknown character set {self.encoding!r}") from None


class _Conn:
    """One MLLP connection: a thread that reads frames and writes the ACKs others post."""

    def __init__(self, owner: Hl7MllpConnector, sock: socket.socket, addr: Any, no: int) -> None:
        from connectors.net import peer_address

        self.owner = owner
        self.sock = sock
        self.addr = peer_address(addr)
        self.no = no
        self.identity = ""
        self.outbox: deque[bytes] = deque()
        self.lock = threading.Lock()
        self.closed = False
        self.outstanding = 0
        self.records = 0
        self.size = 0
        self.digest = hashlib.sha256()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.thread = threading.Thread(target=self._run, name=f"hl7-mllp {self.addr}", daemon=True)

    # ------------------------------------------------------------ called by the runner
    def post(self, data: bytes) -> None:
        with self.lock:
            self.outstanding -= 1
            if self.closed:
                self.owner._count("acks_dropped")
                return
            self.outbox.append(data)
        self.wake()

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            self.wake_w.send(b"\0")

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        o = self.owner
        status, reason = "accepted", ""
        try:
            if o._ssl is not None:
                ok, reason = self._handshake()
                if not ok:
                    status = "rejected"
                    return
            self._loop()
        except OSError as exc:
            reason = f"connection error: {exc}"
        except Exception as exc:  # pragma: no cover - a bug must not kill the listener
            log.exception("hl7-mllp %s: connection %s failed", o.name, self.addr)
            reason = f"internal error: {exc}"
        finally:
            with self.lock:
                self.closed = True
                self.outbox.clear()
            for s in (self.sock, self.wake_r, self.wake_w):
                with contextlib.suppress(OSError):
                    s.close()
            o.ledger.receipt(
                o.name,
                f"connection {self.no} from {self.addr}",
                peer=self.identity or self.addr,
                records=self.records,
                size=self.size,
                status=status,
                reason=reason,
                digest=self.digest.hexdigest() if self.size else "",
            )
            o._forget(self)

    def _handshake(self) -> tuple[bool, str]:
        from connectors.net import peer_identity, subject_allowed

        o = self.owner
        assert o._ssl is not None
        raw = self.sock
        raw.settimeout(o.config.handshake_timeout_s)
        try:
            self.sock = o._ssl.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            o._count("tls_refused")
            log.warning("hl7-mllp %s: TLS handshake with %s failed: %s", o.name, self.addr, exc)
            return False, f"TLS handshake failed: {exc}"
        self.identity = peer_identity(self.sock)
        if not subject_allowed(self.identity, o.config.allowed_subjects):
            o._count("tls_refused")
            log.warning("hl7-mllp %s: %s (%r) is not allowed", o.name, self.addr, self.identity)
            return False, f"client certificate subject {self.identity or '(none)'!r} is not allowed"
        return True, ""

    def _loop(self) -> None:
        o = self.owner
        sock = self.sock
        sock.setblocking(False)
        framer = _Framer(o.config.max_message_bytes)
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ, "sock")
        sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        tls = isinstance(sock, ssl.SSLSocket)
        eof_deadline: float | None = None
        try:
            while not o._closing.is_set():
                if not self._flush():
                    return
                if eof_deadline is not None:
                    with self.lock:
                        done = self.outstanding <= 0 and not self.outbox
                    if done or time.monotonic() > eof_deadline:
                        return
                pending = tls and sock.pending() > 0  # type: ignore[attr-defined]
                readable = eof_deadline is None and pending
                if not readable:
                    for key, _ in sel.select(timeout=0.5):
                        if key.data == "wake":
                            try:
                                while self.wake_r.recv(4096):
                                    pass
                            except (BlockingIOError, InterruptedError):
                                pass
                        else:
                            readable = True
                if not readable or eof_deadline is not None:
                    continue
                try:
                    data = sock.recv(65536)
                except (
                    BlockingIOError,
                    InterruptedError,
                    ssl.SSLWantReadError,
                    ssl.SSLWantWriteError,
                ):
                    continue
                except (ConnectionError, ssl.SSLError):
                    data = b""
                if not data:
                    for item in framer.finish():
                        self._emit(item)
                    eof_deadline = time.monotonic() + o.config.ack_timeout_s
                    sel.unregister(sock)
                    continue
                self.size += len(data)
                self.digest.update(data)
                for item in framer.feed(data):
                    self._emit(item)
        finally:
            sel.close()

    def _flush(self) -> bool:
        """Send the posted ACKs; False when the peer cannot take them (connection dropped)."""
        while True:
            with self.lock:
                if not self.outbox:
                    return True
                data = self.outbox.popleft()
            if not self._send_all(data):
                return False
            self.owner._count("acks_sent")

    def _send_all(self, data: bytes) -> bool:
        deadline = time.monotonic() + self.owner.config.ack_timeout_s
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
                view = view[n:]
                continue
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                pass
            except OSError as exc:
                log.info("hl7-mllp %s: ACK to %s not sent: %s", self.owner.name, self.addr, exc)
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "hl7-mllp %s: %s does not read its ACKs; closing", self.owner.name, self.addr
                )
                return False
            selectors_ = selectors.DefaultSelector()
            try:
                selectors_.register(self.sock, selectors.EVENT_WRITE | selectors.EVENT_READ)
                selectors_.select(timeout=min(left, 0.5))
            finally:
                selectors_.close()
        return True

    def _emit(self, item: _Item) -> None:
        o = self.owner
        header = _Header.parse(item.payload) if item.answerable else None
        ctrl = header.control_id if header is not None else ""
        n = o._next_no()
        self.records += 1
        meta: dict[str, Any] = {}
        if item.error:
            meta["error"] = item.error
        elif header is not None:
            try:
                Encoding.from_msh(header.fs, header.chars)
            except Hl7Error as exc:
                meta["error"] = str(exc)
                item.reject_code = "AR"
        ack: Callable[[], None] | None = None
        reject: Callable[[str], None] | None = None
        if header is not None:
            tz = o.config.timezone
            code = item.reject_code

            def ack() -> None:
                self.post(frame(build_ack(header, "AA", timezone_name=tz)))

            def reject(reason: str) -> None:
                self.post(frame(build_ack(header, code, reason, timezone_name=tz)))

            with self.lock:
                self.outstanding += 1
        raw = RawRecord(
            payload=item.payload,
            position=f"{self.addr} {ctrl or '-'} #{n}",
            peer=self.identity or self.addr,
            meta=meta,
            ack=ack,
            reject=reject,
        )
        o._put(raw)


class Hl7MllpConnector(Connector):
    """HL7 v2 ADT over MLLP (TCP/TLS) → ``encounters`` context rows; see the module docs."""

    type = "hl7-mllp"
    summary = (
        "HL7 v2 ADT over MLLP (TCP/TLS listener): encounters context, ACK after the broker has it"
    )
    Config = Hl7MllpConfig
    produces = frozenset({"context"})

    def __init__(self, config: Hl7MllpConfig, name: str = "", ledger: Ledger | None = None) -> None:
        super().__init__(config, name=name, ledger=ledger)
        self.config: Hl7MllpConfig = config
        self.mapper = AdtMapper(config)
        #: the bound port once started (the configured one, or the free one for port 0)
        self.port: int = config.port
        self._queue: queue.Queue[RawRecord] = queue.Queue(maxsize=config.queue_size)
        self._server: socket.socket | None = None
        self._ssl: ssl.SSLContext | None = None
        self._closing = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()
        self._n = 0
        self._conn_no = 0
        self.counters: dict[str, int] = {
            "connections": 0,
            "messages": 0,
            "acks_sent": 0,
            "acks_dropped": 0,
            "tls_refused": 0,
            "connections_refused": 0,
        }

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._server is not None:
            return
        c = self.config
        if c.cert_file:
            from connectors.net import server_ssl_context

            self._ssl = server_ssl_context(
                c.cert_file, c.key_file, c.ca_file, c.require_client_cert
            )
        family = socket.AF_INET6 if ":" in c.host else socket.AF_INET
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            srv.bind((c.host, c.port))
            srv.listen(64)
        except OSError:
            srv.close()
            raise
        srv.settimeout(0.5)
        self._server = srv
        self.port = srv.getsockname()[1]
        self._closing.clear()
        self._accept_thread = threading.Thread(
            target=self._accept, name=f"hl7-mllp accept :{self.port}", daemon=True
        )
        self._accept_thread.start()
        log.info(
            "hl7-mllp %s listening on %s:%d%s",
            self.name,
            c.host,
            self.port,
            " (TLS)" if self._ssl else "",
        )

    def close(self) -> None:
        self._closing.set()
        srv, self._server = self._server, None
        if srv is not None:
            srv.close()
        if self._accept_thread is not None:
            self._accept_thread.join(2.0)
            self._accept_thread = None
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.wake()
        for conn in conns:
            conn.thread.join(2.0)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            active = len(self._conns)
            counters = dict(self.counters)
        return {
            "type": self.type,
            "name": self.name,
            "host": self.config.host,
            "port": self.port,
            "listening": self._server is not None,
            "tls": bool(self.config.cert_file),
            "active_connections": active,
            "queued": self._queue.qsize(),
            **counters,
        }

    # ---------------------------------------------------------------- records
    def records(self, checkpoint: Any, stop: threading.Event) -> Iterator[RawRecord | None]:
        if self._server is None:
            self.start()
        q = self._queue
        while not stop.is_set():
            try:
                raw = q.get(timeout=0.5)
            except queue.Empty:
                yield None
                continue
            yield raw

    def normalize(self, raw: RawRecord) -> list[Output]:
        err = raw.meta.get("error") if raw.meta else None
        if err:
            raise Hl7Error(str(err))
        return list(self.mapper.rows(raw.payload))

    # ---------------------------------------------------------------- threads
    def _accept(self) -> None:
        srv = self._server
        while not self._closing.is_set() and srv is not None:
            try:
                sock, addr = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.1)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conn_no += 1
                no = self._conn_no
                full = len(self._conns) >= self.config.max_connections
                if full:
                    self.counters["connections_refused"] += 1
                else:
                    self.counters["connections"] += 1
            if full:
                from connectors.net import peer_address

                sock.close()
                self.ledger.receipt(
                    self.name,
                    f"connection {no} from {peer_address(addr)}",
                    peer=peer_address(addr),
                    status="rejected",
                    reason=f"too many connections (max_connections={self.config.max_connections})",
                )
                continue
            conn = _Conn(self, sock, addr, no)
            with self._lock:
                self._conns.add(conn)
            conn.thread.start()

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _next_no(self) -> int:
        with self._lock:
            self._n += 1
            self.counters["messages"] += 1
            return self._n

    def _count(self, key: str) -> None:
        with self._lock:
            self.counters[key] = self.counters.get(key, 0) + 1

    def _put(self, raw: RawRecord) -> None:
        while not self._closing.is_set():
            try:
                self._queue.put(raw, timeout=0.5)
                return
            except queue.Full:
                continue


# ---------------------------------------------------------------------------- smoke test CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m connectors.hl7 HOST PORT [FILE ...]``: send each file (one HL7 message,
    segments on lines) to an MLLP listener and print the ACK. Without files a harmless
    ``NMQ^N01`` test message is sent (no context is changed)."""
    ap = argparse.ArgumentParser(prog="python -m connectors.hl7", description=main.__doc__)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("files", nargs="*")
    ap.add_argument("--ca", default="", help="CA to verify the listener (enables TLS)")
    ap.add_argument("--cert", default="", help="client certificate (PEM)")
    ap.add_argument("--key", default="", help="client key (PEM)")
    ap.add_argument("--timeout", type=float, default=30.0)
    a = ap.parse_args(argv)
    ctx = None
    if a.ca or a.cert:
        ctx = ssl.create_default_context(cafile=a.ca or None)
        if a.cert:
            ctx.load_cert_chain(a.cert, a.key or None)
    messages: list[bytes] = []
    for path in a.files:
        with open(path, "rb") as fh:
            messages.append(fh.read().replace(b"\r\n", b"\r").replace(b"\n", b"\r"))
    if not messages:
        now = datetime.now().strftime("%Y%m%d%H%M%S")
        messages.append(
            f"MSH|^~\\&|SMOKE|IT|EMRWATCH|HOSP|{now}||NMQ^N01|SMOKE{now}|P|2.5\r".encode()
        )
    worst = 0
    with MllpClient(a.host, a.port, timeout=a.timeout, ssl_context=ctx) as client:
        for m in messages:
            ack = client.send(m)
            assert ack is not None
            print(f"{ack.code} {ack.control_id} {ack.text or ack.error}".rstrip())
            worst = max(worst, 0 if ack.ok else 1)
    return worst


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
