"""Connector throughput: ``emrwatch connectors bench``.

For each file-based source format it measures two rates on the same generated events:

* **read + normalize**: ``records()`` and ``normalize()`` only (the connector's own cost);
* **to the broker**: the whole :class:`~connectors.runner.ConnectorRunner` into the embedded
  broker (or ``--bootstrap``) with the librdkafka producer ``emrwatch connectors run`` uses,
  with checkpoints, until the broker acknowledged everything.

The stream's workers process about 12k events/s per core (``emrwatch bench``), so a
connector is not the bottleneck while its "to the broker" rate stays well above that.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from connectors.base import Connector
from connectors.fhir_encode import to_audit_event
from connectors.registry import build
from emrwatch.events import AccessEvent

ACTIONS = ("view", "view", "view", "query", "update", "print", "export")


def sample_events(n: int, seed: int = 7) -> list[AccessEvent]:
    """``n`` plausible canonical events (200 users, 5000 patients, one day)."""
    rnd = random.Random(seed)
    t0 = 1772323200  # 2026-03-01T08:00+08:00
    out = []
    for i in range(n):
        t = t0 + i * 86400 // max(n, 1)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S+08:00", time.gmtime(t + 8 * 3600))
        out.append(
            AccessEvent.from_dict(
                {
                    "event_id": f"b{i}",
                    "ts": ts,
                    "user_id": f"u{rnd.randrange(200)}",
                    "patient_id": f"p{rnd.randrange(5000)}",
                    "action": rnd.choice(ACTIONS),
                    "resource_type": rnd.choice(("Patient", "Observation", "DocumentReference")),
                    "workstation": f"ws-{rnd.randrange(80)}",
                    "source": "bench-emr",
                }
            )
        )
    return out


VENDOR_COLUMNS = ["AUDIT_ID", "EVENT_DT", "PRSNL", "PERSON", "EVENT_TYPE", "DEVICE"]
VENDOR_ACTIONS = {
    "view": "Chart Opened",
    "query": "Search",
    "update": "Note Signed",
    "print": "Report Printed",
    "export": "Export",
}


def write_sources(events: list[AccessEvent], d: Path) -> dict[str, dict[str, Any]]:
    """The events as FHIR NDJSON, canonical JSONL and a mapped vendor CSV; their configs."""
    (d / "audit.ndjson").write_bytes(
        b"".join(orjson.dumps(to_audit_event(e)) + b"\n" for e in events)
    )
    (d / "events.jsonl").write_bytes(b"".join(orjson.dumps(e.to_dict()) + b"\n" for e in events))
    lines = [";".join(VENDOR_COLUMNS)]
    for e in events:
        local = e.ts[:19].replace("T", " ")
        y, m, rest = local[:4], local[5:7], local[8:]
        lines.append(
            f"{e.event_id};{m}/{rest[:2]}/{y} {rest[3:]};{e.user_id};{e.patient_id};"
            f"{VENDOR_ACTIONS[e.action]};{e.workstation}"
        )
    (d / "vendor.csv").write_text("\n".join(lines) + "\n", "utf-8")
    return {
        "fhir-file": {"type": "fhir-file", "path": str(d / "audit.ndjson")},
        "file (jsonl)": {"type": "file", "path": str(d / "events.jsonl")},
        "file (vendor csv, mapped)": {
            "type": "file",
            "path": str(d / "vendor.csv"),
            "format": "csv",
            "delimiter": ";",
            "columns": dict(
                zip(
                    ("event_id", "ts", "user_id", "patient_id", "action", "workstation"),
                    VENDOR_COLUMNS,
                    strict=True,
                )
            ),
            "values": {"action": {v: k for k, v in VENDOR_ACTIONS.items()}},
            "timestamp_format": "%m/%d/%Y %H:%M:%S",
            "timezone": "Asia/Shanghai",
        },
    }


def normalize_rate(make: Callable[[], Connector], n: int) -> float:
    """records() + normalize() per second, best of 3."""
    best = 0.0
    for _ in range(3):
        c = make()
        stop = threading.Event()
        t0 = time.perf_counter()
        count = 0
        norm = c.normalize
        for raw in c.records(None, stop):
            if raw is None:
                break
            count += len(norm(raw))
        dt = time.perf_counter() - t0
        c.close()
        if count != n:
            raise RuntimeError(f"{c.name}: {count} events for {n}")
        best = max(best, count / dt)
    return best


def broker_rate(make: Callable[[], Connector], n: int, bootstrap: str, state: Path) -> float:
    from connectors.producer import make_connector_producer
    from connectors.runner import ConnectorRunner
    from connectors.state import CheckpointStore
    from pipeline.stream_config import KafkaSettings
    from pipeline.topics import TopicLayout, ensure_topics

    layout = TopicLayout(prefix=f"cb{uuid.uuid4().hex[:6]}", partitions=4, sources=())
    ensure_topics(bootstrap, layout)
    producer = make_connector_producer(KafkaSettings(bootstrap_servers=bootstrap))
    try:
        runner = ConnectorRunner(
            make(), producer, layout, CheckpointStore(state), bootstrap=bootstrap
        )
        st = runner.run()
    finally:
        producer.flush()
    if st.events != n:
        raise RuntimeError(f"{st.events} events delivered for {n}")
    return st.events / st.seconds


def run(n: int = 50_000, bootstrap: str | None = None) -> dict[str, dict[str, float]]:
    events = sample_events(n)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="emrwatch-cbench-") as tmp:
        d = Path(tmp)
        specs = write_sources(events, d)
        broker_cm: Any = None
        if bootstrap is None:
            from pipeline.broker import EmbeddedBroker

            broker_cm = EmbeddedBroker()
            bootstrap = broker_cm.__enter__().bootstrap
        try:
            for label, spec in specs.items():

                def make(spec: dict[str, Any] = spec) -> Connector:
                    return build({**spec, "name": f"bench-{uuid.uuid4().hex[:6]}"})

                results[label] = {
                    "normalize_per_s": round(normalize_rate(make, n)),
                    "to_broker_per_s": round(
                        broker_rate(make, n, bootstrap, d / f"state-{len(results)}")
                    ),
                }
        finally:
            if broker_cm is not None:
                broker_cm.__exit__(None, None, None)
    return results
