"""Where a worker's engines run: in the Faust process, or in a child process beside it.

Faust's own per-event work (fetch, stream, ack: ~75–90 µs) saturates one core, and a
Python engine cannot run beside it in a thread (the GIL). With ``engine_process`` on (the
default) the Faust process only forwards each ``take()`` batch, as plain tuples, through a
pipe to a child process that decodes, detects, writes alerts and snapshots; the machine's
second core does the detection while the first keeps fetching. Both hosts offer the same
calls to the Faust agent; the child is started before any thread exists in the worker and
dies with it (``PR_SET_PDEATHSIG``), so a ``kill -9`` of the worker takes both down and
recovery works exactly as in-process: from the latest snapshot.

Every message to the child gets exactly one reply, in order; at most ``max_in_flight``
batches are unanswered, which bounds memory and keeps back-pressure on the consumer.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

from pipeline.stream_config import StreamSettings
from pipeline.stream_metrics import StreamMetrics
from pipeline.stream_processor import AccessProcessor, Record

log = logging.getLogger("emrwatch.stream")


class HostError(RuntimeError):
    """The engine host failed; the worker must stop (its partitions recover from snapshots)."""


def build_detect_stack(
    settings: StreamSettings, metrics: StreamMetrics
) -> tuple[AccessProcessor, Any]:
    """Producer, context (read to the end), snapshot store and processor for one worker."""
    from emrwatch.context import Context
    from pipeline.stream_context import ContextFeed
    from pipeline.stream_processor import Output
    from pipeline.stream_worker import build_processor
    from pipeline.streaming import make_producer

    kafka = settings.kafka
    producer = make_producer(kafka)
    context = Context(settings.timezone)
    errors_out = Output(producer, settings.topics)

    def context_error(raw: bytes, error: str, topic: str, partition: int, offset: int) -> None:
        errors_out.deadletter(raw, error, topic, f"{partition}:{offset}", stage="context")

    feed = ContextFeed(
        context,
        settings.topics,
        kafka.bootstrap_servers,
        kafka.kafka_python(),
        on_error=context_error,
    )
    n = feed.load_all()
    metrics.context_updates.inc(n)
    log.info("context loaded from topics: %s", context.stats())
    return build_processor(settings, producer, metrics, context, feed), producer


def _read_and_adopt(processor: AccessProcessor, partitions: Sequence[int]) -> dict[int, int]:
    offsets: dict[int, int] = {}
    for p in partitions:
        snap = processor.snapshots.read_latest(p) if processor.snapshots is not None else None
        offsets[p] = processor.adopt(p, snap)
    processor.end_rebalance()
    if processor.metrics is not None:
        processor.metrics.partitions.set(len(processor.parts))
    return offsets


class LocalHost:
    """Engines in the Faust process (``engine_process: false``)."""

    def __init__(self, settings: StreamSettings, metrics: StreamMetrics) -> None:
        self.metrics = metrics
        self.processor, self.producer = build_detect_stack(settings, metrics)

    def process(self, messages: Sequence[Any]) -> None:
        t0 = time.perf_counter()
        self.processor.process(messages)  # Faust messages have Record's attributes
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)

    def assign(self, partitions: Sequence[int]) -> dict[int, int]:
        return _read_and_adopt(self.processor, partitions)

    def revoke(self, partitions: Sequence[int]) -> None:
        self.processor.revoke(list(partitions))

    def next_offsets(self) -> dict[int, int]:
        return {p: st.next_offset for p, st in self.processor.parts.items()}

    def tick(self, lags: dict[int, int]) -> None:
        self.processor.housekeeping()
        for p, lag in lags.items():
            self.metrics.lag.labels(partition=str(p)).set(lag)

    def shutdown(self) -> None:
        self.processor.snapshot_all()
        self.processor.output.flush()
        self.producer.flush()
        self.producer.close()


class ChildHost:
    """Engines in a child process; see the module docstring."""

    def __init__(
        self, settings: StreamSettings, max_in_flight: int = 3, start_timeout: float = 180.0
    ) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_child_main, args=(child_conn, settings), daemon=True, name="emrwatch-engines"
        )
        self.proc.start()
        child_conn.close()
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._offsets: dict[int, int] = {}
        self._lock = threading.Lock()
        self.metrics = None  # served by the child
        if not self.conn.poll(start_timeout):
            raise HostError(f"engine process did not start within {start_timeout:.0f}s")
        self._reply()  # "ready" once context is loaded

    def _reply(self) -> Any:
        try:
            kind, data = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise HostError(f"engine process died (exit code {self.proc.exitcode})") from exc
        if kind == "error":
            raise HostError(f"engine process failed:\n{data}")
        if kind == "done" and isinstance(data, dict):
            self._offsets.update(data)
        return data

    def _send(self, msg: tuple[Any, ...]) -> None:
        try:
            self.conn.send(msg)
        except (BrokenPipeError, OSError) as exc:
            raise HostError(f"engine process died (exit code {self.proc.exitcode})") from exc

    def _drain(self) -> None:
        while self.in_flight:
            self._reply()
            self.in_flight -= 1

    def call(self, *msg: Any) -> Any:
        with self._lock:
            self._drain()
            self._send(msg)
            return self._reply()

    def process(self, messages: Sequence[Any]) -> None:
        batch = [(m.partition, m.offset, m.key, m.value, m.headers, m.timestamp) for m in messages]
        with self._lock:
            self._send(("batch", batch))
            self.in_flight += 1
            while self.in_flight > self.max_in_flight or (self.in_flight and self.conn.poll(0)):
                self._reply()
                self.in_flight -= 1

    def assign(self, partitions: Sequence[int]) -> dict[int, int]:
        offsets: dict[int, int] = self.call("assign", list(partitions))
        self._offsets.update(offsets)
        return offsets

    def revoke(self, partitions: Sequence[int]) -> None:
        self.call("revoke", list(partitions))
        for p in partitions:
            self._offsets.pop(p, None)

    def next_offsets(self) -> dict[int, int]:
        return dict(self._offsets)

    def tick(self, lags: dict[int, int]) -> None:
        self.call("tick", lags)

    def shutdown(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("shutdown")
            except HostError as exc:
                log.warning("engine process shutdown: %s", exc)
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the worker that started it dies (even by kill -9)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the closed pipe ends the loop instead
        pass


def _child_main(conn: Any, settings: StreamSettings) -> None:
    import signal

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    logging.basicConfig(
        level=getattr(logging, settings.worker.log_level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s [engines]: %(message)s",
    )
    logging.getLogger("emrwatch.stream").setLevel(logging.INFO)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    try:
        metrics = StreamMetrics()
        processor, producer = build_detect_stack(settings, metrics)
        if settings.worker.metrics_port >= 0:
            port = metrics.serve(settings.worker.metrics_port, settings.worker.metrics_host)
            print(f"metrics: http://{settings.worker.metrics_host}:{port}/metrics", flush=True)
    except Exception:  # noqa: BLE001 - reported to the parent, which stops the worker
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    parts = processor.parts
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break  # the worker is gone
        kind = msg[0]
        try:
            if kind == "batch":
                t0 = time.perf_counter()
                processor.process([Record(*r) for r in msg[1]])
                metrics.batch_seconds.observe(time.perf_counter() - t0)
                conn.send(("done", {p: st.next_offset for p, st in parts.items()}))
            elif kind == "assign":
                conn.send(("ok", _read_and_adopt(processor, msg[1])))
            elif kind == "revoke":
                processor.revoke(msg[1])
                conn.send(("ok", None))
            elif kind == "tick":
                processor.housekeeping()
                for p, lag in msg[1].items():
                    metrics.lag.labels(partition=str(p)).set(lag)
                conn.send(("ok", None))
            elif kind == "shutdown":
                processor.snapshot_all()
                processor.output.flush()
                conn.send(("ok", None))
                break
            else:
                conn.send(("error", f"unknown message {kind!r}"))
        except Exception:  # noqa: BLE001 - reported to the parent, which stops the worker
            conn.send(("error", traceback.format_exc()))
            break
    producer.flush()
    producer.close()
