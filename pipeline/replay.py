"""``emrwatch replay``: the offline twin of the streaming pipeline.

Same parsers, same :class:`detectors.engine.Engine`, same alerts as the stream. A bad input
line is skipped, counted and reported with its line number; the run never stops for it.

With ``workers > 1`` a plain FHIR/JSONL file is replayed the way the stream runs it:
events are partitioned by ``user_id`` (as the access topic is keyed) and each partition
runs its own engine, in file order, in its own process. All detector state is per user,
so the alerts are identical to a single-process run; a test checks it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import resource
import sys
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from detectors.alerts import Alert
from detectors.config import DetectionConfig
from detectors.engine import Engine, EngineStats
from emrwatch.context import Context
from emrwatch.events import AccessEvent, EventError

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


def run_engine(eng: Engine, events: Iterable[AccessEvent]) -> dict[str, Alert]:
    """Feed events in order, draining once per ``DRAIN_EVERY``; the last version of each alert."""
    out: dict[str, Alert] = {}
    ingest, drain = eng.ingest, eng.drain
    for i, e in enumerate(events, 1):
        ingest(e)
        if i % DRAIN_EVERY == 0:
            for a in drain():
                out[a.alert_id] = a
    for a in eng.drain() + eng.flush():
        out[a.alert_id] = a
    return out


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
# identifier, no escapes); otherwise the worker parses the line to find out. The context is
# inherited through fork, not pickled.
_JOB: dict[str, Any] = {}
_FHIR_WHO = re.compile(
    rb'"who"\s*:\s*\{\s*"identifier"\s*:\s*\{\s*"value"\s*:\s*"([^"\\]*)"\s*\}\s*\}'
)
_JSONL_USER = re.compile(rb'"user_id"\s*:\s*"([^"\\]*)"')


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


def _replay_partition(p: int) -> tuple[list[Alert], EngineStats, int, list[tuple[int, str]], int]:
    from connectors.readers import read_lines

    parts: int = _JOB["partitions"]
    fmt: str = _JOB["fmt"]
    eng = Engine(_JOB["ctx"], _JOB["cfg"])
    if _JOB["collect_unexplained"]:
        eng.unexplained_ids = set()
    crc = zlib.crc32
    counts = [0, 0]  # events, bad lines (counted by partition 0 only)
    bad: list[tuple[int, str]] = []

    def mine() -> Iterator[AccessEvent]:
        for line_no, raw, parse in read_lines(_JOB["path"], fmt):
            hint = owner_hint(raw, fmt)
            if hint is not None and crc(hint) % parts != p:
                continue
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
            if hint is None and partition_of(e.user_id, parts) != p:
                continue
            counts[0] += 1
            yield e

    out = run_engine(eng, mine())
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
    t0 = time.perf_counter()
    _JOB.update(
        ctx=ctx,
        cfg=cfg,
        path=path,
        fmt=fmt,
        partitions=workers,
        collect_unexplained=collect_unexplained,
    )
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.map(_replay_partition, range(workers))
    finally:
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
    """What the configured exceptions hide: replay with and without them and compare."""
    without = DetectionConfig.from_dict({**config.to_dict(), "exceptions": []})
    base = replay_file(context_dir, events_path, fmt, timezone, without, workers=workers)
    withx = replay_file(context_dir, events_path, fmt, timezone, config, workers=workers)
    kept = {a.alert_id: a for a in withx.alerts}
    hidden, reduced = [], []
    for a in base.alerts:
        b = kept.get(a.alert_id)
        if b is None:
            hidden.append(
                {
                    "alert_id": a.alert_id,
                    "user_id": a.user_id,
                    "severity": a.severity,
                    "reason": a.reason,
                    "events": len(a.event_ids),
                }
            )
        elif len(b.event_ids) < len(a.event_ids):
            reduced.append(
                {
                    "alert_id": a.alert_id,
                    "events_before": len(a.event_ids),
                    "events_after": len(b.event_ids),
                }
            )
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
        "hidden_alerts": hidden,
        "reduced_alerts": reduced,
    }
