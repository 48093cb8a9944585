"""``emrwatch replay``: the offline twin of the streaming pipeline.

Same parsers, same :class:`detectors.engine.Engine`, same alerts as the stream. A bad input
line is skipped, counted and reported with its line number; the run never stops for it.

With ``workers > 1`` a plain FHIR/JSONL file is replayed the way the stream runs it:
events are partitioned by ``user_id`` (as the access topic is keyed) and each partition
runs its own engine, in file order, in its own process. All detector state is per user,
so the alerts are identical to a single-process run; a test checks it.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import re
import resource
import sys
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path
from typing import IO, Any

import orjson

from detectors.alerts import Alert
from detectors.config import DetectionConfig
from detectors.engine import Engine, EngineStats
from emrwatch.context import Context
from emrwatch.events import AccessEvent, EventError
from pipeline.file_clock import file_clock

MAX_REPORTED_BAD = 50
#: replay builds alerts once per this many events, like the stream once per batch
DRAIN_EVERY = 1000


@dataclass
class ReplayResult:
    alerts: list[Alert]
    stats: EngineStats
    events: int = 0
    bad: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 1

    @property
    def peak_rss_mb(self) -> float:
        """Peak resident memory of this process or of the largest replay worker, in MiB."""
        me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        return max(me, kids) / 1024

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def collapse(alerts: Iterable[Alert]) -> list[Alert]:
    """Last version of each alert id, in order of first appearance time; alerts whose last
    version retracted them (documentation explained the evidence) are left out."""
    last: dict[str, Alert] = {}
    for a in alerts:
        last[a.alert_id] = a
    live = [a for a in last.values() if a.status != "retracted"]
    return sorted(live, key=lambda a: (a.first_seen, a.alert_id))


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector off for a replay loop, as it was afterwards.

    Replay creates a few container objects per event (the event, its facts, evidence) and
    keeps a growing heap of per-user state, so the collector runs every few hundred events
    and re-traverses that heap: ~7% of a replay, for nothing (the engine makes no reference
    cycles; memory is freed by reference counting as before)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def run_engine(
    eng: Engine, events: Iterable[AccessEvent], end_t: float | None = None
) -> dict[str, Alert]:
    """Feed events in order, draining once per ``DRAIN_EVERY``; the last version of each alert.

    An access stamped far ahead of the input around it (a wrong clock) is judged at the
    input's time there (:func:`pipeline.file_clock.file_clock`, ``replay_clock_ahead_s``).
    At the end the engine's watermark goes to ``end_t``, the input's last event time (a
    partition's engine has not seen the others' events), or else to its own last event."""
    out: dict[str, Alert] = {}
    ingest, drain = eng.ingest, eng.drain
    for i, e in enumerate(file_clock(events, eng.cfg.replay_clock_ahead_s, eng), 1):
        ingest(e)
        if i % DRAIN_EVERY == 0:
            for a in drain():
                out[a.alert_id] = a
    eng.sweep_to(end_t if end_t is not None else eng.watermark)
    for a in eng.drain() + eng.flush():
        out[a.alert_id] = a
    return out


#: how much of an events file's end :func:`input_end_time` reads
END_TAIL_BYTES = 1 << 20


def input_end_time(path: str | Path, fmt: str) -> float | None:
    """The latest event time among the last lines of a plain events file (FHIR NDJSON or
    JSONL): where replay's partitions and the stream's end-of-input marker put the watermark,
    so that each partition closes the visits a single engine closes. None when it cannot tell
    (compressed, CSV, standard input, no parsable line at the end)."""
    from connectors.canonical import parse_jsonl_line
    from connectors.fhir import parse_fhir_line

    if str(path) == "-":
        return None
    if fmt == "auto":
        from connectors.readers import detect_format

        try:
            fmt = detect_format(path)
        except (OSError, ValueError):
            return None
    if fmt not in ("fhir", "jsonl"):
        return None
    parse = parse_fhir_line if fmt == "fhir" else parse_jsonl_line
    try:
        if _gzipped(str(path)):
            return None
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - END_TAIL_BYTES))
            tail = fh.read()
    except OSError:
        return None
    lines = tail.split(b"\n")
    if size > END_TAIL_BYTES:
        lines = lines[1:]  # the first is most likely cut
    best: float | None = None
    for raw in lines:
        if not raw.strip():
            continue
        try:
            t = parse(raw).t
        except Exception:  # noqa: BLE001 - a bad line is replay's to report, not this
            continue
        if best is None or t > best:
            best = t
    return best


def replay_events(
    context: Context, events: Iterable[AccessEvent], config: DetectionConfig | None = None
) -> list[Alert]:
    """Run canonical events through a fresh engine; return the final alerts."""
    return collapse(run_engine(Engine(context, config), events).values())


class _Counter:
    """Splits read records into events and counted, reported bad lines."""

    def __init__(self, res: ReplayResult, name: str, errors: IO[str] | None) -> None:
        self.res, self.name, self.errors = res, name, errors

    def bad(self, line_no: int, err: str) -> None:
        self.res.bad += 1
        if len(self.res.bad_lines) < MAX_REPORTED_BAD:
            self.res.bad_lines.append((line_no, err))
        if self.errors is not None:
            self.errors.write(f"{self.name}:{line_no}: skipped: {err}\n")

    def events(
        self, records: Iterable[tuple[int, AccessEvent | EventError, bytes]]
    ) -> Iterator[AccessEvent]:
        for line_no, item, _raw in records:
            if isinstance(item, EventError):
                self.bad(line_no, str(item))
            else:
                self.res.events += 1
                yield item


def replay_file(
    context_dir: str | Path,
    events_path: str | Path,
    fmt: str = "auto",
    timezone: str | None = None,
    config: DetectionConfig | None = None,
    errors: IO[str] | None = None,
    workers: int = 1,
    collect_unexplained: bool = False,
) -> ReplayResult:
    from connectors.readers import detect_format, read_events

    cfg = config or DetectionConfig()
    ctx = Context.load(context_dir, timezone or cfg.timezone)
    path = str(events_path)
    if workers > 1 and path != "-" and not _gzipped(path):
        real_fmt = detect_format(path) if fmt == "auto" else fmt
        if real_fmt in ("fhir", "jsonl"):
            return _replay_parallel(ctx, cfg, path, real_fmt, workers, errors, collect_unexplained)
    eng = Engine(ctx, cfg)
    if collect_unexplained:
        eng.unexplained_ids = set()
    res = ReplayResult(alerts=[], stats=EngineStats())
    counter = _Counter(res, path, errors)
    t0 = time.perf_counter()
    with paused_gc():
        out = run_engine(eng, counter.events(read_events(events_path, fmt)))
    res.seconds = time.perf_counter() - t0
    res.alerts = collapse(out.values())
    res.stats = eng.stats()
    return res


def _gzipped(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


# ---------------------------------------------------------------------- parallel replay
# Each forked worker reads the whole file but fully parses only the lines of its own users.
# The owner of a line is found from its bytes when that is unambiguous (one agent with an
# identifier, no escapes); otherwise the worker parses the line to find out. The context and
# a fresh engine (rules, models) are built once in the parent and inherited through fork,
# not pickled or rebuilt per worker.
_JOB: dict[str, Any] = {}
_FHIR_WHO = re.compile(
    rb'"who"\s*:\s*\{\s*"identifier"\s*:\s*\{\s*"value"\s*:\s*"([^"\\]*)"\s*\}\s*\}'
)
_JSONL_USER = re.compile(rb'"user_id"\s*:\s*"([^"\\]*)"')
_FHIR_USER_COMPACT = re.compile(rb'"who":\{"identifier":\{"value":"([^"\\]*)"')


#: samples of the input read to balance the workers' loads: how many, and how large
BALANCE_SAMPLES = 64
BALANCE_SAMPLE_BYTES = 1 << 16


def balance_users(path: str, fmt: str, workers: int) -> dict[bytes, int]:
    """Users → worker, so that the workers get about as many events each: the users seen in
    evenly spread samples of the file, heaviest first, each to the least loaded worker.
    Users the samples missed go by :func:`partition_of`. Deterministic for a given file,
    and any assignment gives the same alerts (all detector state is per user)."""
    size = os.path.getsize(path)
    pattern = _FHIR_USER_COMPACT if fmt == "fhir" else _JSONL_USER
    counts: dict[bytes, int] = {}
    with open(path, "rb") as fh:
        for i in range(BALANCE_SAMPLES):
            fh.seek(size * i // BALANCE_SAMPLES)
            for uid in pattern.findall(fh.read(BALANCE_SAMPLE_BYTES)):
                counts[uid] = counts.get(uid, 0) + 1
    load = [0] * workers
    table: dict[bytes, int] = {}
    for uid, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        w = min(range(workers), key=load.__getitem__)
        table[uid] = w
        load[w] += n
    return table


def partition_of(user_id: str, partitions: int) -> int:
    """The same user always lands in the same partition (as with a keyed Kafka topic)."""
    return zlib.crc32(user_id.encode()) % partitions


def owner_hint(raw: bytes, fmt: str) -> bytes | None:
    """The line's user id read from its bytes, or None when only a full parse can tell."""
    key, pattern = (b'"who"', _FHIR_WHO) if fmt == "fhir" else (b'"user_id"', _JSONL_USER)
    at = raw.find(key)
    if at < 0 or raw.find(key, at + len(key)) >= 0:
        return None
    m = pattern.match(raw, at)
    return m.group(1) if m else None


