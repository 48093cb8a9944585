"""Event files → (line number, event or error, raw bytes), for replay and the file connectors.

Replay must skip, count and report a malformed line without stopping (CONTRACTS §1), so
:func:`read_events` never raises for a bad line and never drops one: every non-blank line
comes out, as an :class:`AccessEvent` or as the :class:`EventError` that says why not,
with its 1-based physical line number and its bytes for a dead-letter record.

>>> import tempfile, os
>>> d = tempfile.mkdtemp(); p = os.path.join(d, "ev.jsonl")
>>> _ = open(p, "wb").write(b'{"event_id":"e1","ts":"2026-03-01T08:00:00Z","user_id":"u"}\\n'
...                          b'\\n{oops\\n')
>>> detect_format(p)
'jsonl'
>>> [(n, type(r).__name__) for n, r, _ in read_events(p)]
[(1, 'AccessEvent'), (3, 'EventError')]
"""

from __future__ import annotations

import gzip
import io
import os
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import IO, Any

import orjson

from connectors.canonical import iter_csv, parse_jsonl_line
from connectors.fhir import parse_fhir_line
from emrwatch.events import AccessEvent, EventError

__all__ = ["FORMATS", "ParseStats", "Record", "detect_format", "read_events"]

FORMATS = ("fhir", "jsonl", "csv")
#: (1-based line number, the event or why not, the line's bytes without its newline)
Record = tuple[int, AccessEvent | EventError, bytes]

_BUFFER = 1 << 20  # large reads: replay is I/O-bound before it is CPU-bound
_SNIFF_LINES = 20  # non-blank lines looked at; a garbage first line must not decide alone
_JSON_EXTENSIONS = frozenset({".ndjson", ".jsonl", ".json"})
_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)

PathLike = str | os.PathLike[str]


def detect_format(path: PathLike) -> str:
    """ "fhir", "jsonl" or "csv" for a file (gzip or not), by extension and content.

    ``.csv`` is CSV. Otherwise the first JSON object among the first non-blank lines
    decides: ``"resourceType": "AuditEvent"`` → fhir, any other object → jsonl. With no
    JSON object, a JSON extension (``.ndjson``, ``.jsonl``, ``.json``) still means jsonl
    (its lines will be reported as bad); anything else is CSV. Stdin ("-") cannot be
    sniffed without consuming it: :func:`read_events` does that itself.
    """
    if _is_stdin(path):
        raise ValueError("cannot detect the format of stdin without reading it; use read_events")
    source = _Input(path)
    try:
        head, _ = _prefetch(source.stream)
    finally:
        source.close()
    return _sniff(_name(path), head)


