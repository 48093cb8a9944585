"""Engine snapshots on a Kafka topic: crash recovery that does not use Faust changelogs.

Faust table recovery stops early on the embedded broker (its ListOffsets under-reports the
end of a partition), so a worker's detection state is kept here instead:

* at commit points the worker flushes its alerts, then writes the engine state of each
  access partition together with the *next source offset* it has not processed;
* on assignment a worker reads the latest complete snapshot of the partition, restores the
  engine and resumes the partition at that offset. Events after the snapshot are processed
  again; their alerts come out again with the same stable ids, so sinks upsert.

A snapshot may be larger than one Kafka message, so it is written as chunks. Each chunk's key
is ``<partition>:<chunk>`` (compaction keeps the newest of each key, and the newest snapshot's
chunks are always the newest of their keys). Reading goes until a fetch returns nothing,
never trusting ``end_offsets`` for completeness.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

CHUNK_BYTES = 512 * 1024
H_SNAP = "emrwatch-snapshot"  # snapshot id (unique per write)
H_CHUNK = "emrwatch-chunk"  # "i/n"
H_OFFSET = "emrwatch-offset"  # next source offset of the access partition
H_WRITER = "emrwatch-writer"  # worker instance id
H_EVENTS = "emrwatch-events"  # events processed in this partition so far


@dataclass(slots=True)
class Snapshot:
    partition: int
    offset: int  # next access offset to process
    data: bytes  # Engine.snapshot()
    snap_id: str = ""
    writer: str = ""
    events: int = 0


def _hdr(headers: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in headers or ():
        out[k] = v.decode() if isinstance(v, bytes | bytearray) else str(v)
    return out


class SnapshotStore:
    """Writes and reads engine snapshots on the snapshot topic (partition = access partition)."""

    def __init__(
        self,
        topic: str,
        producer: Any,
        bootstrap: str,
        client_config: dict[str, Any] | None = None,
        writer_id: str | None = None,
    ) -> None:
        self.topic = topic
        self.producer = producer
        self.bootstrap = bootstrap
        self.client_config = dict(client_config or {})
        self.writer_id = writer_id or uuid.uuid4().hex[:12]
        self.last_written: dict[int, str] = {}  # partition → snap_id written by us

    def write(self, partition: int, offset: int, data: bytes, events: int = 0) -> str:
        """Write one snapshot and wait until the broker has it. Call after flushing alerts."""
        snap_id = f"{self.writer_id}-{time.time_ns():x}"
        chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
        n = len(chunks)
        futures = []
        for i, chunk in enumerate(chunks):
            headers = [
                (H_SNAP, snap_id.encode()),
                (H_CHUNK, f"{i}/{n}".encode()),
                (H_OFFSET, str(offset).encode()),
                (H_WRITER, self.writer_id.encode()),
                (H_EVENTS, str(events).encode()),
            ]
            futures.append(
                self.producer.send(
                    self.topic,
                    key=f"{partition}:{i}".encode(),
                    value=chunk,
                    partition=partition,
                    headers=headers,
                )
            )
        self.producer.flush()
        for f in futures:
            f.get(timeout=30)
        self.last_written[partition] = snap_id
        return snap_id

    def read_latest(self, partition: int, timeout: float = 30.0) -> Snapshot | None:
        """The newest complete snapshot of ``partition``, or None."""
        from kafka import KafkaConsumer, TopicPartition

        tp = TopicPartition(self.topic, partition)
        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            group_id=None,
            fetch_max_wait_ms=50,
            max_partition_fetch_bytes=4 * CHUNK_BYTES,
            client_id=f"emrwatch-snapshot-reader-{self.writer_id}",
            **self.client_config,
        )
        try:
            consumer.assign([tp])
            # ListOffsets(latest) may under-report on the embedded broker, so it only picks a
            # starting point; completeness comes from reading until the fetch is empty.
            try:
                approx_end = consumer.end_offsets([tp]).get(tp) or 0
            except Exception:  # noqa: BLE001 - an estimate only
                approx_end = 0
            start = max(0, approx_end - 256)
            snap = self._scan(consumer, tp, start, timeout)
            if snap is None and start > 0:
                snap = self._scan(consumer, tp, 0, timeout)
            return snap
        finally:
            consumer.close()

    @staticmethod
    def _scan(consumer: Any, tp: Any, start: int, timeout: float) -> Snapshot | None:
        consumer.seek(tp, start)
        deadline = time.monotonic() + timeout
        pending: dict[str, dict[int, bytes]] = {}
        meta: dict[str, dict[str, str]] = {}
        latest: Snapshot | None = None
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading snapshots of {tp} took over {timeout:.0f}s")
            batch = consumer.poll(timeout_ms=200)
            for rec in batch.get(tp, ()):
                h = _hdr(rec.headers)
                sid = h.get(H_SNAP)
                if not sid or "/" not in h.get(H_CHUNK, ""):
                    continue
                i, n = (int(x) for x in h[H_CHUNK].split("/"))
                parts = pending.setdefault(sid, {})
                parts[i] = rec.value or b""
                meta[sid] = h
                if len(parts) == n:
                    latest = Snapshot(
                        partition=tp.partition,
                        offset=int(h[H_OFFSET]),
                        data=b"".join(parts[k] for k in range(n)),
                        snap_id=sid,
                        writer=h.get(H_WRITER, ""),
                        events=int(h.get(H_EVENTS, "0") or 0),
                    )
                    del pending[sid]
            hw = consumer.highwater(tp)
            if not batch and hw is not None and consumer.position(tp) >= hw:
                return latest
