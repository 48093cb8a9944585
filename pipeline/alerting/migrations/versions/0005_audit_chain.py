"""A tamper-evident audit log: a hash chain over ``audit_log`` and ``triage_history``
(:mod:`pipeline.alerting.chain`). Existing entries are chained in id order.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

GENESIS = "0" * 64
# the chain's format, version 1 (frozen here: pipeline.alerting.chain.FIELDS)
FIELDS = {
    "audit_log": ("at", "actor", "action", "alert_id", "detail"),
    "triage_history": ("alert_id", "at", "actor", "from_state", "to_state", "assignee", "note"),
}
_BATCH = 2000


def _value(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.replace(tzinfo=None).isoformat(timespec="microseconds")
    return v


def _link(prev: str, table: str, row: Any) -> str:
    material = json.dumps(
        [table, *(_value(row[f]) for f in FIELDS[table])], separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256((prev + material).encode()).hexdigest()


def upgrade() -> None:
    bind = op.get_bind()
    for name, cols in FIELDS.items():
        with op.batch_alter_table(name) as batch:
            batch.add_column(sa.Column("chain", sa.String(64), nullable=True))
        typed = (sa.column(c, sa.DateTime) if c == "at" else sa.column(c) for c in cols)
        table = sa.table(name, sa.column("id"), sa.column("chain"), *typed)
        prev, last = GENESIS, None
        while True:  # in pages of ids: memory stays flat however long the log is
            q = sa.select(table).order_by(table.c.id).limit(_BATCH)
            if last is not None:
                q = q.where(table.c.id > last)
            rows = bind.execute(q).mappings().all()
            if not rows:
                break
            pending = []
            for row in rows:
                prev = _link(prev, name, row)
                pending.append({"k": row["id"], "h": prev})
            _store(bind, table, pending)
            last = rows[-1]["id"]


def _store(bind: Any, table: Any, pending: list[dict[str, Any]]) -> None:
    bind.execute(
        table.update().where(table.c.id == sa.bindparam("k")).values(chain=sa.bindparam("h")),
        pending,
    )


def downgrade() -> None:
    for name in FIELDS:
        with op.batch_alter_table(name) as batch:
            batch.drop_column("chain")