def read_events(
    path: PathLike, fmt: str = "auto", prefilter: Callable[[bytes], bool] | None = None
) -> Iterator[Record]:
    """Every non-blank line of ``path`` ("-" for stdin; gzip is detected) as a :data:`Record`.

    Opens the file before returning, so a missing file or a bad ``fmt`` fails at once,
    not at the first ``next()``. A truncated gzip stream ends the iteration with one
    error record for the line it cut, instead of an exception that would lose the count.
    ``prefilter``: for a search, a JSON line (FHIR, JSONL) it says no to is skipped
    unparsed (CSV lines are all parsed).
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected auto, {', '.join(FORMATS)}")
    return _records(_Input(path), _name(path), fmt, prefilter)


@dataclass(slots=True)
class ParseStats:
    """Good and bad record counts, with the first ``keep`` bad lines kept for the report."""

    ok: int = 0
    bad: int = 0
    keep: int = 20
    first_bad: list[tuple[int, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.ok + self.bad

    def add(self, line_no: int, result: AccessEvent | EventError) -> None:
        if isinstance(result, EventError):
            self.bad += 1
            if len(self.first_bad) < self.keep:
                self.first_bad.append((line_no, str(result)))
        else:
            self.ok += 1

    def track(self, records: Iterable[Record]) -> Iterator[Record]:
        """Pass records through unchanged, counting them on the way."""
        for record in records:
            self.add(record[0], record[1])
            yield record

    def summary(self) -> str:
        """Plain text for stderr: the counts, then one line per kept bad line."""
        lines = [f"{self.ok} events read, {self.bad} malformed lines skipped"]
        lines += [f"  line {n}: {reason}" for n, reason in self.first_bad]
        if self.bad > len(self.first_bad):
            lines.append(f"  ... and {self.bad - len(self.first_bad)} more")
        return "\n".join(lines)


# --------------------------------------------------------------------------- internals


def _records(
    source: _Input, name: str, fmt: str, prefilter: Callable[[bytes], bool] | None = None
) -> Iterator[Record]:
    try:
        head, broken = _prefetch(source.stream)
        if fmt == "auto":
            fmt = _sniff(name, head)
        lines: Iterable[bytes | EventError]
        if broken is not None:
            lines = chain(head, (broken,))
        elif source.gzipped:
            lines = _safe_lines(chain(head, source.stream))
        else:
            lines = chain(head, source.stream)
        if fmt == "csv":
            yield from _csv_records(lines)
        else:
            parse = parse_fhir_line if fmt == "fhir" else parse_jsonl_line
            yield from _json_records(lines, parse, prefilter)
    finally:
        source.close()


def _json_records(
    lines: Iterable[bytes | EventError],
    parse: Callable[[bytes], AccessEvent],
    prefilter: Callable[[bytes], bool] | None = None,
) -> Iterator[Record]:
    number = 0
    for line in lines:
        number += 1
        if isinstance(line, EventError):
            yield number, line, b""
            return
        raw = line.rstrip(b"\r\n")
        if number == 1 and raw.startswith(_BOM):
            raw = raw[3:]
        if not raw.strip() or (prefilter is not None and not prefilter(raw)):
            continue
        try:
            result: AccessEvent | EventError = parse(raw)
        except EventError as exc:
            result = exc
        except Exception as exc:  # a parser bug must not end a replay; it is reported
            result = EventError(f"unexpected {type(exc).__name__} in parser: {exc}")
        yield number, result, raw


def _csv_records(lines: Iterable[bytes | EventError]) -> Iterator[Record]:
    """CSV rows, stopping (with one error record) where a gzip stream broke off."""
    failure: list[tuple[int, EventError]] = []

    def plain() -> Iterator[bytes]:
        for number, line in enumerate(lines, 1):
            if type(line) is EventError:
                failure.append((number, line))
                return
            yield line  # type: ignore[misc]

    yield from iter_csv(plain())
    for number, error in failure:
        yield number, error, b""


def _safe_lines(lines: Iterable[bytes]) -> Iterator[bytes | EventError]:
    """Lines, then one :class:`EventError` if the (gzip) stream is corrupt or truncated."""
    it = iter(lines)
    while True:
        try:
            line = next(it)
        except StopIteration:
            return
        except _GZIP_ERRORS as exc:
            yield _broken(exc)
            return
        yield line


def _broken(exc: BaseException) -> EventError:
    return EventError(
        f"compressed input is corrupt or truncated here ({type(exc).__name__}: {exc})"
    )


def _prefetch(stream: Iterable[bytes]) -> tuple[list[bytes], EventError | None]:
    """Read lines until :data:`_SNIFF_LINES` non-blank ones (or EOF); they are replayed.

    Also returns the error that ended the read early if the gzip stream broke off.
    """
    head: list[bytes] = []
    seen = 0
    try:
        for line in stream:
            head.append(line)
            if line.strip():
                seen += 1
                if seen >= _SNIFF_LINES:
                    break
    except _GZIP_ERRORS as exc:
        return head, _broken(exc)
    return head, None


def _sniff(name: str, head: list[bytes]) -> str:
    ext = _extension(name)
    if ext == ".csv":
        return "csv"
    for i, line in enumerate(head):
        text = line.strip()
        if i == 0 and text.startswith(_BOM):
            text = text[3:]
        if not text.startswith(b"{"):
            continue
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError:
            continue
        if type(obj) is dict:
            return "fhir" if obj.get("resourceType") == "AuditEvent" else "jsonl"
    return "jsonl" if ext in _JSON_EXTENSIONS else "csv"


class _Input:
    """A large-buffered binary stream over a file or stdin, gunzipped when the data starts
    with the gzip magic (whatever the name says), and what must be closed after it."""

    def __init__(self, path: PathLike) -> None:
        raw: Any  # a BufferedReader: peek() sniffs the gzip magic
        if _is_stdin(path):
            stdin: Any = sys.stdin.buffer  # a BufferedReader, or whatever replaced it
            raw = stdin if hasattr(stdin, "peek") else io.BufferedReader(stdin, _BUFFER)
            self._owned: IO[bytes] | None = None  # never close the process's stdin
        else:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
            limit = read_limit(path, f)
            raw = io.BufferedReader(f if limit is None else _Bounded(f, limit), _BUFFER)
            self._owned = raw
        self.gzipped = raw.peek(2)[:2] == _GZIP_MAGIC
        self.stream: IO[bytes] | gzip.GzipFile = raw
        if self.gzipped:
            # No big BufferedReader on top: its read(n) gathers n bytes over several
            # decompressor reads and drops them all if the last one hits a truncated end.
            self.stream = gzip.GzipFile(fileobj=raw, mode="rb")

    def close(self) -> None:
        if self.gzipped:
            self.stream.close()  # the gzip layer only: GzipFile leaves its fileobj open
        if self._owned is not None:
            self._owned.close()


def read_limit(path: PathLike, f: Any) -> int | None:
    """How much to read of the file ``path`` opened as ``f``: of a history export's events
    file, what its manifest commits (an update may be appending behind it; see
    :func:`pipeline.history.committed_length`). None for any other file: to its end."""
    if os.path.basename(os.fspath(path)) != "events.jsonl":
        return None
    from pipeline.history import committed_length

    return committed_length(os.path.dirname(os.path.abspath(path)), os.fstat(f.fileno()).st_ino)


class _Bounded(io.RawIOBase):
    """The first ``limit`` bytes of the raw file ``f``."""

    def __init__(self, f: Any, limit: int) -> None:
        self._f = f
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            return 0
        n = self._f.readinto(memoryview(buffer)[: self._left]) or 0
        self._left -= n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def _is_stdin(path: PathLike) -> bool:
    return isinstance(path, str) and path == "-"


def _name(path: PathLike) -> str:
    return "" if _is_stdin(path) else os.fspath(path)


def _extension(name: str) -> str:
    """``events.ndjson.gz`` → ``.ndjson``: the extension under any ``.gz``."""
    root, ext = os.path.splitext(name.lower())
    if ext == ".gz":
        ext = os.path.splitext(root)[1]
    return ext


def read_lines(
    path: PathLike, fmt: str
) -> Iterator[tuple[int, bytes, Callable[[bytes], AccessEvent]]]:
    """(line number, stripped bytes, parser) for each non-blank line of a plain JSON-lines
    file, without parsing: lets a partitioned replay parse only the lines it owns."""
    if fmt not in ("fhir", "jsonl"):
        raise ValueError(f"read_lines reads fhir or jsonl, not {fmt!r}")
    parse = parse_fhir_line if fmt == "fhir" else parse_jsonl_line
    with open(path, "rb", buffering=_BUFFER) as fh:
        for number, line in enumerate(fh, 1):
            raw = line.rstrip(b"\r\n")
            if number == 1 and raw.startswith(_BOM):
                raw = raw[3:]
            if raw.strip():
                yield number, raw, parse
