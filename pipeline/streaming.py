"""The Faust app: one App, its topics declared here, thin agents.

decode → enrich → detect → route happens in :class:`pipeline.stream_processor.AccessProcessor`,
run by an engine host (:mod:`pipeline.stream_host`, by default a child process beside Faust);
this module only wires it to Faust:

* the access agent takes batches (``take_events``) from ``<prefix>.access`` (keyed by user,
  so no repartition hop) with ``concurrency=1`` (faust #606) and hands them to the host;
* context is not a Faust agent: every worker needs every context partition, so a plain
  consumer outside the group feeds the engines' :class:`emrwatch.context.Context`;
* crash recovery uses engine snapshots on ``<prefix>.snapshots.<group>`` (see
  :mod:`pipeline.stream_state`), not Faust changelogs. On assignment the host restores the
  latest snapshot of each partition and the consumer is positioned at its offset before
  Faust fetches anything (:class:`_Positioner`).

Workers run with ``emrwatch run --config FILE`` or ``python -m pipeline.streaming``
(:mod:`pipeline.stream_worker`); several form one consumer group and share the partitions.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.stream_config import KafkaSettings, StreamSettings
from pipeline.topics import CONTROL_HEADER

log = logging.getLogger("emrwatch.stream")


# ---------------------------------------------------------------------------- clients
def make_producer(kafka: KafkaSettings, **overrides: Any) -> Any:
    """A kafka-python producer: idempotent (works on Tansu, unlike aiokafka's), batched."""
    from kafka import KafkaProducer

    cfg: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "acks": "all",
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "max_request_size": 4 * 1024 * 1024,
        "enable_idempotence": kafka.idempotent_producer,
        "request_timeout_ms": int(kafka.request_timeout_s * 1000),
        **kafka.kafka_python(),
    }
    cfg.update(overrides)
    return KafkaProducer(**cfg)


def check_reachable(kafka: KafkaSettings, timeout: float = 15.0) -> None:
    """Fail fast with a clear message when no broker answers."""
    from pipeline.broker import BrokerError, wait_for_metadata

    try:
        wait_for_metadata(
            kafka.bootstrap_servers,
            timeout,
            kafka.kafka_python(),
            request_timeout_ms=5000,
            retry_s=0.5,
        )
    except BrokerError as exc:
        raise SystemExit(
            f"emrwatch: cannot reach Kafka at {kafka.bootstrap_servers} "
            f"({kafka.security_protocol}) within {timeout:.0f}s: {exc}"
        ) from None


# ---------------------------------------------------------------------------- the app
class _Positioner:
    """Puts each newly assigned access partition at its snapshot offset *before* Faust starts
    fetching it.

    Faust resumes a rebalance by seeking to the group's committed offsets (``perform_seek``)
    and then starts fetching. Seeking later, mid-stream, is unreliable (Faust drops records
    below its read offset), so the consumer's ``perform_seek`` is wrapped: it waits for the
    snapshots of this assignment to be restored, does Faust's seek, then seeks to them.
    """

    def __init__(self, topic: str, timeout: float) -> None:
        self.topic = topic
        self.timeout = timeout
        self.ready = asyncio.Event()
        self.offsets: dict[int, int] = {}

    def install(self, consumer: Any) -> None:
        original = consumer.perform_seek

        async def perform_seek() -> None:
            try:
                await asyncio.wait_for(self.ready.wait(), timeout=self.timeout)
            except TimeoutError:
                log.warning("snapshots not restored in time; positions may be re-checked")
            await original()
            assignment = consumer.assignment()
            wanted = {
                tp: off
                for p, off in self.offsets.items()
                if (tp := _tp(self.topic, p)) in assignment
            }
            if wanted:
                await consumer.seek_wait(wanted)
                for tp, off in wanted.items():
                    consumer._committed_offset[tp] = off or None
                log.info(
                    "positioned at snapshot offsets %s",
                    {tp.partition: off for tp, off in wanted.items()},
                )

        consumer.perform_seek = perform_seek


