"""What a worker does with a batch of access records, without Faust.

The Faust agent (:mod:`pipeline.streaming`) stays thin: it hands each ``take()`` batch to
:meth:`AccessProcessor.process`, which decodes, runs the partition's engine and routes the
results. Keeping this Faust-free lets the same code run under unit tests and the bench.

Per access partition there is one engine (users are keyed to partitions, so their state never
straddles two), the next offset to process, and an event-time watermark. A per-event error
never escapes: the record goes to the dead-letter topic with the reason, because Faust would
ack it anyway.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, is_dataclass
from dataclasses import replace as dataclass_replace
from typing import Any, NamedTuple

import orjson

from detectors.config import DetectionConfig
from detectors.lateness import Misstamped, SteadyOffset, steady_offset
from emrwatch.context import Context
from emrwatch.events import AccessEvent
from pipeline.stream_state import Snapshot, SnapshotStore
from pipeline.topics import (
    CONTROL_HEADER,
    H_ERROR,
    H_POSITION,
    H_SOURCE,
    H_STAGE,
    TopicLayout,
)

log = logging.getLogger(__name__)

H_SRC_TS = "emrwatch-src-ts"  # on alerts: ms timestamp of the access record that changed it
H_EMIT_TS = "emrwatch-emit-ts"  # on alerts: ms wall time of emission


#: a producer timestamp before this (2001-09-09) is no timestamp (Kafka's -1, tests' 1.0)
MIN_PRODUCER_TS = 1e9
#: sources whose runs of accesses stamped long before their records are followed at most
MAX_BEHIND_SOURCES = 4096
#: sources warned of at most, per kind of wrong clock
MAX_WARNED_SOURCES = 64


def _source_name(src: Any) -> str:
    """An ``emrwatch-source`` header value as text."""
    if src is None:
        return ""
    return src.decode(errors="replace") if isinstance(src, bytes) else str(src)


def _warn_once(warned: set[Any], where: Any, msg: str, *args: Any) -> None:
    """Log ``msg`` (its first ``%s`` the source's name) the first time ``where`` is seen."""
    if where in warned or len(warned) >= MAX_WARNED_SOURCES:
        return
    warned.add(where)
    log.warning(msg, _source_name(where) or "unknown", *args)


class Record(NamedTuple):
    """One consumed access record. The agent hands over Faust messages, which have the same
    attributes; tests build these."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any  # sequence of (str, bytes) or None
    timestamp: float  # seconds (producer create time)


def load_factory(spec: str) -> Callable[..., Any]:
    """``"package.module:attr"`` → the object."""
    mod, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


class Output:
    """Where the worker writes: alerts, dead letters, control acks (a kafka-python producer)."""

    def __init__(self, producer: Any, layout: TopicLayout) -> None:
        self.producer = producer
        self.layout = layout
        self.alerts_sent = 0
        self.deadletters_sent = 0

    def alert(self, alert: Any, src_ts_s: float) -> None:
        # orjson writes a dataclass field by field, exactly like Alert.to_dict() (asdict),
        # without asdict's deep copy of every evidence list
        if isinstance(alert, dict):
            alert_id, value = alert["alert_id"], orjson.dumps(alert)
        elif is_dataclass(alert) and not isinstance(alert, type):
            alert_id, value = alert.alert_id, orjson.dumps(alert)  # type: ignore[attr-defined]
        else:
            d = alert.to_dict()
            alert_id, value = d["alert_id"], orjson.dumps(d)
        now_ms = int(time.time() * 1000)
        self.producer.send(
            self.layout.alerts,
            key=str(alert_id).encode(),
            value=value,
            headers=[
                (H_SRC_TS, str(int(src_ts_s * 1000)).encode()),
                (H_EMIT_TS, str(now_ms).encode()),
            ],
        )
        self.alerts_sent += 1

    def deadletter(
        self,
        raw: bytes | None,
        error: str,
        source: str,
        position: str,
        key: bytes | None = None,
        stage: str = "worker",
    ) -> None:
        self.producer.send(
            self.layout.deadletter,
            key=key,
            value=raw if raw is not None else b"",
            headers=[
                (H_ERROR, error[:2000].encode("utf-8", "replace")),
                (H_SOURCE, source.encode("utf-8", "replace")),
                (H_POSITION, position.encode()),
                (H_STAGE, stage.encode()),
            ],
        )
        self.deadletters_sent += 1

    def control(self, doc: dict[str, Any]) -> None:
        self.producer.send(self.layout.control, value=orjson.dumps(doc))

    def flush(self) -> None:
        self.producer.flush()


@dataclass(slots=True)
class PartitionState:
    partition: int
    engine: Any
    next_offset: int
    watermark: float = 0.0
    events: int = 0  # processed (not dead-lettered) since the partition's beginning
    deadletters: int = 0
    dirty: bool = False
    gaps: int = 0
    first_batch_at: float = 0.0
    restored_snap: str = ""
    #: workstation (or source) → its run of accesses stamped long before their records:
    #: the engine's, so that it goes with the partition's snapshot (a custom engine: here)
    clocks: dict[str, SteadyOffset] = field(default_factory=dict)
    #: the engine's count of cases withdrawn (Engine.forgive_late) already in a BatchResult
    withdrawn: int = 0

    def __post_init__(self) -> None:
        runs = getattr(self.engine, "clock_runs", None)
        if isinstance(runs, dict):
            self.clocks = runs


@dataclass
class BatchResult:
    processed: int = 0
    skipped: int = 0
    deadletters: int = 0
    alerts: int = 0
    acks: list[dict[str, Any]] = field(default_factory=list)
    # processed events per raw ``emrwatch-source`` header value (None: no header); the
    # metrics turn these into bounded labels once per batch
    by_source: dict[Any, int] = field(default_factory=dict)
    # accesses stamped after their record was produced (a wrong clock at the source), and
    # steadily long before it (a clock behind)
    clock_ahead: int = 0
    clock_behind: int = 0
    # cases whose correlations a clock behind's first accesses had made were withdrawn
    # (Engine.forgive_late), in the partitions the batch touched
    withdrawn: int = 0
    # partition → how long its engine's idle visits wait for late accesses (seconds)
    late_allowance: dict[int, float] = field(default_factory=dict)


class AccessProcessor:
    """Per-partition engines, batch processing, snapshots."""

    def __init__(
        self,
        context: Context,
        detection_config: Any,
        output: Output,
        snapshots: SnapshotStore | None = None,
        engine_factory: str | Callable[..., Any] = "detectors.engine:Engine",
        source_topic: str = "emrwatch.access",
        snapshot_interval_s: float = 5.0,
        advance_interval_s: float = 10.0,
        context_poll: Callable[[], int] | None = None,
        context_sync: Callable[[dict[str, int]], Any] | None = None,
        metrics: Any = None,
        group: str = "",
    ) -> None:
        self.context = context
        self.config = detection_config
        self.output = output
        self.snapshots = snapshots
        self.factory = (
            load_factory(engine_factory) if isinstance(engine_factory, str) else engine_factory
        )
        self.source_topic = source_topic
        self.snapshot_interval_s = snapshot_interval_s
        self.advance_interval_s = advance_interval_s
        self.context_poll = context_poll
        self.context_sync = context_sync
        self.group = group
        self.metrics = metrics
        self.parts: dict[int, PartitionState] = {}
        self._parked: dict[int, PartitionState] = {}  # revoked, kept until the rebalance ends
        self._shared_rules: Any = None
        self._last_snapshot = time.monotonic()
        self._last_advance = time.monotonic()
        self.total_events = 0
        self.total_alerts = 0
        self.total_deadletters = 0
        self.total_clock_ahead = 0
        self.max_clock_ahead_s = float(
            getattr(detection_config, "max_clock_ahead_s", DetectionConfig.max_clock_ahead_s)
        )
        self._clock_warned: set[Any] = set()  # sources already warned about
        self.max_clock_behind_s = float(
            getattr(detection_config, "max_clock_behind_s", DetectionConfig.max_clock_behind_s)
        )
        self.total_clock_behind = 0
        self._behind_warned: set[Any] = set()

    # ----------------------------------------------------------------- engines
    def new_engine(self) -> Any:
        return _batching(self._new_engine())

    def _new_engine(self) -> Any:
        f = self.factory
        if self._shared_rules is not None:
            return f(self.context, self.config, rules=self._shared_rules)
        eng = f(self.context, self.config)
        try:
            if "rules" in inspect.signature(f).parameters and hasattr(eng, "rules"):
                self._shared_rules = eng.rules  # compiled once, shared by every partition
        except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
            pass
        return eng

    def restore_engine(self, data: bytes) -> Any:
        if hasattr(self.factory, "restore") and self._shared_rules is None:
            return _batching(self.factory.restore(self.context, self.config, data))
        eng = self._new_engine()
        eng.restore_state(data)
        return _batching(eng)

    def adopt(self, partition: int, snapshot: Snapshot | None) -> int:
        """Take ownership of a partition; returns the offset to resume from."""
        old = self.parts.get(partition) or self._parked.pop(partition, None)
        if (
            snapshot is not None
            and old is not None
            and self.snapshots is not None
            and self.snapshots.last_written.get(partition) == snapshot.snap_id
            and old.next_offset == snapshot.offset
        ):
            # our own latest snapshot: the engine in memory is exactly that state
            self.parts[partition] = old
            return old.next_offset
        if snapshot is not None:
            engine = self.restore_engine(snapshot.data)
            st = PartitionState(
                partition,
                engine,
                snapshot.offset,
                events=snapshot.events,
                restored_snap=snapshot.snap_id,
            )
            log.info(
                "partition %d: restored snapshot %s, resuming at offset %d",
                partition,
                snapshot.snap_id,
                snapshot.offset,
            )
        else:
            st = PartitionState(partition, self.new_engine(), 0)
            log.info("partition %d: no snapshot, starting at the beginning", partition)
        self.parts[partition] = st
        return st.next_offset

    def revoke(self, partitions: Sequence[int]) -> None:
        """Partitions taken away cleanly: snapshot them, keep the engines until the rebalance
        ends (if a partition comes straight back, its engine is reused without a restore)."""
        self.snapshot_all([p for p in partitions if p in self.parts])
        for p in partitions:
            st = self.parts.pop(p, None)
            if st is not None:
                self._parked[p] = st

    def end_rebalance(self) -> None:
        self._parked.clear()

    # ----------------------------------------------------------------- batches
    def process(self, records: Sequence[Record]) -> BatchResult:
        """Run one ``take()`` batch. Engines ingest event by event and are drained (alerts
        built) once per batch and partition, before any control record and at the end."""
        if self.context_poll is not None:
            self.context_poll()  # context that has arrived applies before these events
        res = BatchResult()
        # partition → user → producer timestamp of the user's first record in this batch
        touched: dict[int, dict[str, float]] = {}
        by_source = res.by_source
        parts = self.parts
        from_dict = AccessEvent.from_dict
        loads = orjson.loads
        now = time.time()
        ahead = self.max_clock_ahead_s
        behind_s = self.max_clock_behind_s
        for rec in records:
            p = rec.partition
            st = parts.get(p)
            if st is None:
                # adoption normally happens in the rebalance callback; be safe anyway
                log.error("partition %d: records before adoption; starting a blank engine", p)
                st = parts[p] = PartitionState(p, self.new_engine(), rec.offset)
            off = rec.offset
            if off != st.next_offset:
                if off < st.next_offset:
                    res.skipped += 1  # already inside the restored snapshot
                    continue
                # the consumer is positioned at the snapshot offset before fetching starts,
                # so a jump means missing offsets on the broker (retention, compaction)
                st.gaps += 1
                log.warning("partition %d: offsets jump %d → %d", p, st.next_offset, off)
            st.next_offset = off + 1
            if not st.first_batch_at:
                st.first_batch_at = now
            src: Any = None  # the emrwatch-source header (bytes), counted per batch
            if rec.headers:
                ctl = None
                for hk, hv in rec.headers:  # one pass: the source and a control marker
                    if hk == H_SOURCE:
                        src = hv if hv.__class__ is bytes else _hashable(hv)
                    elif hk == CONTROL_HEADER:
                        ctl = hv.decode() if isinstance(hv, bytes | bytearray) else str(hv)
                if ctl is not None:
                    # whatever this batch raised so far goes out before the control acts
                    self._drain(touched, res)
                    touched = {}
                    ack = self._on_control(st, ctl, rec)
                    if ack is not None:
                        res.acks.append(ack)
                    continue
            try:
                e = from_dict(loads(rec.value))  # type: ignore[arg-type]
                if e.t > rec.timestamp + ahead and rec.timestamp > MIN_PRODUCER_TS:
                    e = self._from_wrong_clock(e, rec, src, res)
                elif (
                    behind_s and rec.timestamp - e.t > behind_s and rec.timestamp > MIN_PRODUCER_TS
                ):
                    e = self._from_slow_clock(
                        e, rec, src, res, st.clocks, getattr(st.engine, "forgive_late", None)
                    )
                elif st.clocks:  # in time: no wrong clock there
                    st.clocks.pop(e.workstation or _source_name(src), None)
                st.engine.ingest(e)
            except Exception as exc:  # noqa: BLE001 - every per-event error is routed, never raised
                st.deadletters += 1
                res.deadletters += 1
                self.output.deadletter(
                    rec.value,
                    f"{type(exc).__name__}: {exc}",
                    self.source_topic,
                    f"{p}:{off}",
                    key=rec.key,
                )
                continue
            st.events += 1
            st.dirty = True
            res.processed += 1
            by_source[src] = by_source.get(src, 0) + 1
            if e.t > st.watermark:
                st.watermark = e.t
            users = touched.get(p)
            if users is None:
                users = touched[p] = {}
            if e.user_id not in users:
                users[e.user_id] = rec.timestamp
        self._drain(touched, res)
        for p in touched:
            st = parts[p]
            lateness = getattr(st.engine, "late_allowance", None)  # a custom engine: none
            if lateness is not None:
                res.late_allowance[p] = lateness
            withdrawn = getattr(st.engine, "withdrawn", 0)  # the engine counts since adopted
            if withdrawn != st.withdrawn:
                res.withdrawn += withdrawn - st.withdrawn
                st.withdrawn = withdrawn
        self.total_events += res.processed
        self.total_deadletters += res.deadletters
        self.total_clock_ahead += res.clock_ahead
        self.total_clock_behind += res.clock_behind
        if self.metrics is not None:
            self.metrics.on_batch(res, (), now)
        if res.acks:
            self.output.flush()
            for ack in res.acks:
                self.output.control(ack)
            self.output.flush()
        self.housekeeping()
        return res

    def _drain(self, touched: dict[int, dict[str, float]], res: BatchResult) -> None:
        """Build and send the alerts of every case the batch changed."""
        emitted: list[tuple[Any, float]] = []
        for p, users in touched.items():
            st = self.parts.get(p)
            if st is None:
                continue
            fallback = min(users.values()) if users else time.time()
            for a in st.engine.drain():
                ts = users.get(a.user_id, fallback)
                self.output.alert(a, ts)
                emitted.append((a, ts))
        if emitted:
            res.alerts += len(emitted)
            self.total_alerts += len(emitted)
            if self.metrics is not None:
                self.metrics.on_alerts(emitted, time.time())

    def _on_control(self, st: PartitionState, ctl: str, rec: Record) -> dict[str, Any] | None:
        """Control records, in order with the events around them.

        ``eof``: end of input on this partition: flush the engine, snapshot, acknowledge.
        ``context``: a context change was published before this marker; read the context
        topics at least up to the offsets it names before the events after it.
        ``mark``: acknowledge only (progress probes).
        """
        body: dict[str, Any] = {}
        try:
            body = orjson.loads(rec.value) if rec.value else {}
        except orjson.JSONDecodeError:
            body = {}
        if ctl == "context":
            if self.context_sync is not None:
                self.context_sync(body.get("offsets") or {})
            return None
        if ctl == "eof":
            wm = body.get("watermark")
            sweep = getattr(st.engine, "sweep_to", None)
            if sweep is not None:
                # the engine's watermark never goes back: a smaller one changes nothing
                sweep(float(wm) if isinstance(wm, int | float) else st.watermark)
                for a in st.engine.drain():
                    self.output.alert(a, rec.timestamp)
                    self.total_alerts += 1
            for a in st.engine.flush():
                self.output.alert(a, rec.timestamp)
                self.total_alerts += 1
            self.output.flush()
            if self.snapshots is not None:
                self._write_snapshot(st)
        return {
            "type": f"{ctl}-ack",
            "run": body.get("run", ""),
            "partition": st.partition,
            "offset": rec.offset,
            "events": st.events,
            "deadletters": st.deadletters,
            "first_batch_at": st.first_batch_at,
            "acked_at": time.time(),
            "writer": self.snapshots.writer_id if self.snapshots is not None else "",
            "group": self.group,
        }

    def _from_wrong_clock(
        self, e: AccessEvent, rec: Record, src: Any, res: BatchResult
    ) -> AccessEvent:
        """An access stamped after its record was produced: its source's clock is wrong
        (ahead), and its time would move the user's and the partition's event time on with
        it, splitting every visit and window around it. It is judged at the record's time
        (the record keeps its own stamp). Warned once per source, counted always."""
        res.clock_ahead += 1
        _warn_once(
            self._clock_warned,
            src,
            "source %s: access %s stamped %.1f h after its record was produced (a wrong "
            "clock at the source?): judged at the record's time, as are any more "
            "(emrwatch_events_clock_ahead_total counts them)",
            e.event_id,  # not a person's identifier: where to find the record
            (e.t - rec.timestamp) / 3600,
        )
        return dataclass_replace(e, t=rec.timestamp)

    def _from_slow_clock(
        self,
        e: AccessEvent,
        rec: Record,
        src: Any,
        res: BatchResult,
        runs: dict[str, SteadyOffset],
        forgive: Callable[[Misstamped], None] | None = None,
    ) -> AccessEvent:
        """An access stamped long before its record was produced: a late delivery (a
        backlog, a batch) or a clock behind. Its source's run of such accesses tells which:
        a clock's offset is steady (detectors.lateness.SteadyOffset), and from then on
        its accesses are judged that much later; when it turns steady, ``forgive`` (the
        engine's) forgives the accesses taken as stamped before and withdraws the
        correlations they made. Warned once per source, counted always."""
        where = e.workstation or _source_name(src)
        off = steady_offset(
            runs, where, rec.timestamp - e.t, rec.timestamp, MAX_BEHIND_SOURCES, forgive, e.event_id
        )
        if not off:
            return e
        res.clock_behind += 1
        _warn_once(
            self._behind_warned,
            where,
            "workstation or source %s: from access %s on, accesses stamped steadily %.1f h "
            "before their records were produced (a timezone or clock wrong there?) are "
            "judged that much later (emrwatch_events_clock_behind_total counts them)",
            e.event_id,  # not a person's identifier: where to find the record
            off / 3600,
        )
        return dataclass_replace(e, t=e.t + off)

    # ----------------------------------------------------------------- state
    def housekeeping(self, force_snapshot: bool = False) -> None:
        now = time.monotonic()
        if now - self._last_advance >= self.advance_interval_s:
            self._last_advance = now
            for st in self.parts.values():
                if st.watermark:
                    for a in st.engine.advance(st.watermark) or ():
                        self.output.alert(a, time.time())
        if self.snapshots is not None and (
            force_snapshot or now - self._last_snapshot >= self.snapshot_interval_s
        ):
            self._last_snapshot = now
            self.snapshot_all()

    def snapshot_all(self, partitions: Sequence[int] | None = None) -> int:
        """Flush outputs, then snapshot each changed partition. Returns snapshots written."""
        if self.snapshots is None:
            return 0
        todo = [
            self.parts[p]
            for p in (partitions if partitions is not None else list(self.parts))
            if p in self.parts
        ]
        todo = [st for st in todo if st.dirty or st.partition not in self.snapshots.last_written]
        if not todo:
            return 0
        self.output.flush()  # alerts of the covered events are durable before the snapshot
        for st in todo:
            self._write_snapshot(st)
        return len(todo)

    def _write_snapshot(self, st: PartitionState) -> None:
        assert self.snapshots is not None
        t0 = time.perf_counter()
        data = st.engine.snapshot()
        self.snapshots.write(st.partition, st.next_offset, data, events=st.events)
        st.dirty = False
        if self.metrics is not None:
            self.metrics.on_snapshot(len(data), time.perf_counter() - t0)


class _PerEventEngine:
    """Gives an engine with only ``process()`` the ``ingest()``/``drain()`` pair."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._pending: dict[str, Any] = {}

    def ingest(self, e: AccessEvent) -> None:
        for a in self.engine.process(e):
            self._pending[a.alert_id] = a

    def drain(self) -> list[Any]:
        out, self._pending = list(self._pending.values()), {}
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def _batching(engine: Any) -> Any:
    return (
        engine
        if hasattr(engine, "ingest") and hasattr(engine, "drain")
        else _PerEventEngine(engine)
    )


def _hashable(value: Any) -> Any:
    """A header value usable as a dict key (aiokafka gives bytes; be safe with others)."""
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    try:
        hash(value)
    except TypeError:
        return str(value)
    return value


def _control(headers: Any) -> str | None:
    for k, v in headers:
        if k == CONTROL_HEADER:
            return v.decode() if isinstance(v, bytes | bytearray) else str(v)
    return None
