"""Canonical access events (CONTRACTS §3) as JSON lines or CSV rows → :class:`AccessEvent`.

Both formats go through :meth:`AccessEvent.from_dict`, so they accept exactly the same
events; this module adds what a file format needs on top: JSON decoding, CSV header and
row handling, and turning every kind of bad record into :class:`EventError`.

>>> e = parse_jsonl_line(b'{"event_id":"e1","ts":"2026-03-01T08:00:00+08:00",'
...     b'"user_id":"u1","patient_id":"p1","action":"view","emergency":"1"}')
>>> e.user_id, e.emergency
('u1', True)
>>> rows = [b"event_id,ts,user_id,patient_id,action", b"",
...         b"e2,2026-03-01T08:00:00+08:00,u1,p1,print", b"e3,not-a-time,u1,p1,view"]
>>> [(n, type(r).__name__) for n, r, _ in iter_csv(rows)]
[(3, 'AccessEvent'), (4, 'EventError')]
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson

from emrwatch.events import CANONICAL_FIELDS, AccessEvent, EventError

__all__ = ["iter_csv", "parse_canonical", "parse_csv_header", "parse_csv_row", "parse_jsonl_line"]

#: Every scalar field an event may carry (the canonical ones and the optional extras); they
#: must be JSON scalars: a nested object here would become a garbage id.
EVENT_FIELDS = (*CANONICAL_FIELDS, "encounter_id", "event_category")
_SCALARS = (str, int, float, bool)
_NESTED = frozenset({dict, list})  # extras may nest; canonical fields may not
REQUIRED_COLUMNS = ("event_id", "ts", "user_id")

_loads = orjson.loads


def parse_jsonl_line(line: bytes | bytearray | memoryview | str) -> AccessEvent:
    """One canonical JSON line → event; invalid JSON is an :class:`EventError` too."""
    try:
        obj = _loads(line)
    except orjson.JSONDecodeError as exc:
        raise EventError(f"invalid JSON: {exc}") from None
    return parse_canonical(obj)


def parse_canonical(obj: Any) -> AccessEvent:
    """A decoded canonical object → event. Only :class:`EventError` ever escapes."""
    if type(obj) is not dict:
        raise EventError(f"expected a JSON object, got {_kind(obj)}")
    if not _NESTED.isdisjoint(map(type, obj.values())):  # C-speed screen, then find it
        for name in EVENT_FIELDS:
            value = obj.get(name)
            if value is not None and not isinstance(value, _SCALARS):
                raise EventError(f"field {name!r} must be a string, got {_kind(value)}")
    try:
        return AccessEvent.from_dict(obj)
    except EventError:
        raise
    except (TypeError, AttributeError, ValueError, OverflowError) as exc:
        raise EventError(f"malformed event ({type(exc).__name__}: {exc})") from None


def parse_csv_header(line: bytes | str) -> list[str]:
    """Column names of a header line (BOM and surrounding blanks removed)."""
    text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
    text = text.lstrip("\ufeff")
    try:
        names = next(csv.reader((text,)), [])
    except csv.Error:
        names = text.split(",")
    return [name.strip() for name in names]


def parse_csv_row(header: Sequence[str], values: Sequence[str]) -> AccessEvent:
    """One CSV row → event. Empty cells mean "not set" (CONTRACTS §2)."""
    if len(values) != len(header):
        raise EventError(f"row has {len(values)} fields, header has {len(header)}")
    return parse_canonical({k: v for k, v in zip(header, values, strict=True) if v != ""})


def iter_csv(
    lines: Iterable[bytes | str], start: int = 1
) -> Iterator[tuple[int, AccessEvent | EventError, bytes]]:
    """(line number, event or error, raw line bytes) for every non-blank row after the header.

    The first non-blank line is the header. Each physical line is one row: a quoted field
    may not span lines, so one stray quote cannot swallow the rest of a log. The raw
    bytes are the row exactly as read (newline removed), ready for a dead-letter record.
    """
    header: list[str] | None = None
    header_error: EventError | None = None
    for number, line in enumerate(lines, start):
        raw = _chomp(line if isinstance(line, bytes) else line.encode("utf-8", "surrogateescape"))
        if not raw.strip():
            continue
        if header is None:
            header = parse_csv_header(raw)
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                header_error = EventError(
                    f"CSV header (line {number}) has no {', '.join(missing)} column"
                )
            continue
        if header_error is not None:
            yield number, header_error, raw
            continue
        yield number, _parse_row(header, raw), raw


def _parse_row(header: Sequence[str], raw: bytes) -> AccessEvent | EventError:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return EventError(f"row is not valid UTF-8 (byte {exc.start})")
    try:
        values = next(csv.reader((text,), strict=True))
    except csv.Error as exc:
        return EventError(f"bad CSV row: {exc}")
    try:
        return parse_csv_row(header, values)
    except EventError as exc:
        return exc


def _chomp(line: bytes) -> bytes:
    """The line without its newline (``\\n`` or ``\\r\\n``)."""
    if line.endswith(b"\n"):
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
    return line


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "number" if isinstance(value, int | float) else type(value).__name__
    )