def create_app(settings: StreamSettings, host: Any, on_ready: Any = None) -> Any:
    """The one Faust App. ``host`` runs the engines (:mod:`pipeline.stream_host`);
    ``host=None`` builds the pass-through baseline agent (the bench's reference)."""
    import faust
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
    from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer

    kafka = settings.kafka
    w = settings.worker
    layout = settings.topics
    positioner = _Positioner(layout.access, timeout=max(30.0, kafka.session_timeout_s * 5))

    fetch_wait_ms = int(w.fetch_max_wait_s * 1000)

    class ConsumerThread(AIOKafkaConsumerThread):  # type: ignore[misc]
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            # Faust hard-codes fetch_max_wait_ms=1500. The embedded broker holds an empty
            # fetch for the whole wait even when records arrive meanwhile, which would add
            # ~0.75 s of latency on average; real Kafka answers as soon as data is there.
            consumer._fetch_max_wait_ms = fetch_wait_ms
            return consumer

    class Consumer(AIOKafkaConsumer):  # type: ignore[misc]
        def _new_consumer_thread(self) -> Any:
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    class App(faust.App):  # type: ignore[misc]
        def _new_consumer(self) -> Any:
            consumer = Consumer(
                self.transport,
                callback=self.topics.on_message,
                on_partitions_revoked=self._on_partitions_revoked,
                on_partitions_assigned=self._on_partitions_assigned,
                beacon=self.beacon,
                loop=self.loop,
            )
            if host is not None:
                positioner.install(consumer)
            return consumer

    app = App(
        w.group_id,
        # Faust creates "<id>-data" in the working directory unless told otherwise; the
        # memory store keeps nothing there, so a temporary directory will do
        datadir=w.data_dir or _temp_datadir(w.group_id),
        broker=[f"kafka://{hp.strip()}" for hp in kafka.bootstrap_servers.split(",")],
        broker_credentials=kafka.faust_credentials(),
        store="memory://",
        autodiscover=False,
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        topic_partitions=layout.partitions,
        broker_session_timeout=kafka.session_timeout_s,
        broker_heartbeat_interval=kafka.heartbeat_interval_s,
        broker_commit_interval=w.commit_interval_s,
        broker_commit_every=10_000,
        broker_request_timeout=max(kafka.request_timeout_s, kafka.session_timeout_s * 2),
        consumer_auto_offset_reset="earliest",
        stream_buffer_maxsize=max(4096, w.batch_size * 4),
        broker_max_poll_records=max(500, w.batch_size),
        producer_acks=-1,
    )
    access = app.topic(
        layout.access,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    batch_size, within = w.batch_size, w.batch_within_s
    state: dict[str, Any] = {"events": 0, "assigned": []}
    app.emrwatch_state = state  # type: ignore[attr-defined]

    if host is None:

        @app.agent(access, concurrency=1, name="emrwatch-passthrough")
        async def passthrough(stream: Any) -> None:
            counts: dict[int, int] = {}
            first: dict[int, float] = {}
            async for batch in stream.take_events(batch_size, within=within):
                now = time.time()
                eof = []
                for ev in batch:
                    m = ev.message
                    p = m.partition
                    if p not in first:
                        first[p] = now
                    if m.headers and any(k == CONTROL_HEADER for k, _ in m.headers):
                        eof.append((p, m.offset, m.value))
                        continue
                    counts[p] = counts.get(p, 0) + 1
                state["events"] += len(batch)
                if eof:
                    out = state["output"]
                    for p, off, body in eof:
                        out.control(
                            {
                                "type": "eof-ack",
                                "run": _run_of(body),
                                "group": w.group_id,
                                "partition": p,
                                "offset": off,
                                "events": counts.get(p, 0),
                                "first_batch_at": first[p],
                                "acked_at": time.time(),
                                "writer": "passthrough",
                            }
                        )
                    out.flush()
    else:

        @app.agent(access, concurrency=1, name="emrwatch-access")
        async def detect(stream: Any) -> None:
            process = host.process
            async for batch in stream.take_events(batch_size, within=within):
                try:
                    process([ev.message for ev in batch])
                except Exception as exc:  # noqa: BLE001 - the engines are gone: stop the worker
                    _die(f"engine host failed, stopping the worker: {exc}")

        @app.timer(interval=max(1.0, w.snapshot_interval_s / 2))
        async def housekeeping() -> None:
            # snapshots, watermarks and lag also move when no batch arrives
            try:
                host.tick(_lags(app, layout.access, host.next_offsets()))
            except Exception as exc:  # noqa: BLE001
                _die(f"engine host failed, stopping the worker: {exc}")

    # Faust sends these signals' arguments by keyword; its stub wants *args handlers
    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        positioner.ready.clear()
        mine = sorted(tp.partition for tp in revoked if tp.topic == layout.access)
        if host is not None and mine:
            await asyncio.get_running_loop().run_in_executor(None, host.revoke, mine)
            log.info("revoked partitions %s (snapshots written)", mine)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
        positioner.ready.clear()
        mine = sorted(tp.partition for tp in assigned if tp.topic == layout.access)
        log.info("assigned access partitions %s", mine)
        if host is not None:
            loop = asyncio.get_running_loop()
            positioner.offsets = await loop.run_in_executor(None, host.assign, mine)
        positioner.ready.set()
        state["assigned"] = mine
        if on_ready is not None:
            on_ready(mine)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def on_shutdown(sender: Any, **kwargs: Any) -> None:
        if host is not None:
            host.shutdown()

    return app


def _temp_datadir(group: str) -> str:
    """``<tmp>/emrwatch-faust/<group>-<pid>``; directories of dead workers are cleared."""
    base = Path(tempfile.gettempdir()) / "emrwatch-faust"
    base.mkdir(exist_ok=True)
    for d in base.iterdir():
        pid = d.name.rpartition("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)
    path = base / f"{group}-{os.getpid()}"
    path.mkdir(exist_ok=True)
    atexit.register(shutil.rmtree, str(path), True)
    return str(path)


def _run_of(body: bytes | None) -> str:
    import orjson

    try:
        return str(orjson.loads(body or b"{}").get("run", ""))
    except (orjson.JSONDecodeError, AttributeError):
        return ""


def _tp(topic: str, partition: int) -> Any:
    from faust.types import TP

    return TP(topic, partition)


def _lags(app: Any, topic: str, next_offsets: dict[int, int]) -> dict[int, int]:
    """Fetched high-water mark (correct on every broker, unlike ListOffsets on the embedded
    one) minus the next offset to process, per owned partition."""
    out: dict[int, int] = {}
    try:
        consumer = app.consumer
    except Exception:  # noqa: BLE001 - not started yet
        return out
    for p, nxt in next_offsets.items():
        try:
            hw = consumer.highwater(_tp(topic, p))
        except Exception:  # noqa: BLE001
            continue
        if hw is not None:
            out[p] = max(0, hw - nxt)
    return out


def _die(message: str) -> None:
    """Stop at once: Faust would restart a crashed agent, and nothing here needs saving
    (the partitions recover from their snapshots)."""
    log.critical(message)
    logging.shutdown()
    os._exit(3)


# ---------------------------------------------------------------------------- entry points
# ``pipeline.cli`` registers these; the implementations live in pipeline.stream_worker,
# pipeline.stream_replay (which import this module, hence the late imports).
def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``emrwatch run --config FILE``: a production worker (see :mod:`pipeline.stream_config`)."""
    from pipeline.stream_worker import add_run_arguments as add

    add(parser)


def cmd_run(args: argparse.Namespace) -> int:
    """Run one worker of the consumer group until SIGINT/SIGTERM; 2 on a bad config or no broker."""
    from pipeline.stream_worker import cmd_run as run

    return run(args)


def replay_stream(
    context_dir: str | Path,
    events_path: str | Path,
    fmt: str = "auto",
    timezone: str | None = None,
    config_path: str | None = None,
) -> list[dict[str, Any]]:
    """``replay --stream``: the alert dicts the streaming path raises (see :mod:`pipeline.stream_replay`)."""
    from pipeline.stream_replay import replay_stream as run

    return run(context_dir, events_path, fmt, timezone, config_path)


def main(argv: list[str] | None = None) -> int:
    from pipeline.stream_worker import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