_WHO = b'"who"'
_WHO_COMPACT = b'"who":{"identifier":{"value":"'
_USER = b'"user_id"'
_USER_COMPACT = b'"user_id":"'
_BOM = b"\xef\xbb\xbf"
#: a partition worker reads its input in blocks this large
READ_BLOCK = 1 << 22


def fast_owner_hint(raw: bytes, fmt: str) -> bytes | None:
    """:func:`owner_hint`, with a literal fast path for the compact JSON that every writer we
    know emits (no regular expression for most lines); the same answer on every input."""
    if fmt == "fhir":
        key, compact, pattern, tail = _WHO, _WHO_COMPACT, _FHIR_WHO, b'"}}'
    else:
        key, compact, pattern, tail = _USER, _USER_COMPACT, _JSONL_USER, b'"'
    at = raw.find(key)
    if at < 0 or raw.find(key, at + len(key)) >= 0:
        return None
    if raw.startswith(compact, at):
        start = at + len(compact)
        end = raw.find(b'"', start)
        if end >= 0 and raw.startswith(tail, end) and raw.find(b"\\", start, end) < 0:
            return raw[start:end]
    m = pattern.match(raw, at)
    return m.group(1) if m else None


class _Owned(dict[bytes, bool]):
    """User id → whether partition ``p`` owns it, filled in on first sight."""

    def __init__(self, p: int, parts: int, table: dict[bytes, int]) -> None:
        super().__init__()
        self.p, self.parts, self.table = p, parts, table

    def __missing__(self, uid: bytes) -> bool:
        w = self.table.get(uid)
        mine = self[uid] = (zlib.crc32(uid) % self.parts if w is None else w) == self.p
        return mine


