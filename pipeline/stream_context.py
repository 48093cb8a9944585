"""Context on compacted topics: publishing CSV rows, and every worker's live copy.

Every worker needs all reference data (a user's events may touch any patient), so the feed
is a plain consumer assigned to *all* partitions of the context topics, outside the consumer
group. A worker reads them to the end before it processes any access event, then drains new
records before each batch: a seal published before an access event is applied before it.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from emrwatch.context import CONTEXT_FILES, Context, ContextError
from pipeline.topics import (
    CONTEXT_KINDS,
    CONTROL_HEADER,
    TopicLayout,
    context_key,
    context_key_values,
)

log = logging.getLogger(__name__)


def context_rows(directory: str | Path) -> Iterator[tuple[str, dict[str, str]]]:
    """(kind, row) for every row of the context CSVs in ``directory``, kinds in dependency order."""
    d = Path(directory)
    for kind in CONTEXT_FILES:
        path = d / f"{kind}.csv"
        if not path.exists():
            continue
        with path.open(newline="", encoding="utf-8-sig") as fh:
            for row in csv.DictReader(fh):
                yield kind, {k: (v or "") for k, v in row.items() if k is not None}


def publish_row(producer: Any, layout: TopicLayout, kind: str, row: dict[str, str]) -> Any:
    """Send one context row to its compacted topic; returns the send future."""
    return producer.send(
        layout.context(kind), key=context_key(kind, row).encode(), value=orjson.dumps(row)
    )


def publish_context(
    producer: Any, layout: TopicLayout, directory: str | Path, sync: bool = False
) -> dict[str, int]:
    """Publish every context CSV row of ``directory``; returns rows per kind.

    ``sync=True`` (for changes while workers run) also puts a context marker in every access
    partition, so events produced after this call are judged with the new context."""
    return publish_rows(producer, layout, context_rows(directory), sync=sync)


def publish_rows(
    producer: Any,
    layout: TopicLayout,
    rows: Iterable[tuple[str, dict[str, str]]],
    sync: bool = True,
) -> dict[str, int]:
    """Publish (kind, row) pairs; with ``sync`` add context markers (see :func:`publish_context`)."""
    counts: dict[str, int] = {}
    futures = []
    for kind, row in rows:
        futures.append(publish_row(producer, layout, kind, row))
        counts[kind] = counts.get(kind, 0) + 1
    producer.flush()
    if sync and futures:
        high: dict[str, int] = {}
        for f in futures:
            md = f.get(timeout=30)
            key = f"{md.topic}:{md.partition}"
            high[key] = max(high.get(key, -1), md.offset)
        send_context_markers(producer, layout, high)
    return counts


def send_context_markers(producer: Any, layout: TopicLayout, offsets: dict[str, int]) -> None:
    """A ``context`` control record in every access partition naming the context offsets
    ("topic:partition" → last offset written) a worker must have applied before going on."""
    parts = producer.partitions_for(layout.access) or []
    body = orjson.dumps({"type": "context", "offsets": offsets})
    for p in sorted(parts):
        producer.send(
            layout.access,
            key=b"\x00emrwatch-context",
            value=body,
            partition=p,
            headers=[(CONTROL_HEADER, b"context")],
        )
    producer.flush()


class ContextFeed:
    """A worker's live copy of the context topics, applied to one :class:`Context`."""

    def __init__(
        self,
        context: Context,
        layout: TopicLayout,
        bootstrap: str,
        client_config: dict[str, Any] | None = None,
        on_error: Any = None,
    ) -> None:
        from kafka import KafkaConsumer

        self.context = context
        self.layout = layout
        self.kinds = layout.context_topics  # topic → kind
        self.on_error = on_error  # callable(raw: bytes, error: str, topic, partition, offset)
        self.applied = 0
        self.rejected = 0
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            group_id=None,
            fetch_max_wait_ms=20,
            client_id="emrwatch-context-feed",
            **dict(client_config or {}),
        )
        self.tps = self._all_partitions()
        self.consumer.assign(self.tps)
        self.consumer.seek_to_beginning(*self.tps)

    def _all_partitions(self) -> list[Any]:
        from kafka import TopicPartition

        tps: list[TopicPartition] = []
        deadline = time.monotonic() + 15
        for topic in self.kinds:
            parts = self.consumer.partitions_for_topic(topic)
            while not parts and time.monotonic() < deadline:
                time.sleep(0.1)
                parts = self.consumer.partitions_for_topic(topic)
            if not parts:
                raise RuntimeError(f"context topic {topic} does not exist")
            tps.extend(TopicPartition(topic, p) for p in sorted(parts))
        return tps

    def caught_up(self) -> bool:
        c = self.consumer
        for tp in self.tps:
            hw = c.highwater(tp)
            if hw is None or c.position(tp) < hw:
                return False
        return True

    def load_all(self, timeout: float = 60.0) -> int:
        """Read every context topic to its end (by fetch, not ``end_offsets``)."""
        deadline = time.monotonic() + timeout
        n = 0
        while True:
            got = self._apply(self.consumer.poll(timeout_ms=200, max_records=10000))
            n += got
            if not got and self.caught_up():
                return n
            if time.monotonic() > deadline:
                raise TimeoutError(f"context topics not read to the end within {timeout:.0f}s")

    def wait_for(self, offsets: dict[str, int], timeout: float = 30.0) -> int:
        """Apply context until each named "topic:partition" is past the given offset."""
        from kafka import TopicPartition

        want = []
        for key, off in offsets.items():
            topic, _, part = key.rpartition(":")
            tp = TopicPartition(topic, int(part))
            if tp in self.tps:
                want.append((tp, int(off)))
        n = self.poll()
        deadline = time.monotonic() + timeout
        while any(self.consumer.position(tp) <= off for tp, off in want):
            if time.monotonic() > deadline:
                log.error("context not caught up to %s within %.0fs", offsets, timeout)
                break
            n += self._apply(self.consumer.poll(timeout_ms=50, max_records=10000))
        return n

    def poll(self) -> int:
        """Apply whatever context records have arrived; never blocks."""
        return self._apply(self.consumer.poll(timeout_ms=0, max_records=10000))

    def _apply(self, batch: dict[Any, list[Any]]) -> int:
        n = 0
        ctx = self.context
        for tp, records in batch.items():
            kind = self.kinds[tp.topic]
            for rec in records:
                try:
                    if rec.value is None:  # a tombstone: the record under this key is gone
                        if rec.key is not None:
                            ctx.remove(kind, context_key_values(kind, rec.key.decode()))
                            n += 1
                        continue
                    row = orjson.loads(rec.value)
                    if not isinstance(row, dict):
                        raise ContextError("not a JSON object")
                    ctx.upsert_row(
                        kind, {str(k): "" if v is None else str(v) for k, v in row.items()}
                    )
                    n += 1
                except (ContextError, ValueError) as exc:
                    self.rejected += 1
                    log.warning(
                        "context %s:%s@%s rejected: %s", tp.topic, tp.partition, rec.offset, exc
                    )
                    if self.on_error is not None:
                        self.on_error(
                            rec.value, f"context {kind}: {exc}", tp.topic, tp.partition, rec.offset
                        )
        self.applied += n
        return n

    def close(self) -> None:
        self.consumer.close()


__all__ = [
    "CONTEXT_KINDS",
    "ContextFeed",
    "context_rows",
    "publish_context",
    "publish_row",
    "publish_rows",
    "send_context_markers",
]
