"""The embedded broker and the topic layout, against the real Tansu binary."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.broker import EmbeddedBroker, wait_for_metadata
from pipeline.topics import CONTEXT_KINDS, TopicLayout, TopicLayoutError, context_key, ensure_topics


def test_broker_starts_answers_and_stops() -> None:
    b = EmbeddedBroker()
    with b:
        wait_for_metadata(b.bootstrap, timeout=5)
        proc = b.proc
        assert proc is not None and proc.poll() is None
        assert b.log_path is not None and b.log_path.exists()
    assert proc.poll() is not None  # stopped
    assert b.proc is None


def test_topic_layout_is_created_idempotently(broker: Any) -> None:
    from kafka import KafkaAdminClient

    lay = TopicLayout(prefix="layout-test", partitions=3, sources=("fhir", "csv"))
    first = ensure_topics(broker.bootstrap, lay, groups=["g1"])
    again = ensure_topics(broker.bootstrap, lay, groups=["g1"])
    assert first == again
    assert first[lay.access] == 3 and first[lay.snapshots("g1")] == 3 and first[lay.alerts] == 3
    for kind in CONTEXT_KINDS:
        assert first[lay.context(kind)] == 1
    assert {lay.deadletter, lay.control, lay.raw("fhir"), lay.raw("csv")} <= set(first)
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        assert set(lay.specs(["g1"])) <= set(admin.list_topics())
    finally:
        admin.close()
    # users must never move between partitions: a bigger layout on existing topics is refused
    with pytest.raises(TopicLayoutError, match="partition"):
        ensure_topics(broker.bootstrap, TopicLayout(prefix="layout-test", partitions=6))


def test_context_topics_are_compacted_and_keyed_by_id() -> None:
    lay = TopicLayout()
    specs = lay.specs()
    for kind in CONTEXT_KINDS:
        assert specs[lay.context(kind)]["configs"]["cleanup.policy"] == "compact"
    assert "cleanup.policy" not in specs[lay.access]["configs"]
    assert context_key("staff", {"user_id": " u1 "}) == "u1"
    assert context_key("sealed", {"patient_id": "p9", "sealed_at": "x"}) == "p9"