#: the compact FHIR owner and the rest of its line: at most one match a line
_FHIR_OWNER_LINE = re.compile(rb'"who":\{"identifier":\{"value":"([^"\\\n]*)"\}\}[^\n]*')


def _block_owners(block: bytes, stop: int) -> tuple[list[int], list[bytes]] | None:
    """For a block of whole FHIR lines (``block[:stop]``, each ending in a newline): the
    newline positions and each line's owner, when every line has exactly one ``"who"`` and
    it is compact (what :func:`fast_owner_hint` reads from each line, then, for all of them
    at once, in C); else None, and the lines are looked at one by one.

    Every line has exactly one ``"who"``: the owner pattern matches at most once a line (it
    runs to the line's end) and matches once in every line, and ``"who"`` occurs, counted
    overlapping and so at least as often as :meth:`bytes.find` sees it, as often as there
    are lines."""
    import numpy as np

    arr = np.frombuffer(block, np.uint8, stop)
    newlines = np.flatnonzero(arr == 10)
    n = len(newlines)
    uids = _FHIR_OWNER_LINE.findall(block, 0, stop)
    if len(uids) != n:
        return None
    w = np.flatnonzero(arr == 119)  # "w"
    w = w[(w >= 1) & (w <= stop - 4)]
    who = (arr[w - 1] == 34) & (arr[w + 1] == 104) & (arr[w + 2] == 111) & (arr[w + 3] == 34)
    if int(np.count_nonzero(who)) != n:
        return None
    return newlines.tolist(), uids


