"""Context records can be deleted: a cancelled admission stops explaining accesses.

A connector says so with ``ContextUpdate(..., delete=True)``; the runner writes a tombstone
(a null value under the record's key) on the compacted context topic; every worker's
:class:`pipeline.stream_context.ContextFeed` then forgets the record.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import orjson

from detectors.config import DetectionConfig
from detectors.engine import Engine
from emrwatch.context import Context
from emrwatch.events import AccessEvent

TZ = "Asia/Shanghai"


def _ctx() -> Context:
    ctx = Context(TZ)
    ctx.upsert_row(
        "departments", {"department_id": "ORTH", "name": "Orthopaedics", "kind": "clinical"}
    )
    ctx.upsert_row(
        "staff",
        {
            "user_id": "u1",
            "family_name": "Li",
            "given_name": "Na",
            "role": "nurse",
            "department_id": "ORTH",
            "shift_start": "00:00",
            "shift_end": "23:59",
        },
    )
    ctx.upsert_row("patients", {"patient_id": "p1", "family_name": "Zhou"})
    ctx.upsert_row(
        "encounters",
        {
            "encounter_id": "e1",
            "patient_id": "p1",
            "department_id": "ORTH",
            "start": "2026-03-01T08:00:00+08:00",
            "end": "",
        },
    )
    ctx.upsert_row("sealed", {"patient_id": "p1", "sealed_at": "2026-01-01T00:00:00+08:00"})
    ctx.upsert_row(
        "grants",
        {
            "user_id": "u1",
            "departments": "ONC;NEURO",
            "actions": "view",
            "purpose": "audit",
            "valid_from": "2026-01-01",
            "valid_until": "2026-12-31",
        },
    )
    return ctx


def test_remove_forgets_each_kind_of_record_and_bumps_the_version() -> None:
    ctx = _ctx()
    v = ctx.version
    assert ctx.remove("encounters", ["e1"])
    assert "e1" not in ctx.encounters and ctx.encounters_of("p1") == []
    assert ctx.version == v + 1
    assert not ctx.remove("encounters", ["e1"])  # already gone: nothing changes
    assert ctx.version == v + 1
    # a grant's key lists its departments in any order
    assert ctx.remove("grants", ["u1", "NEURO;ONC", "view", "audit"])
    assert "u1" not in ctx.grants
    for kind, key in [
        ("sealed", "p1"),
        ("patients", "p1"),
        ("staff", "u1"),
        ("departments", "ORTH"),
    ]:
        assert ctx.remove(kind, [key]), kind
    assert ctx.stats() == dict.fromkeys(ctx.stats(), 0)


def test_an_access_after_the_cancelled_admission_is_no_longer_explained() -> None:
    ctx = _ctx()
    ctx.remove("sealed", ["p1"])
    eng = Engine(ctx, DetectionConfig(timezone=TZ, model_registry="none"))
    eng.unexplained_ids = set()

    def access(i: int) -> AccessEvent:
        return AccessEvent.from_dict(
            {
                "event_id": f"a{i}",
                "ts": f"2026-03-02T10:0{i}:00+08:00",
                "user_id": "u1",
                "patient_id": "p1",
                "action": "view",
                "resource_type": "Observation",
                "workstation": "ws-1",
                "source": "emr",
            }
        )

    eng.ingest(access(1))
    assert eng.unexplained_ids == set()  # under care in the user's department
    ctx.remove("encounters", ["e1"])  # ADT^A11: the admission is cancelled
    eng.ingest(access(2))
    assert eng.unexplained_ids == {"a2"}


def test_a_deleted_encounter_travels_as_a_tombstone_to_the_workers(
    broker: Any, tmp_path: Path
) -> None:
    from connectors.producer import make_connector_producer
    from connectors.registry import build
    from connectors.runner import ConnectorRunner
    from connectors.testing import _read_topics
    from pipeline.stream_config import KafkaSettings
    from pipeline.stream_context import ContextFeed
    from pipeline.topics import TopicLayout, ensure_topics

    layout = TopicLayout(prefix=f"d{uuid.uuid4().hex[:8]}", partitions=1, sources=())
    ensure_topics(broker.bootstrap, layout)
    encounter = {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "in-progress",
        "subject": {"reference": "Patient/p1"},
        "serviceProvider": {"reference": "Organization/ORTH"},
        "period": {"start": "2026-03-01T08:00:00+08:00"},
    }
    other = {**encounter, "id": "e2"}
    producer = make_connector_producer(KafkaSettings(bootstrap_servers=broker.bootstrap))

    def run(resources: list[dict[str, Any]], name: str) -> None:
        path = tmp_path / f"{name}.ndjson"
        path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
        c = build({"type": "fhir-context", "name": name, "paths": [str(path)]})
        st = ConnectorRunner(c, producer, layout, bootstrap=broker.bootstrap).run()
        assert st.dead == 0 and st.context == len(resources)

    def worker_context() -> Context:
        """What a worker starting now reads from the context topics."""
        ctx = Context(TZ)
        feed = ContextFeed(ctx, layout, broker.bootstrap)
        try:
            feed.load_all()
        finally:
            feed.close()
        return ctx

    run([encounter, other], "ehr-a")
    assert sorted(worker_context().encounters) == ["e1", "e2"]

    run([{**encounter, "status": "entered-in-error"}], "ehr-b")
    assert {"deleted": "e1"} in _read_topics(broker.bootstrap, layout)["context"]
    fresh = worker_context()
    assert sorted(fresh.encounters) == ["e2"]
    assert [e.encounter_id for e in fresh.encounters_of("p1")] == ["e2"]
