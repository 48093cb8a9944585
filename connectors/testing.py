"""The connector conformance suite: one class any connector's tests inherit.

Write the source data (with at least one malformed record), say how many records, outputs
and errors it holds, and the suite checks the connector contract::

    from connectors.testing import ConnectorConformance

    class TestMyConnector(ConnectorConformance):
        connector_type = "my-source"
        expected = (5, 4, 1)          # raw records, outputs (events + context rows), errors

        def source_config(self, tmp_path):
            (tmp_path / "in.csv").write_text(...)
            return {"path": str(tmp_path / "in.csv")}

Push sources (listeners) set ``push = True`` and implement ``deliver(connector)``, which
sends the prepared data to the listening connector the way the real peer would.

What it checks:

* the type is registered in the ``emrwatch.connectors`` entry-point group, has a summary,
  a ``Config`` dataclass whose JSON Schema serialises, and refuses unknown config keys;
* every record has a position, normalising yields only events / context rows or an
  :class:`EventError` (never another exception), the counts match, events survive the
  canonical JSON round trip, context rows name a known kind;
* ``normalize`` is pure: twice the same output;
* pull sources: positions are unique, checkpoints are JSON, and resuming from any
  checkpoint yields exactly the records after it (a restart neither loses nor repeats);
* with the embedded broker (the ``broker`` fixture): the runner delivers every output and
  dead-letters every error with its reason and position.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from connectors.base import (
    Connector,
    ConnectorConfigError,
    ContextUpdate,
    NullLedger,
    RawRecord,
    config_schema,
)
from connectors.registry import build, connector_class
from emrwatch.events import AccessEvent, EventError
from pipeline.topics import CONTEXT_KINDS


def collect(
    connector: Connector,
    checkpoint: Any = None,
    *,
    push: bool = False,
    deliver: Any = None,
    expect: int | None = None,
    timeout: float = 20.0,
) -> list[RawRecord]:
    """Every raw record a connector yields. A pull source runs until it is exhausted and
    idle; a push source until ``expect`` records arrived after ``deliver(connector)``."""
    stop = threading.Event()
    out: list[RawRecord] = []
    errors: list[BaseException] = []
    started = threading.Event()

    def reader() -> None:
        try:
            connector.start()
            started.set()
            idle = 0
            for raw in connector.records(checkpoint, stop):
                if raw is None:
                    idle += 1
                    if not push and idle >= 2:
                        break  # a follower/poller with nothing new: the source is exhausted
                    if stop.is_set():
                        break
                    continue
                idle = 0
                out.append(raw)
                if stop.is_set():
                    break
        except BaseException as exc:  # surfaced in the test thread
            errors.append(exc)
        finally:
            started.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        if push:
            assert started.wait(timeout), "the connector did not start"
            if deliver is not None:
                deliver(connector)
            deadline = time.monotonic() + timeout
            while len(out) < (expect or 0) and time.monotonic() < deadline and not errors:
                time.sleep(0.02)
            time.sleep(0.2)  # anything beyond what was expected would show up now
            stop.set()
        t.join(timeout)
        assert not t.is_alive(), "records() did not stop; it must yield None at least once a second"
    finally:
        stop.set()
        connector.close()
    if errors:
        raise errors[0]
    return out


def normalize_all(
    connector: Connector, records: list[RawRecord]
) -> tuple[list[AccessEvent | ContextUpdate], list[tuple[str, str]]]:
    """(outputs, [(position, reason)]) of a list of raw records."""
    outs: list[AccessEvent | ContextUpdate] = []
    errs: list[tuple[str, str]] = []
    for raw in records:
        try:
            outs.extend(connector.normalize(raw))
        except EventError as exc:
            errs.append((raw.position, str(exc)))
    return outs, errs


class ConnectorConformance:
    """Mix into a pytest class; see the module docstring."""

    #: the registered type name
    connector_type: str = ""
    #: (raw records, outputs, errors) in the data ``source_config`` prepares
    expected: tuple[int, int, int] = (0, 0, 0)
    #: a listener fed by ``deliver``
    push: bool = False

    # ------------------------------------------------------------ hooks
    def source_config(self, tmp_path: Path) -> dict[str, Any]:
        """Prepare the source (files, a local server, a table) and return the config."""
        raise NotImplementedError

    def deliver(self, connector: Connector) -> None:
        """Push sources: send the prepared data to the running connector."""

    def make(self, config: dict[str, Any], name: str = "") -> Connector:
        return build(
            {"type": self.connector_type, "name": name or self.connector_type, **config},
            ledger=NullLedger(),
        )

    def read(self, connector: Connector, checkpoint: Any = None) -> list[RawRecord]:
        return collect(
            connector,
            checkpoint,
            push=self.push,
            deliver=self.deliver,
            expect=self.expected[0],
        )

    # ------------------------------------------------------------ the suite
    def test_conformance_registered(self) -> None:
        cls = connector_class(self.connector_type)
        assert cls.type == self.connector_type
        assert cls.summary, "a one-line summary for `emrwatch connectors list`"
        assert dataclasses.is_dataclass(cls.Config)
        schema = config_schema(cls.Config)
        orjson.dumps(schema)
        assert schema["type"] == "object"
        assert cls.produces <= {"access", "context"} and cls.produces

    def test_conformance_rejects_unknown_keys(self, tmp_path: Path) -> None:
        cfg = self.source_config(tmp_path)
        with pytest.raises(ConnectorConfigError, match="no_such_key"):
            self.make({**cfg, "no_such_key": 1})

    def test_conformance_reads_and_normalizes(self, tmp_path: Path) -> None:
        connector = self.make(self.source_config(tmp_path))
        records = self.read(connector)
        n_raw, n_out, n_err = self.expected
        assert len(records) == n_raw, [r.position for r in records]
        assert all(r.position for r in records), "every record needs its source position"
        outs, errs = normalize_all(connector, records)
        assert (len(outs), len(errs)) == (n_out, n_err), errs
        assert all(reason for _, reason in errs), "a dead letter needs a reason"
        for o in outs:
            if isinstance(o, AccessEvent):
                again = AccessEvent.from_dict(orjson.loads(orjson.dumps(o.to_dict())))
                assert again.to_dict() == o.to_dict()
                assert o.user_id and o.event_id
            else:
                assert isinstance(o, ContextUpdate), type(o)
                assert o.kind in CONTEXT_KINDS
                assert all(isinstance(v, str) for v in o.row.values())
        kinds = {"access" if isinstance(o, AccessEvent) else "context" for o in outs}
        assert kinds <= type(connector).produces

    def test_conformance_normalize_is_pure(self, tmp_path: Path) -> None:
        connector = self.make(self.source_config(tmp_path))
        records = self.read(connector)
        first = normalize_all(connector, records)
        second = normalize_all(connector, records)
        assert _canon(first) == _canon(second)

    def test_conformance_resumes_exactly(self, tmp_path: Path) -> None:
        if self.push:
            pytest.skip(
                "a push source has no checkpoints; its peer retransmits unacknowledged data"
            )
        cfg = self.source_config(tmp_path)
        records = self.read(self.make(cfg))
        positions = [r.position for r in records]
        assert len(set(positions)) == len(positions), "positions must be unique in a pull source"
        assert records, "no records to resume from"
        for i in sorted({0, len(records) // 2, len(records) - 1}):
            cp = orjson.loads(orjson.dumps(records[i].checkpoint))  # as stored on disk
            assert cp is not None, "a pull source must give every record a checkpoint"
            tail = self.read(self.make(cfg), cp)
            assert [r.position for r in tail] == positions[i + 1 :], f"resuming after record {i}"

    def test_conformance_through_the_broker(self, tmp_path: Path, request: Any) -> None:
        broker = request.getfixturevalue("broker")
        from connectors.producer import make_connector_producer
        from connectors.runner import ConnectorRunner
        from connectors.state import CheckpointStore
        from pipeline.stream_config import KafkaSettings
        from pipeline.topics import TopicLayout, ensure_topics

        layout = TopicLayout(prefix=f"c{uuid.uuid4().hex[:8]}", partitions=2, sources=())
        ensure_topics(broker.bootstrap, layout)
        producer = make_connector_producer(KafkaSettings(bootstrap_servers=broker.bootstrap))
        connector = self.make(self.source_config(tmp_path), name=f"src-{uuid.uuid4().hex[:6]}")
        stop = threading.Event()
        runner = ConnectorRunner(
            connector,
            producer,
            layout,
            CheckpointStore(tmp_path / "state"),
            bootstrap=broker.bootstrap,
            linger_s=0.1,
        )
        done: list[Any] = []
        t = threading.Thread(target=lambda: done.append(runner.run(stop)), daemon=True)
        t.start()
        try:
            if self.push:
                time.sleep(0.3)
                self.deliver(connector)
                deadline = time.monotonic() + 20
                while runner.stats.records < self.expected[0] and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.3)
                stop.set()
            else:
                deadline = time.monotonic() + 30
                while runner.stats.records < self.expected[0] and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.3)
                stop.set()
            t.join(30)
            assert not t.is_alive()
        finally:
            stop.set()
            producer.flush()
        stats = runner.stats
        n_raw, n_out, n_err = self.expected
        assert (stats.records, stats.events + stats.context, stats.dead) == (n_raw, n_out, n_err)
        got = _read_topics(broker.bootstrap, layout)
        assert len(got["access"]) == stats.events
        assert len(got["context"]) == stats.context
        assert len(got["dead"]) == n_err
        for headers in got["dead"]:
            assert headers["emrwatch-error"] and headers["emrwatch-position"]
            assert headers["emrwatch-source"] == connector.name


def _canon(x: Any) -> bytes:
    outs, errs = x
    return orjson.dumps(
        [o.to_dict() if isinstance(o, AccessEvent) else [o.kind, dict(o.row)] for o in outs]
        + [list(e) for e in errs],
        option=orjson.OPT_SORT_KEYS,
    )


def _read_topics(bootstrap: str, layout: Any) -> dict[str, list[Any]]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        tps = []
        topics = [layout.access, layout.deadletter, *layout.context_topics]
        for topic in topics:
            for p in consumer.partitions_for_topic(topic) or ():
                tps.append(TopicPartition(topic, p))
        consumer.assign(tps)
        consumer.seek_to_beginning()
        out: dict[str, list[Any]] = {"access": [], "context": [], "dead": []}
        empty = 0
        while empty < 3:
            batch = consumer.poll(timeout_ms=500)
            if not batch:
                empty += 1
                continue
            empty = 0
            for tp, recs in batch.items():
                for r in recs:
                    if tp.topic == layout.access:
                        out["access"].append(orjson.loads(r.value))
                    elif tp.topic == layout.deadletter:
                        out["dead"].append({k: v.decode() for k, v in r.headers})
                    elif r.value is None:  # a tombstone: the record under this key is gone
                        out["context"].append({"deleted": r.key.decode()})
                    else:
                        out["context"].append(orjson.loads(r.value))
        return out
    finally:
        consumer.close()