def _partition_lines(
    path: str, p: int, parts: int, fmt: str, table: dict[bytes, int] | None = None
) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes, owner known) of the non-blank lines of ``path`` that may belong
    to partition ``p``: those whose owner the bytes show to be another partition's are left
    out. Lines are numbered and stripped as :func:`connectors.readers.read_lines` does, but
    read in large blocks and searched in place: a line of another partition is never copied
    (lines are ~1 KB, and copying them is most of what reading costs). A FHIR block whose
    every line names its owner the compact way is split among partitions in one pass."""
    from connectors.readers import read_limit

    crc = zlib.crc32
    owner = (table or {}).get
    owned = _Owned(p, parts, table or {})
    if fmt == "fhir":
        key, compact, tail = _WHO, _WHO_COMPACT, b'"}}'
    else:
        key, compact, tail = _USER, _USER_COMPACT, b'"'
    klen, clen = len(key), len(compact)
    number = 0
    rest = b""
    with open(path, "rb", buffering=0) as fh:
        left = read_limit(path, fh)  # a history export being updated: what is committed
        while True:
            chunk = fh.read(READ_BLOCK if left is None else min(READ_BLOCK, left))
            if left is not None:
                left -= len(chunk)
            if chunk:
                block = rest + chunk if rest else chunk
                stop = block.rfind(b"\n") + 1  # lines after it wait for the next block
                rest = block[stop:]
            elif rest:
                block, stop, rest = rest + b"\n", len(rest) + 1, b""
            else:
                break
            if number and fmt == "fhir" and stop:
                found = _block_owners(block, stop)
                if found is not None:
                    newlines, uids = found
                    mine = owned.__getitem__
                    for k in compress(range(len(uids)), map(mine, uids)):
                        start = newlines[k - 1] + 1 if k else 0
                        yield number + k + 1, block[start : newlines[k]].rstrip(b"\r\n"), True
                    number += len(uids)
                    continue
            find, startswith = block.find, block.startswith
            pos = 0
            while pos < stop:
                nl = find(b"\n", pos, stop)
                number += 1
                if number > 1:
                    # fast_owner_hint on the line in place
                    at = find(key, pos, nl)
                    if at >= 0 and find(key, at + klen, nl) < 0 and startswith(compact, at):
                        start = at + clen
                        end = find(b'"', start, nl)
                        if end >= 0 and startswith(tail, end) and find(b"\\", start, end) < 0:
                            uid = block[start:end]
                            w = owner(uid)
                            if (crc(uid) % parts if w is None else w) == p:
                                yield number, block[pos:nl].rstrip(b"\r\n"), True
                            pos = nl + 1
                            continue
                raw = block[pos:nl].rstrip(b"\r\n")
                pos = nl + 1
                if number == 1 and raw.startswith(_BOM):
                    raw = raw[3:]
                if not raw or raw.isspace():
                    continue
                hint = owner_hint(raw, fmt)
                if hint is None:
                    yield number, raw, False
                else:
                    w = owner(hint)
                    if (crc(hint) % parts if w is None else w) == p:
                        yield number, raw, True


def _replay_partition(p: int) -> tuple[list[Alert], EngineStats, int, list[tuple[int, str]], int]:
    from connectors.canonical import parse_jsonl_line
    from connectors.fhir import parse_fhir_line

    parts: int = _JOB["partitions"]
    fmt: str = _JOB["fmt"]
    parse = parse_fhir_line if fmt == "fhir" else parse_jsonl_line
    # fresh, built once in the parent: each forked process has its own copy of it; a process
    # given a second partition (the pool may do that) builds another one
    eng: Engine | None = _JOB.pop("engine", None)
    if eng is None:
        eng = Engine(_JOB["ctx"], _JOB["cfg"])
        if _JOB["collect_unexplained"]:
            eng.unexplained_ids = set()
    counts = [0, 0]  # events, bad lines (counted by partition 0 only)
    bad: list[tuple[int, str]] = []

    def mine() -> Iterator[AccessEvent]:
        table: dict[bytes, int] = _JOB["table"]
        for line_no, raw, known in _partition_lines(_JOB["path"], p, parts, fmt, table):
            try:
                e = parse(raw)
            except EventError as exc:
                if p == 0:
                    counts[1] += 1
                    if len(bad) < MAX_REPORTED_BAD:
                        bad.append((line_no, str(exc)))
                continue
            except Exception as exc:  # a parser bug must not end a replay; it is reported
                if p == 0:
                    counts[1] += 1
                    bad.append((line_no, f"unexpected {type(exc).__name__} in parser: {exc}"))
                continue
            if not known:
                uid = e.user_id.encode()
                w = table.get(uid)
                if (zlib.crc32(uid) % parts if w is None else w) != p:
                    continue
            counts[0] += 1
            yield e

    with paused_gc():
        out = run_engine(eng, mine(), _JOB["end_t"])
    return list(out.values()), eng.stats(), counts[0], bad, counts[1]


def _replay_parallel(
    ctx: Context,
    cfg: DetectionConfig,
    path: str,
    fmt: str,
    workers: int,
    errors: IO[str] | None,
    collect_unexplained: bool,
) -> ReplayResult:
    res = ReplayResult(alerts=[], stats=EngineStats(), workers=workers)
    counter = _Counter(res, path, errors)
    # One engine, built here as the single-process replay builds it (rules, models: ~0.4 s)
    # and inherited by every worker through fork, instead of built again in each of them.
    eng = Engine(ctx, cfg)
    if collect_unexplained:
        eng.unexplained_ids = set()
    t0 = time.perf_counter()
    _JOB.update(
        engine=eng,
        ctx=ctx,
        cfg=cfg,
        collect_unexplained=collect_unexplained,
        path=path,
        fmt=fmt,
        partitions=workers,
        table=balance_users(path, fmt, workers),
        end_t=input_end_time(path, fmt),
    )
    # the inherited heap out of the collector's reach: no copy-on-write of it in the workers
    gc.freeze()
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.map(_replay_partition, range(workers))
    finally:
        gc.unfreeze()
        _JOB.clear()
    out: list[Alert] = []
    for alerts, stats, n, bad, n_bad in results:
        out.extend(alerts)
        res.stats = res.stats + stats
        res.events += n
        for line_no, err in bad:
            counter.bad(line_no, err)
        res.bad += n_bad - len(bad)
    res.alerts = collapse(out)
    res.seconds = time.perf_counter() - t0
    return res


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def write_alerts(alerts: Iterable[Alert], path: str | Path) -> int:
    n = 0
    with sys.stdout.buffer if str(path) == "-" else open(path, "wb") as fh:  # noqa: SIM115
        for a in alerts:
            fh.write(orjson.dumps(a.to_dict()) + b"\n")
            n += 1
    return n


def preview_exceptions(
    context_dir: str | Path,
    events_path: str | Path,
    fmt: str,
    timezone: str | None,
    config: DetectionConfig,
    workers: int = 1,
) -> dict[str, Any]:
    """What the configured exceptions hide: replay with and without them and compare
    (:func:`pipeline.whatif.compare`: alerts are matched by shared evidence, not by id, as
    a suppressed finding may move the event a case opens with)."""
    from pipeline.whatif import compare

    without = DetectionConfig.from_dict({**config.to_dict(), "exceptions": []})
    base = replay_file(context_dir, events_path, fmt, timezone, without, workers=workers)
    withx = replay_file(context_dir, events_path, fmt, timezone, config, workers=workers)
    diff = compare(base, withx)
    keys = ("alert_id", "user_id", "severity", "reason", "events")
    return {
        "exceptions": [
            {
                "id": ex.id,
                "description": ex.description,
                "findings_suppressed": len(withx.stats.suppressed.get(ex.id, [])),
            }
            for ex in config.exceptions
        ],
        "alerts_without_exceptions": len(base.alerts),
        "alerts_with_exceptions": len(withx.alerts),
        "hidden_alerts": [{k: g[k] for k in keys} for g in diff["gone"]],
        "reduced_alerts": [
            {
                "alert_id": c["alert_id"],
                "events_before": c["events"][0],
                "events_after": c["events"][1],
            }
            for c in diff["changed"]
            if c.get("events_removed")
        ],
    }
