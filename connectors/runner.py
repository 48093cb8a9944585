"""Driving a connector: raw records → normalize → Kafka, with checkpoints that lose nothing
and duplicate nothing.

Delivery, step by step:

1. Records are normalised and sent in batches: access events to the access topic (key
   ``user_id``), context rows to their compacted topics (key = record id), unusable records
   to the dead-letter topic with the reason, the source and the position. Every message
   carries the headers ``emrwatch-source`` and ``emrwatch-position``.
2. A batch ends after ``batch_size`` records, after ``linger_s`` seconds, when the source
   is idle, or right after a record with an ``ack`` callback (MLLP wants its ACK now).
3. The batch is flushed; only when the broker acknowledged every message are the records'
   ``ack`` callbacks called and the checkpoint saved, together with ``scan_from``: per
   access/dead-letter partition, the offset after this runner's last acknowledged write.
4. After a crash the runner restarts from the saved checkpoint. The batch that was in flight
   may have partly landed, so first it reads the access and dead-letter topics from
   ``scan_from`` to the end and collects the positions that this source already wrote; those
   records are skipped instead of sent again. So a kill at any moment neither loses nor
   duplicates an event, without Kafka transactions (which the embedded broker lacks).

Context rows are not scanned: their topics are compacted and keyed, so a re-sent row is an
idempotent upsert. Push sources (no checkpoints) get at-least-once delivery: their
``ack`` is only sent after the broker has the data, so the peer retransmits on a crash.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson

from connectors.base import Connector, ContextUpdate, RawRecord
from connectors.producer import Batch, DeliveryError, sender_for
from connectors.state import CheckpointStore
from emrwatch.events import AccessEvent, EventError
from pipeline.topics import H_ERROR, H_POSITION, H_SOURCE, H_STAGE, TopicLayout, context_key

__all__ = ["ConnectorRunner", "DeliveryError", "RunnerStats"]

log = logging.getLogger(__name__)


@dataclass
class RunnerStats:
    records: int = 0
    events: int = 0
    context: int = 0
    dead: int = 0
    skipped: int = 0  # already delivered before a crash (found by the recovery scan)
    bytes: int = 0
    batches: int = 0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "events": self.events,
            "context": self.context,
            "dead": self.dead,
            "skipped": self.skipped,
            "bytes": self.bytes,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "records_per_s": round(self.records_per_s, 1),
        }


class ConnectorRunner:
    """Runs one connector into Kafka until its source ends or ``stop`` is set."""

    def __init__(
        self,
        connector: Connector,
        producer: Any,
        layout: TopicLayout,
        checkpoints: CheckpointStore | None = None,
        *,
        bootstrap: str | None = None,
        client_config: dict[str, Any] | None = None,
        batch_size: int = 2000,
        linger_s: float = 0.5,
        metrics: Any = None,
        on_batch: Callable[[RunnerStats], None] | None = None,
        on_dead: Callable[[RawRecord, str], None] | None = None,
    ) -> None:
        self.c = connector
        #: told of every dead-lettered record with its reason (``replay --stream``'s stderr)
        self.on_dead = on_dead
        self.producer = producer
        self.layout = layout
        self.store = checkpoints
        self.bootstrap = bootstrap
        self.client_config = dict(client_config or {})
        self.batch_size = max(1, batch_size)
        self.linger_s = linger_s
        self.metrics = metrics
        self.on_batch = on_batch
        self.stats = RunnerStats()
        #: batches sent but not yet acknowledged before the runner waits for the oldest
        self.max_inflight = 3
        self._name_b = connector.name.encode("utf-8", "replace")
        self._scan_from: dict[str, int] = {}

    # ---------------------------------------------------------------- recovery
    def _load(self) -> tuple[Any, set[str]]:
        if self.store is None:
            return None, set()
        doc = self.store.load(self.c.name) or {}
        self._scan_from = dict(doc.get("scan_from") or {})
        landed: set[str] = set()
        if doc and self.bootstrap:
            landed = self.scan_landed(self._scan_from)
            if landed:
                log.info(
                    "connector %s: %d record(s) of the interrupted batch already on the broker;"
                    " they will not be sent again",
                    self.c.name,
                    len(landed),
                )
        if self.bootstrap:
            # Partitions this source never wrote to would be scanned from offset 0 after a
            # crash. Their current ends bound where this run can write, so save them now,
            # before anything is sent (an under-reported end only makes a scan longer).
            missing = {k: v for k, v in self._end_offsets().items() if k not in self._scan_from}
            if missing:
                self._scan_from.update(missing)
                self.store.save(
                    self.c.name, {"checkpoint": doc.get("checkpoint"), "scan_from": self._scan_from}
                )
        return doc.get("checkpoint"), landed

    def _consumer(self) -> Any:
        from kafka import KafkaConsumer

        return KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            group_id=None,
            consumer_timeout_ms=1500,
            **self.client_config,
        )

    def _partitions(self, consumer: Any) -> list[Any]:
        from kafka import TopicPartition

        return [
            TopicPartition(topic, p)
            for topic in (self.layout.access, self.layout.deadletter)
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]

    def _end_offsets(self) -> dict[str, int]:
        consumer = self._consumer()
        try:
            ends = consumer.end_offsets(self._partitions(consumer))
            return {f"{tp.topic}:{tp.partition}": int(off) for tp, off in ends.items()}
        finally:
            consumer.close()

    def scan_landed(self, scan_from: dict[str, int]) -> set[str]:
        """Positions this source wrote to the access / dead-letter topics from ``scan_from``."""
        consumer = self._consumer()
        try:
            tps = self._partitions(consumer)
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, int(scan_from.get(f"{tp.topic}:{tp.partition}", 0)))
            found: set[str] = set()
            empty = 0
            while empty < 2:  # the embedded broker under-reports ends: read until quiet
                batch = consumer.poll(timeout_ms=700, max_records=5000)
                if not batch:
                    empty += 1
                    continue
                empty = 0
                for recs in batch.values():
                    for r in recs:
                        h = dict(r.headers or ())
                        if h.get(H_SOURCE) == self._name_b and H_POSITION in h:
                            found.add(h[H_POSITION].decode("utf-8", "replace"))
            return found
        finally:
            consumer.close()

    # ---------------------------------------------------------------- the loop
    def run(self, stop: threading.Event | None = None) -> RunnerStats:
        stop = stop or threading.Event()
        c = self.c
        checkpoint, landed = self._load()
        st = self.stats
        t0 = time.perf_counter()
        sender = sender_for(self.producer)
        dumps = orjson.dumps
        access, dead = self.layout.access, self.layout.deadletter
        scanned = (f"{access}:", f"{dead}:")
        src_h = (H_SOURCE, self._name_b)
        batch = Batch()
        send = partial(sender.send, batch)
        acks: list[tuple[RawRecord, str | None]] = []
        pending = 0
        last_cp: Any = checkpoint
        batch_t = time.monotonic()
        m = self.metrics

        inflight: deque[tuple[Batch, list[tuple[RawRecord, str | None]], Any]] = deque()

        def finalize(done: Batch, batch_acks: list[Any], cp: Any) -> None:
            for k, off in sender.settle(done, c.name).items():
                if k.startswith(scanned) and off + 1 > self._scan_from.get(k, 0):
                    self._scan_from[k] = off + 1
            if self.store is not None and cp is not None:
                self.store.save(c.name, {"checkpoint": cp, "scan_from": self._scan_from})
                c.committed(cp)
            for raw, reason in batch_acks:
                try:
                    if reason is None:
                        if raw.ack is not None:
                            raw.ack()
                    elif raw.reject is not None:
                        raw.reject(reason)
                except Exception:  # a peer that went away must not stop the source
                    log.warning(
                        "connector %s: acknowledging %s failed", c.name, raw.position, exc_info=True
                    )
            st.batches += 1
            if self.on_batch is not None:
                self.on_batch(st)

        def commit(block: bool = True) -> None:
            """End the current batch. Batches are checkpointed in order once the broker
            acknowledged all of their records; ``block`` waits for every one in flight
            (idle source, peers waiting for an ACK, the end), otherwise only finished
            batches are checkpointed and up to :attr:`max_inflight` stay pipelined."""
            nonlocal pending, batch, send, acks, batch_t
            if pending or acks:
                inflight.append((batch, acks, last_cp))
                batch = Batch()
                send = partial(sender.send, batch)
                acks, pending = [], 0
            batch_t = time.monotonic()
            if block:
                sender.flush()
            elif len(inflight) > self.max_inflight:
                sender.wait(inflight[0][0])  # the oldest only: later batches keep flowing
            while inflight:
                head = inflight[0]
                if not sender.done(head[0]):
                    break
                inflight.popleft()
                finalize(*head)

        normalize = c.normalize
        drain = c.drain_on_stop  # read on after stop until the source hands over its queue
        batch_size = self.batch_size
        linger_s = self.linger_s
        tick = 0
        c.start()
        try:
            for raw in c.records(checkpoint, stop):
                if raw is None:  # the source is idle: commit what is pending
                    commit()
                    if stop.is_set() and not drain:
                        break
                    continue
                st.records += 1
                st.bytes += len(raw.payload)
                pos = raw.position
                headers = [src_h, (H_POSITION, pos.encode("utf-8", "replace"))]
                if pos in landed:
                    landed.discard(pos)
                    st.skipped += 1
                    if m is not None:
                        m.record(c.name, "skipped", len(raw.payload))
                    if raw.checkpoint is not None:
                        last_cp = raw.checkpoint
                    continue
                try:
                    outs = normalize(raw)
                    reason = None
                except EventError as exc:
                    outs = []
                    reason = str(exc) or "unusable record"
                if reason is None:
                    for o in outs:
                        if type(o) is AccessEvent:
                            send(access, o.user_id.encode(), dumps(o.to_dict()), headers)
                            st.events += 1
                        elif isinstance(o, ContextUpdate):
                            row = dict(o.row)
                            send(
                                self.layout.context(o.kind),
                                context_key(o.kind, row).encode(),
                                None if o.delete else dumps(row),  # None: a tombstone
                                headers,
                            )
                            st.context += 1
                        else:
                            raise TypeError(
                                f"connector {c.name}: normalize returned {type(o).__name__}"
                            )
                    if m is not None:
                        m.record(c.name, "accepted" if outs else "empty", len(raw.payload))
                else:
                    st.dead += 1
                    key = reason.split(":", 1)[0][:60]
                    st.reasons[key] = st.reasons.get(key, 0) + 1
                    send(
                        dead,
                        None,
                        raw.payload,
                        [
                            src_h,
                            (H_POSITION, pos.encode("utf-8", "replace")),
                            (H_ERROR, reason[:2000].encode("utf-8", "replace")),
                            (H_STAGE, b"connector"),
                        ],
                    )
                    if m is not None:
                        m.record(c.name, "deadletter", len(raw.payload))
                    if self.on_dead is not None:
                        self.on_dead(raw, reason)
                if raw.checkpoint is not None:
                    last_cp = raw.checkpoint
                pending += 1
                if raw.ack is not None or raw.reject is not None:
                    acks.append((raw, reason))
                    commit()  # the peer waits for its acknowledgement
                else:
                    tick += 1
                    if pending >= batch_size or (
                        tick & 63 == 0 and time.monotonic() - batch_t >= linger_s
                    ):
                        commit(block=False)
                    if tick & 255 == 0 and stop.is_set() and not drain:
                        break
                    continue
                if stop.is_set() and not drain:
                    break
            commit()
        finally:
            st.seconds = time.perf_counter() - t0
            c.close()
        return st
