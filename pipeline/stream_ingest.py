"""The connector side of the stream: files in, canonical events out, keyed by user.

Parsing happens at the edge, so the access topic carries only canonical JSON keyed by
``user_id`` (each user's events land in one partition, in order, with no repartition hop).
A line that cannot be parsed goes to the dead-letter topic with its original bytes, the
reason, and its source position (file and line number).

Also here: end-of-input markers (one control record per access partition) and the readers
that wait for their acknowledgements and collect the alerts, for ``replay --stream`` and the
bench.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from emrwatch.events import AccessEvent, EventError
from pipeline.topics import CONTROL_HEADER, H_ERROR, H_POSITION, H_SOURCE, H_STAGE, TopicLayout

EOF_KEY = b"\x00emrwatch-eof"


@dataclass
class IngestStats:
    events: int = 0
    bad: int = 0
    seconds: float = 0.0
    per_partition: dict[int, int] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def produce_items(
    producer: Any,
    layout: TopicLayout,
    items: Iterable[tuple[int, AccessEvent | EventError, bytes]],
    source: str,
    rate: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_bad: Callable[[int, str], None] | None = None,
    source_name: str | None = None,
) -> IngestStats:
    """Send parsed items: events to the access topic, errors to the dead-letter topic.

    ``rate`` (events/s) paces the feed; None sends as fast as the producer takes them.
    ``source`` (a file path or a name) goes whole into dead letters; access events carry
    the header ``emrwatch-source`` = ``source_name``, by default ``source``'s basename, as
    the connector runner's do (the workers count events by it).
    """
    stats = IngestStats()
    access, dead = layout.access, layout.deadletter
    # one headers list shared by every event: kafka-python encodes it at send time
    access_headers = [(H_SOURCE, source_label(source, source_name).encode("utf-8", "replace"))]
    send = producer.send
    dumps = orjson.dumps
    t0 = time.perf_counter()
    tick = 0.01
    per_tick = (rate * tick) if rate else 0.0
    next_tick = t0 + tick
    budget = per_tick
    for line_no, item, raw in items:
        if isinstance(item, EventError):
            stats.bad += 1
            if on_bad is not None:
                on_bad(line_no, str(item))
            send(
                dead,
                value=raw or b"",
                headers=[
                    (H_ERROR, str(item)[:2000].encode("utf-8", "replace")),
                    (H_SOURCE, source.encode("utf-8", "replace")),
                    (H_POSITION, f"line {line_no}".encode()),
                    (H_STAGE, b"connector"),
                ],
            )
            continue
        send(access, key=item.user_id.encode(), value=dumps(item.to_dict()), headers=access_headers)
        stats.events += 1
        if rate:
            budget -= 1
            if budget <= 0:
                if should_stop is not None and should_stop():
                    break
                now = time.perf_counter()
                if now < next_tick:
                    time.sleep(next_tick - now)
                next_tick += tick
                budget += per_tick
    producer.flush()
    stats.seconds = time.perf_counter() - t0
    return stats


def source_label(source: str, source_name: str | None = None) -> str:
    """The ``emrwatch-source`` of events read from ``source``: an explicit name, else the
    file's basename (a directory or temp path says nothing and would split one feed).

    >>> source_label("/data/2026-03/events.ndjson"), source_label("bench"), source_label("-")
    ('events.ndjson', 'bench', 'stdin')
    """
    if source_name:
        return source_name
    if source in ("-", ""):
        return "stdin"
    return os.path.basename(source.rstrip("/\\")) or source


def produce_file(
    producer: Any,
    layout: TopicLayout,
    path: str | Path,
    fmt: str = "auto",
    rate: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_bad: Callable[[int, str], None] | None = None,
    source_name: str | None = None,
) -> IngestStats:
    """Read an events file (FHIR NDJSON / JSONL / CSV) and produce it; its events carry
    ``emrwatch-source`` = ``source_name`` or the file's basename."""
    from connectors.readers import read_events

    return produce_items(
        producer,
        layout,
        read_events(path, fmt),
        str(path),
        rate,
        should_stop,
        on_bad,
        source_name=source_name,
    )


