"""``emrwatch replay``: the offline twin of the streaming pipeline.

Same parsers, same :class:`detectors.engine.Engine`, same alerts as the stream. A bad input
line is skipped, counted and reported with its line number; the run never stops for it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from detectors.alerts import Alert
from detectors.config import DetectionConfig
from detectors.engine import Engine
from emrwatch.context import Context
from emrwatch.events import AccessEvent, EventError

MAX_REPORTED_BAD = 50
#: replay builds alerts once per this many events, like the stream once per batch
DRAIN_EVERY = 1000


@dataclass
class ReplayResult:
    alerts: list[Alert]
    engine: Engine
    events: int = 0
    bad: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0

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


def replay_events(context: Context, events: Iterable[AccessEvent],
                  config: DetectionConfig | None = None, engine: Engine | None = None) -> list[Alert]:
    """Run canonical events through a fresh engine; return the final alerts."""
    eng = engine or Engine(context, config)
    out: dict[str, Alert] = {}
    ingest, drain = eng.ingest, eng.drain
    for i, e in enumerate(events, 1):
        ingest(e)
        if i % DRAIN_EVERY == 0:
            for a in drain():
                out[a.alert_id] = a
    for a in eng.drain() + eng.flush():
        out[a.alert_id] = a
    return collapse(out.values())


def replay_file(context_dir: str | Path, events_path: str | Path, fmt: str = "auto",
                timezone: str | None = None, config: DetectionConfig | None = None,
                errors: IO[str] | None = None, engine_hook: Any = None) -> ReplayResult:
    from connectors.readers import read_events

    cfg = config or DetectionConfig()
    tz = timezone or cfg.timezone
    ctx = Context.load(context_dir, tz)
    eng = Engine(ctx, cfg)
    if engine_hook is not None:
        engine_hook(eng)
    res = ReplayResult(alerts=[], engine=eng)
    out: dict[str, Alert] = {}
    ingest, drain = eng.ingest, eng.drain
    t0 = time.perf_counter()
    for line_no, item, _raw in read_events(events_path, fmt):
        if isinstance(item, EventError):
            res.bad += 1
            if len(res.bad_lines) < MAX_REPORTED_BAD:
                res.bad_lines.append((line_no, str(item)))
            if errors is not None:
                errors.write(f"{events_path}:{line_no}: skipped: {item}\n")
            continue
        res.events += 1
        ingest(item)
        if res.events % DRAIN_EVERY == 0:
            for a in drain():
                out[a.alert_id] = a
    for a in eng.drain() + eng.flush():
        out[a.alert_id] = a
    res.seconds = time.perf_counter() - t0
    res.alerts = collapse(out.values())
    return res


def write_alerts(alerts: Iterable[Alert], path: str | Path) -> int:
    n = 0
    with (sys.stdout.buffer if str(path) == "-" else open(path, "wb")) as fh:  # noqa: SIM115
        for a in alerts:
            fh.write(orjson.dumps(a.to_dict()) + b"\n")
            n += 1
    return n


def preview_exceptions(context_dir: str | Path, events_path: str | Path, fmt: str,
                       timezone: str | None, config: DetectionConfig) -> dict[str, Any]:
    """What the configured exceptions hide: replay with and without them and compare."""
    without = DetectionConfig.from_dict({**config.to_dict(), "exceptions": []})
    base = replay_file(context_dir, events_path, fmt, timezone, without)
    withx = replay_file(context_dir, events_path, fmt, timezone, config)
    kept = {a.alert_id: a for a in withx.alerts}
    hidden, reduced = [], []
    for a in base.alerts:
        b = kept.get(a.alert_id)
        if b is None:
            hidden.append({"alert_id": a.alert_id, "user_id": a.user_id, "severity": a.severity,
                           "reason": a.reason, "events": len(a.event_ids)})
        elif len(b.event_ids) < len(a.event_ids):
            reduced.append({"alert_id": a.alert_id, "events_before": len(a.event_ids),
                            "events_after": len(b.event_ids)})
    return {
        "exceptions": [
            {"id": ex.id, "description": ex.description,
             "findings_suppressed": len(withx.engine.suppressed.get(ex.id, []))}
            for ex in config.exceptions
        ],
        "alerts_without_exceptions": len(base.alerts),
        "alerts_with_exceptions": len(withx.alerts),
        "hidden_alerts": hidden,
        "reduced_alerts": reduced,
    }
