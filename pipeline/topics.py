"""The topic layout, in one place.

::

    connectors ──raw bytes──▶ emrwatch.raw.<source>          (per source, as received)
        │ parse at the edge
        ▼
    emrwatch.access   key user_id   ── one user's events in one partition, in order
        │                              (no repartition hop: per-user state stays local)
        ▼
    Faust workers (one consumer group) ──▶ emrwatch.alerts       key alert_id (upserts)
        ▲        │                     ──▶ emrwatch.deadletter   original bytes + reason
        │        └── engine snapshots ──▶ emrwatch.snapshots.<group>   key partition:chunk
        │
    emrwatch.context.{staff,patients,encounters,sealed,grants,departments}
        compacted, key = record id; every worker reads all partitions (not group-balanced)

    emrwatch.control   end-of-input markers and their acknowledgements (replay --stream, bench)

Creation is idempotent: existing topics are kept, a partition count that is too small is an
error with a clear message (repartitioning would move users between partitions).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from emrwatch.context import CONTEXT_FILES

log = logging.getLogger(__name__)

CONTEXT_KINDS: tuple[str, ...] = tuple(CONTEXT_FILES)

#: the column(s) that identify a record of each context kind: the compacted topic's key.
CONTEXT_KEY_COLUMNS: dict[str, tuple[str, ...]] = {
    "departments": ("department_id",),
    "staff": ("user_id",),
    "patients": ("patient_id",),
    "encounters": ("encounter_id",),
    "sealed": ("patient_id",),
    # Context.upsert keys a grant by (user, departments, actions, purpose)
    "grants": ("user_id", "departments", "actions", "purpose"),
}

#: header on access-topic control records (end of input); absent on ordinary events.
CONTROL_HEADER = "emrwatch-control"

#: headers on access events and dead letters: which source sent it, from where in that
#: source, and (dead letters) why it was refused and at which stage
H_SOURCE = "emrwatch-source"
H_POSITION = "emrwatch-position"
H_ERROR = "emrwatch-error"
H_STAGE = "emrwatch-stage"


def context_key(kind: str, row: Mapping[str, Any]) -> str:
    """The compacted-topic key of one context row.

    >>> context_key("grants", {"user_id": "u1", "departments": "ED", "actions": "*", "purpose": "audit"})
    'u1|ED|*|audit'
    """
    return "|".join(str(row.get(c) or "").strip() for c in CONTEXT_KEY_COLUMNS[kind])


def context_key_values(kind: str, key: str) -> list[str]:
    """The key columns' values back from a :func:`context_key` (a tombstone's key).

    >>> context_key_values("grants", "u1|ED|*|audit"), context_key_values("encounters", "e|1")
    (['u1', 'ED', '*', 'audit'], ['e|1'])
    """
    return key.split("|") if len(CONTEXT_KEY_COLUMNS[kind]) > 1 else [key]


@dataclass(frozen=True, slots=True)
class TopicLayout:
    """Names and sizes of every topic. ``partitions`` bounds scale-out: one worker per partition."""

    prefix: str = "emrwatch"
    partitions: int = 4
    replication_factor: int = 1
    sources: tuple[str, ...] = ("fhir", "jsonl", "csv", "atna", "hl7")
    extra_configs: dict[str, str] = field(default_factory=dict)

    @property
    def access(self) -> str:
        return f"{self.prefix}.access"

    @property
    def alerts(self) -> str:
        return f"{self.prefix}.alerts"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}.deadletter"

    def snapshots(self, group: str) -> str:
        """Engine snapshots of one consumer group (state belongs to the group, like offsets)."""
        return f"{self.prefix}.snapshots.{group}"

    @property
    def control(self) -> str:
        return f"{self.prefix}.control"

    def raw(self, source: str) -> str:
        return f"{self.prefix}.raw.{source}"

    def context(self, kind: str) -> str:
        if kind not in CONTEXT_KEY_COLUMNS:
            raise ValueError(f"unknown context kind {kind!r}")
        return f"{self.prefix}.context.{kind}"

    @property
    def context_topics(self) -> dict[str, str]:
        """topic name → context kind."""
        return {self.context(k): k for k in CONTEXT_KINDS}

    def specs(self, groups: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
        """Every topic (with the snapshot topics of ``groups``), partitions and configs, as
        ``create_topics`` wants them."""
        compact = {"cleanup.policy": "compact"}
        n = self.partitions
        specs: dict[str, dict[str, Any]] = {
            self.access: {"num_partitions": n},
            self.alerts: {"num_partitions": n, "configs": compact},
            self.deadletter: {"num_partitions": 1},
            self.control: {"num_partitions": 1},
        }
        for g in groups:
            # one snapshot partition per access partition: restoring reads only its own
            specs[self.snapshots(g)] = {"num_partitions": n, "configs": compact}
        for s in self.sources:
            specs[self.raw(s)] = {"num_partitions": n}
        for k in CONTEXT_KINDS:
            specs[self.context(k)] = {"num_partitions": 1, "configs": compact}
        for spec in specs.values():
            spec["replication_factor"] = self.replication_factor
            spec["configs"] = {**spec.get("configs", {}), **self.extra_configs}
        return specs


class TopicLayoutError(RuntimeError):
    """An existing topic does not fit the layout."""


def ensure_topics(
    bootstrap: str,
    layout: TopicLayout,
    client_config: Mapping[str, Any] | None = None,
    only: Iterable[str] | None = None,
    groups: Iterable[str] = (),
    create: bool = True,
) -> dict[str, int]:
    """Create missing topics; check the partition count of existing ones.

    Returns topic → partition count. Safe to call from every process at start-up. With
    ``create=False`` missing topics are an error (clusters where an admin creates topics).
    """
    from kafka import KafkaAdminClient
    from kafka.errors import TopicAlreadyExistsError

    specs = layout.specs(groups)
    if only is not None:
        wanted = set(only)
        specs = {t: s for t, s in specs.items() if t in wanted}
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="emrwatch-admin", **dict(client_config or {})
    )
    try:
        existing = set(admin.list_topics())
        missing = {t: s for t, s in specs.items() if t not in existing}
        if missing and not create:
            raise TopicLayoutError(
                f"missing topic(s) {sorted(missing)}; create them or set topics.create"
            )
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent creator won
                admin.create_topics(missing, raise_errors=False, wait_for_metadata=True)
            log.info("created topics %s", sorted(missing))
        counts = partition_counts(admin, list(specs))
    finally:
        admin.close()
    for topic, spec in specs.items():
        have = counts.get(topic, 0)
        if have < spec["num_partitions"]:
            raise TopicLayoutError(
                f"topic {topic} has {have} partition(s), the layout needs "
                f"{spec['num_partitions']}; create it with more partitions or lower "
                "'partitions' in the config (users must not move between partitions)"
            )
    return counts


def partition_counts(admin: Any, topics: list[str]) -> dict[str, int]:
    """topic → number of partitions, from broker metadata."""
    out: dict[str, int] = {}
    for t in admin.describe_topics(topics):
        name = t.get("topic") if isinstance(t, dict) else None
        if name is None:
            name = t.get("name") if isinstance(t, dict) else None
        if name and not t.get("error_code"):
            out[name] = len(t.get("partitions") or [])
    return out
