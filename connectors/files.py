"""File connectors: event files, vendor exports with a mapping, tailed logs, signed drops,
and the context CSVs.

``file`` reads FHIR AuditEvent NDJSON, canonical JSONL or CSV (``format: auto`` sniffs),
in one of three modes:

* ``once``: read every file matching ``path`` (a file or a glob) to the end, then stop;
* ``tail``: follow a growing log like ``tail -F``: new lines as they are appended, and
  across rotation (the renamed file is finished first, then the new one is read from its
  start; a ``copytruncate`` rotation is noticed because the file became shorter);
* ``drops``: watch a drop directory for new complete files; each is read once.

Vendor exports rarely use canonical names. ``columns`` maps canonical fields to the vendor's
columns (or JSON keys), ``values`` maps vendor values to canonical ones (``action``:
``{"Chart Opened": view, "Report Printed": print}``), ``defaults`` fills fields the export
lacks, and ``timestamp_format`` + ``timezone`` turn local vendor timestamps into ISO 8601
with an offset. A value the map does not know fails with a message that says which map to
extend, and the record goes to the dead-letter topic.

Signed drops (``verify: hmac-sha256``): every data file ``F`` comes with ``F.hmac`` holding
the hex HMAC-SHA256 of ``F`` under a shared key (``key_file`` or ``key_env``). A file whose
signature is missing or wrong is moved to ``quarantine_dir`` with a ``.reason`` file and a
ledger receipt; nothing of it is read. Every file that is read gets a ledger receipt with
its records, bytes and SHA-256.

The checkpoint names files by device and inode (not by name, which rotation reuses) with
the byte offset after the last record, so a restart resumes in the middle of a file.

``fhir-file`` is ``file`` with ``format: fhir``; ``context-csv`` publishes the context CSVs
of CONTRACTS §2 (and, with ``watch``, re-publishes a file whenever it changes).
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import hmac
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal
from zoneinfo import ZoneInfo

import orjson

from connectors.base import Connector, ConnectorConfigError, ContextUpdate, Output, RawRecord
from connectors.canonical import (
    EVENT_FIELDS,
    parse_canonical,
    parse_csv_header,
    parse_jsonl_line,
)
from connectors.fhir import parse_fhir_line
from connectors.readers import _sniff
from emrwatch.context import CONTEXT_FILES, ContextError, record_from_row
from emrwatch.events import EventError
from emrwatch.timeutil import DEFAULT_TIMEZONE, LocalClock, zone

log = logging.getLogger(__name__)

_BOM = b"\xef\xbb\xbf"
_SIDECAR = ".hmac"
#: the fields a vendor mapping may fill: the canonical ones and the optional extras
_CANONICAL_NAMES = frozenset(EVENT_FIELDS)


def _help(text: str, default: Any = None, factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class FileConfig:
    path: str = field(metadata={"help": "a file, or a glob of files (drops: 'dir/*.csv')"})
    format: Literal["auto", "fhir", "jsonl", "csv"] = _help(
        "auto sniffs each file: FHIR AuditEvent NDJSON, canonical JSONL, or CSV", "auto"
    )
    mode: Literal["once", "tail", "drops"] = _help(
        "once: read and stop; tail: follow appends and rotation; drops: watch for new files",
        "once",
    )
    poll_interval_s: float = _help("how often tail/drops look for new data", 0.5)
    columns: dict[str, str] = _help(
        "canonical field -> vendor column or JSON key (vendor exports)", factory=dict
    )
    values: dict[str, dict[str, str]] = _help(
        "canonical field -> {vendor value: canonical value}, e.g. action names", factory=dict
    )
    defaults: dict[str, str] = _help(
        "canonical field -> value when the record has none", factory=dict
    )
    timestamp_format: str = _help("strptime format of vendor timestamps (default ISO 8601)", "")
    timezone: str = _help("zone of timestamps without a UTC offset", "")
    delimiter: str = _help("CSV delimiter", ",")
    encoding: str = _help("text encoding of CSV files", "utf-8")
    verify: Literal["none", "hmac-sha256"] = _help(
        "hmac-sha256: each file F needs F.hmac (hex HMAC-SHA256 of F) or is quarantined", "none"
    )
    key_file: str = _help("file holding the HMAC key (verify)", "")
    key_env: str = _help("environment variable holding the HMAC key (verify)", "")
    quarantine_dir: str = _help("where refused files go (default: <drop dir>/quarantine)", "")
    sidecar_wait_s: float = _help("drops: how long a file may wait for its .hmac", 300.0)
    done_dir: str = _help("drops: move each fully read file here", "")

    def validate(self) -> None:
        if self.mode == "tail" and self.verify != "none":
            raise ValueError("verify needs complete files: use mode drops or once, not tail")
        if self.verify != "none" and not (self.key_file or self.key_env):
            raise ValueError("verify: set key_file or key_env")
        if self.timezone:
            try:
                zone(self.timezone)
            except ValueError as exc:
                raise ValueError(f"timezone: {exc}") from None
        if len(self.delimiter) != 1:
            raise ValueError("delimiter: one character")
        for f in (*self.columns, *self.values, *self.defaults):
            if f not in _CANONICAL_NAMES:
                raise ValueError(
                    f"{f!r} is not a canonical field ({', '.join(sorted(_CANONICAL_NAMES))})"
                )


@dataclass
class _Open:
    """A file being read."""

    path: str
    key: str
    fh: Any
    offset: int
    line: int
    fmt: str
    header: list[str] | None
    live: bool
    size_at_open: int
    count: int = 0


class FileConnector(Connector):
    type = "file"
    summary = "event files: FHIR NDJSON, canonical JSONL/CSV, vendor exports; tail and drops"
    Config = FileConfig
    produces = frozenset({"access"})
    default_format: ClassVar[str] = "auto"

    def __init__(self, config: FileConfig, name: str = "", ledger: Any = None) -> None:
        super().__init__(config, name, ledger)
        cfg = config
        self._mapped = bool(
            cfg.columns or cfg.values or cfg.defaults or cfg.timestamp_format or cfg.timezone
        )
        self._tz = ZoneInfo(cfg.timezone or DEFAULT_TIMEZONE)
        taken = set(cfg.columns.values())
        #: (canonical field, record column): mapped columns, and canonical names not taken
        self._plan = [
            (name, cfg.columns.get(name, name))
            for name in sorted(_CANONICAL_NAMES)
            if name in cfg.columns or name not in taken
        ]
        self._key: bytes | None = None
        if cfg.verify != "none":
            self._key = _load_key(cfg.key_file, cfg.key_env)

    @classmethod
    def from_dict(
        cls, data: Any, name: str = "", ledger: Any = None, section: str = ""
    ) -> Connector:
        data = dict(data)
        if cls.default_format != "auto":
            data.setdefault("format", cls.default_format)
        return super().from_dict(data, name, ledger, section)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": self.config.path, "mode": self.config.mode}

    # ------------------------------------------------------------------ reading
    def _candidates(
        self, live_keys: set[str], tracked: set[str]
    ) -> list[tuple[str, str, os.stat_result]]:
        cfg = self.config
        paths = sorted(glob.glob(cfg.path)) if glob.has_magic(cfg.path) else [cfg.path]
        out = []
        seen = set()
        for p in paths:
            if p.endswith(_SIDECAR) or p.endswith(".reason"):
                continue
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            if not os.path.isfile(p):
                continue
            k = _file_key(st)
            seen.add(k)
            out.append((p, k, st))
            live_keys.add(k)
        if cfg.mode == "tail":
            # rotated predecessors we were reading: finish them first
            for p in glob.glob(glob.escape(cfg.path) + ".*") + glob.glob(
                glob.escape(cfg.path) + "-*"
            ):
                if p.endswith(".gz"):
                    continue
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    continue
                k = _file_key(st)
                if k in tracked and k not in seen:
                    out.insert(0, (p, k, st))
        out.sort(key=lambda x: (x[1] not in tracked, x[2].st_mtime, x[0]))
        return out

    def records(self, checkpoint: Any, stop: threading.Event) -> Iterator[RawRecord | None]:
        cfg = self.config
        cp = checkpoint or {}
        done: dict[str, int] = dict(cp.get("done") or {})
        cur = cp.get("cur")  # [key, offset, line]
        offsets: dict[str, tuple[int, int]] = {}
        if cur:
            offsets[cur[0]] = (int(cur[1]), int(cur[2]))
        waiting_since: dict[str, float] = {}
        while True:
            progressed = False
            live: set[str] = set()
            tracked = set(offsets)
            for path, key, st in self._candidates(live, tracked):
                if stop.is_set():
                    return
                if key in done and cfg.mode != "tail":
                    continue
                if cfg.mode == "tail" and key in done and st.st_size <= done[key]:
                    continue
                is_live = cfg.mode == "tail" and key in live
                off, line = offsets.get(key, (done.get(key, 0), 0) if key in done else (0, 0))
                if st.st_size < off:  # copytruncate or a rewritten file
                    log.warning(
                        "%s: %s became shorter (%d < %d); reading it from the start",
                        self.name,
                        path,
                        st.st_size,
                        off,
                    )
                    off, line = 0, 0
                if st.st_size == off and off > 0:
                    if not is_live and key not in done:
                        done = {**done, key: off}
                        offsets.pop(key, None)
                    continue
                if self._key is not None and key not in done:
                    verdict = self._verify(path, st, waiting_since)
                    if verdict == "wait":
                        continue
                    if verdict != "ok":
                        done = {**done, key: -1}
                        progressed = True
                        continue
                    digest = str(waiting_since.pop(path + "#sha", ""))
                else:
                    digest = ""
                for rec in self._read_file(path, key, st, off, line, is_live, done):
                    if rec is None:
                        break
                    progressed = True
                    yield rec
                    if stop.is_set():
                        return
                of = self._last
                if of is not None:
                    offsets[key] = (of.offset, of.line)
                    complete = not is_live
                    if complete:
                        done = {**done, key: of.offset}
                        offsets.pop(key, None)
                        self.ledger.receipt(
                            self.name,
                            path,
                            peer=path,
                            records=of.count,
                            size=of.offset - off,
                            digest=digest,
                        )
                        if cfg.mode == "drops" and cfg.done_dir:
                            _move(path, cfg.done_dir)
                    self._last = None
            # forget files that are gone (done entries of deleted drops)
            if cfg.mode != "once" and len(done) > 1000:
                done = {k: v for k, v in done.items() if k in live}
            if cfg.mode == "once":
                return
            if not progressed:
                yield None
                if stop.wait(cfg.poll_interval_s):
                    return

    _last: _Open | None = None

    def _read_file(
        self,
        path: str,
        key: str,
        st: os.stat_result,
        off: int,
        line: int,
        is_live: bool,
        done: dict[str, int],
    ) -> Iterator[RawRecord | None]:
        cfg = self.config
        gz = path.endswith(".gz")
        opener = gzip.open if gz else open
        with opener(path, "rb") as fh:  # type: ignore[operator]
            fmt = cfg.format
            header: list[str] | None = None
            if fmt == "auto" or fmt == "csv":
                head = []
                for _ in range(20):
                    ln = fh.readline()
                    if not ln:
                        break
                    head.append(ln)
                if fmt == "auto":
                    fmt = _sniff(path, head)
                if fmt == "csv":
                    for ln in head:
                        if ln.strip():
                            header = _csv_header(ln, cfg.delimiter, cfg.encoding)
                            break
                    if header is None and is_live:
                        self._last = None
                        return  # header not written yet
                fh.seek(0)
            if off:
                fh.seek(off)
            of = self._last = _Open(path, key, fh, off, line, fmt, header, is_live, st.st_size)
            base = os.path.basename(path)
            ino = key.rsplit(":", 1)[-1]
            meta = {"format": fmt, "header": header, "file": base}
            readline = fh.readline
            header_seen = header is not None and off > 0
            while True:
                raw = readline()
                if not raw:
                    return
                if is_live and not raw.endswith(b"\n"):
                    fh.seek(of.offset)  # a line still being written: wait for its end
                    return
                of.offset += len(raw)
                of.line += 1
                body = raw.rstrip(b"\r\n")
                if of.line == 1 and body.startswith(_BOM):
                    body = body[3:]
                if not body.strip():
                    continue
                if header is not None and not header_seen:
                    header_seen = True  # the header row itself
                    continue
                of.count += 1
                yield RawRecord(
                    payload=body,
                    position=f"{base} line {of.line} (inode {ino})",
                    checkpoint={"done": done, "cur": [key, of.offset, of.line]},
                    peer=path,
                    meta=meta,
                )

    def _verify(self, path: str, st: os.stat_result, waiting: dict[str, Any]) -> str:
        """ "ok", "wait" (signature not there yet) or "refused" (quarantined)."""
        cfg = self.config
        sig_path = path + _SIDECAR
        if not os.path.exists(sig_path):
            first = waiting.setdefault(path, time.monotonic())
            if cfg.mode == "drops" and time.monotonic() - first < cfg.sidecar_wait_s:
                return "wait"
            self._quarantine(path, st, f"no signature file {os.path.basename(sig_path)}")
            return "refused"
        try:
            want = Path(sig_path).read_text("ascii").strip().lower().removeprefix("sha256=")
        except (OSError, UnicodeDecodeError) as exc:
            self._quarantine(path, st, f"unreadable signature file: {exc}")
            return "refused"
        mac = hmac.new(self._key or b"", digestmod=hashlib.sha256)
        sha = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                mac.update(chunk)
                sha.update(chunk)
        if not hmac.compare_digest(mac.hexdigest(), want):
            self._quarantine(path, st, "HMAC-SHA256 signature does not match the file")
            return "refused"
        waiting.pop(path, None)
        waiting[path + "#sha"] = sha.hexdigest()
        return "ok"

    def _quarantine(self, path: str, st: os.stat_result, reason: str) -> None:
        cfg = self.config
        qdir = cfg.quarantine_dir or os.path.join(os.path.dirname(path), "quarantine")
        os.makedirs(qdir, exist_ok=True)
        dest = _move(path, qdir)
        if os.path.exists(path + _SIDECAR):
            _move(path + _SIDECAR, qdir)
        Path(dest + ".reason").write_text(reason + "\n", "utf-8")
        log.warning("%s: quarantined %s: %s", self.name, path, reason)
        self.ledger.receipt(
            self.name, path, peer=path, size=st.st_size, status="quarantined", reason=reason
        )

    # ------------------------------------------------------------------ normalising
    def normalize(self, raw: RawRecord) -> list[Output]:
        meta = raw.meta
        fmt = meta.get("format", "jsonl")
        payload = raw.payload
        if fmt == "fhir":
            if self._mapped:
                raise EventError("columns/values mappings apply to JSONL and CSV, not FHIR")
            return [parse_fhir_line(payload)]
        if not self._mapped:
            if fmt == "jsonl":
                return [parse_jsonl_line(payload)]
            return [parse_canonical(self._csv_row(payload, meta))]
        if fmt == "jsonl":
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError as exc:
                raise EventError(f"invalid JSON: {exc}") from None
            if type(obj) is not dict:
                raise EventError("expected a JSON object")
        else:
            obj = self._csv_row(payload, meta)
        return [self._mapped_event(obj)]

    def _csv_row(self, payload: bytes, meta: Any) -> dict[str, Any]:
        header = meta.get("header")
        if not header:
            raise EventError("CSV file has no header row")
        row = csv_fields(payload, header, self.config.delimiter, self.config.encoding)
        return {k: v for k, v in row.items() if v != ""}

    def _mapped_event(self, rec: dict[str, Any]) -> Any:
        cfg = self.config
        out: dict[str, Any] = {}
        for name, col in self._plan:
            v = rec.get(col)
            if v is not None and v != "":
                out[name] = v
        for name, value in cfg.defaults.items():
            if out.get(name) in (None, ""):
                out[name] = value
        for name, table in cfg.values.items():
            if name in out:
                v = out[name]
                key = v.strip() if isinstance(v, str) else v
                if key in table:
                    out[name] = table[key]
        ts = out.get("ts")
        if isinstance(ts, str) and (cfg.timestamp_format or cfg.timezone):
            out["ts"] = self._timestamp(ts)
        try:
            return parse_canonical(out)
        except EventError as exc:
            hint = ""
            msg = str(exc)
            for name in cfg.values:
                if f"unknown {name}" in msg:
                    hint = f" (add it to values.{name})"
            raise EventError(msg + hint) from None

    def _timestamp(self, value: str) -> str:
        fmt = self.config.timestamp_format
        try:
            dt = datetime.strptime(value.strip(), fmt) if fmt else datetime.fromisoformat(value)
        except ValueError:
            raise EventError(f"timestamp {value!r} does not match {fmt or 'ISO 8601'!r}") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=self._tz)
        return dt.isoformat()


class FhirFileConnector(FileConnector):
    type = "fhir-file"
    summary = "FHIR AuditEvent NDJSON files (R4 and R5): once, tail or drops"
    default_format = "fhir"


def csv_fields(
    payload: bytes, header: list[str], delimiter: str = ",", encoding: str = "utf-8"
) -> dict[str, str]:
    """One CSV line → column → cell (empty cells kept); :class:`EventError` if unusable.

    >>> csv_fields(b'a,"b, c"', ["x", "y"])
    {'x': 'a', 'y': 'b, c'}
    """
    try:
        text = payload.decode(encoding)
    except (UnicodeDecodeError, LookupError) as exc:
        raise EventError(f"row is not valid {encoding}: {exc}") from None
    try:
        values = next(csv.reader((text,), delimiter=delimiter, strict=True))
    except csv.Error as exc:
        raise EventError(f"bad CSV row: {exc}") from None
    except StopIteration:
        values = []
    if len(values) != len(header):
        raise EventError(f"row has {len(values)} fields, header has {len(header)}")
    return dict(zip(header, values, strict=True))


def _file_key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


def _csv_header(line: bytes, delimiter: str, encoding: str) -> list[str]:
    text = _strip_bom(line).decode(encoding, "replace").rstrip("\r\n")
    if delimiter == ",":
        return parse_csv_header(text)
    try:
        names = next(csv.reader((text,), delimiter=delimiter), [])
    except csv.Error:
        names = text.split(delimiter)
    return [n.strip() for n in names]


def _strip_bom(b: bytes) -> bytes:
    return b[3:] if b.startswith(_BOM) else b


def _move(path: str, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    dest = os.path.join(directory, os.path.basename(path))
    if os.path.exists(dest):
        dest = f"{dest}.{int(time.time() * 1000)}"
    shutil.move(path, dest)
    return dest


def _load_key(key_file: str, key_env: str) -> bytes:
    if key_file:
        try:
            key = Path(key_file).read_bytes().strip()
        except OSError as exc:
            raise ConnectorConfigError(f"key_file: {exc}") from None
    else:
        value = os.environ.get(key_env, "")
        if not value:
            raise ConnectorConfigError(f"key_env: environment variable {key_env} is not set")
        key = value.encode()
    if len(key) < 16:
        raise ConnectorConfigError("the HMAC key must be at least 16 bytes")
    return key


def sign_file(path: str | os.PathLike[str], key: bytes) -> Path:
    """Write ``path``.hmac for a drop (what a sending system does; tests and tools).

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "a.csv"; _ = p.write_text("x\\n")
    >>> mac = hmac.new(b"k" * 16, b"x" + bytes([10]), hashlib.sha256).hexdigest()
    >>> sign_file(p, b"k" * 16).read_text().strip() == mac
    True
    """
    mac = hmac.new(key, Path(path).read_bytes(), hashlib.sha256).hexdigest()
    out = Path(f"{os.fspath(path)}{_SIDECAR}")
    out.write_text(mac + "\n", "ascii")
    return out


# ---------------------------------------------------------------------------- context CSVs
@dataclass
class ContextCsvConfig:
    directory: str = field(metadata={"help": "directory with the CONTRACTS §2 CSVs"})
    watch: bool = _help("re-publish a file whenever it changes", False)
    poll_interval_s: float = _help("how often watch looks at the files", 5.0)
    timezone: str = _help("hospital timezone, to check dates and times", DEFAULT_TIMEZONE)

    def validate(self) -> None:
        try:
            zone(self.timezone)
        except ValueError as exc:
            raise ValueError(f"timezone: {exc}") from None


class ContextCsvConnector(Connector):
    type = "context-csv"
    summary = "the context CSVs (staff, patients, encounters, sealed, grants, departments)"
    Config = ContextCsvConfig
    produces = frozenset({"context"})

    def __init__(self, config: ContextCsvConfig, name: str = "", ledger: Any = None) -> None:
        super().__init__(config, name, ledger)
        self._clock = LocalClock(config.timezone)

    def records(self, checkpoint: Any, stop: threading.Event) -> Iterator[RawRecord | None]:
        cfg = self.config
        cp = checkpoint or {}
        seen: dict[str, list[int]] = dict(cp.get("seen") or {})
        cur = cp.get("cur")  # [kind, version, line]
        while True:
            changed = False
            for kind in CONTEXT_FILES:
                path = os.path.join(cfg.directory, f"{kind}.csv")
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                version = [st.st_mtime_ns, st.st_size]
                skip_to = 0
                if cur and cur[0] == kind and cur[1] == version:
                    skip_to = int(cur[2])
                elif seen.get(kind) == version:
                    continue
                changed = True
                rows = 0
                with open(path, "rb") as fh:
                    header: list[str] | None = None
                    for number, raw in enumerate(fh, 1):
                        body = raw.rstrip(b"\r\n")
                        if number == 1:
                            body = _strip_bom(body)
                        if not body.strip():
                            continue
                        if header is None:
                            header = parse_csv_header(body.decode("utf-8", "replace"))
                            continue
                        if number <= skip_to:
                            continue
                        rows += 1
                        yield RawRecord(
                            payload=body,
                            position=f"{kind}.csv line {number} (version {version[0]})",
                            checkpoint={"seen": seen, "cur": [kind, version, number]},
                            peer=path,
                            meta={"kind": kind, "header": header},
                        )
                        if stop.is_set():
                            return
                seen = {**seen, kind: version}
                cur = None
                self.ledger.receipt(self.name, path, peer=path, records=rows, size=st.st_size)
            if not cfg.watch:
                return
            if not changed:
                yield None
                if stop.wait(cfg.poll_interval_s):
                    return

    def normalize(self, raw: RawRecord) -> list[Output]:
        kind = raw.meta["kind"]
        header = raw.meta["header"]
        row = csv_fields(raw.payload, header)
        try:
            rec = record_from_row(kind, row, self._clock)
        except (ContextError, ValueError) as exc:
            raise EventError(f"{kind} row: {exc}") from None
        if not any(
            getattr(rec, a, "") for a in ("user_id", "patient_id", "encounter_id", "department_id")
        ):
            raise EventError(f"{kind} row has no id")
        return [ContextUpdate(kind, row)]