def access_partitions(producer: Any, layout: TopicLayout, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        parts = producer.partitions_for(layout.access)
        if parts:
            return sorted(parts)
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {layout.access} has no partitions")
        time.sleep(0.1)


def send_eof(
    producer: Any, layout: TopicLayout, run_id: str, watermark: float | None = None
) -> list[int]:
    """One end-of-input control record per access partition; returns the partitions.

    ``watermark``: the input's last event time, where every partition's engine puts its
    watermark at the end (so each closes the visits a single replay closes); by default a
    partition's own last event time."""
    parts = access_partitions(producer, layout)
    doc: dict[str, Any] = {"type": "eof", "run": run_id}
    if watermark is not None:
        doc["watermark"] = watermark
    body = orjson.dumps(doc)
    for p in parts:
        producer.send(
            layout.access, key=EOF_KEY, value=body, partition=p, headers=[(CONTROL_HEADER, b"eof")]
        )
    producer.flush()
    return parts


# ---------------------------------------------------------------------------- readers
class TopicReader:
    """Reads whole topics from the beginning with an unassigned (group-less) consumer."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        client_config: dict[str, Any] | None = None,
        start: str = "beginning",
    ) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            group_id=None,
            fetch_max_wait_ms=50,
            client_id=f"emrwatch-reader-{topic}",
            **dict(client_config or {}),
        )
        deadline = time.monotonic() + 15
        parts = self.consumer.partitions_for_topic(topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.1)
            parts = self.consumer.partitions_for_topic(topic)
        if not parts:
            raise RuntimeError(f"topic {topic} does not exist")
        self.tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(self.tps)
        if start == "end":
            # only used against real Kafka, where end_offsets is exact
            self.consumer.seek_to_end(*self.tps)
        else:
            self.consumer.seek_to_beginning(*self.tps)

    def poll(self, timeout_ms: int = 200) -> list[Any]:
        out: list[Any] = []
        for recs in self.consumer.poll(timeout_ms=timeout_ms, max_records=5000).values():
            out.extend(recs)
        return out

    def caught_up(self) -> bool:
        c = self.consumer
        return all(
            c.highwater(tp) is not None and c.position(tp) >= c.highwater(tp) for tp in self.tps
        )

    def read_to_end(self, timeout: float = 60.0) -> list[Any]:
        """Everything up to the end as seen by fetches (not ``end_offsets``)."""
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while True:
            got = self.poll()
            out.extend(got)
            if not got and self.caught_up():
                return out
            if time.monotonic() > deadline:
                raise TimeoutError(f"not read to the end within {timeout:.0f}s")

    def close(self) -> None:
        self.consumer.close()


def wait_for_acks(
    reader: TopicReader,
    run_id: str,
    partitions: Iterable[int],
    kind: str = "eof-ack",
    timeout: float = 300.0,
    progress: Callable[[], None] | None = None,
    group: str | None = None,
) -> dict[int, dict[str, Any]]:
    """Read the control topic until every partition acknowledged ``run_id``'s end marker."""
    want = set(partitions)
    acks: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while want - set(acks):
        for rec in reader.poll():
            try:
                doc = orjson.loads(rec.value)
            except orjson.JSONDecodeError:
                continue
            if (
                doc.get("type") == kind
                and doc.get("run") == run_id
                and (group is None or doc.get("group") == group)
            ):
                acks[int(doc["partition"])] = doc
        if progress is not None:
            progress()
        if time.monotonic() > deadline:
            missing = sorted(want - set(acks))
            raise TimeoutError(
                f"no end-of-input acknowledgement from partition(s) {missing} within {timeout:.0f}s"
            )
    return acks


def collapse_alert_records(
    records: Iterable[Any], keep_retracted: bool = False
) -> dict[str, dict[str, Any]]:
    """alert_id → last version (by topic order; one id's records share one partition).

    As in replay, an alert whose last version retracted it (later documentation explained
    the evidence) is left out unless ``keep_retracted``."""
    out: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec.value is None:
            continue
        d = orjson.loads(rec.value)
        out[d["alert_id"]] = d
    if not keep_retracted:
        out = {k: v for k, v in out.items() if v.get("status") != "retracted"}
    return out
