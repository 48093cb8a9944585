"""Index alerts by patient: the case page lists the other cases on the same patients
(several staff snooping on one VIP are several cases, seen together).

Existing alerts are indexed from their stored payload.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_BATCH = 2000


def upgrade() -> None:
    table = op.create_table(
        "alert_patients",
        sa.Column(
            "alert_id",
            sa.String(64),
            sa.ForeignKey("alerts.alert_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("patient_id", sa.String(128), primary_key=True),
    )
    op.create_index("ix_alert_patients_patient", "alert_patients", ["patient_id"])
    bind = op.get_bind()
    alerts = sa.table("alerts", sa.column("alert_id"), sa.column("payload"))
    rows: list[dict[str, Any]] = []
    for alert_id, payload in bind.execute(sa.select(alerts.c.alert_id, alerts.c.payload)):
        d = json.loads(payload) if isinstance(payload, str) else (payload or {})
        for pid in dict.fromkeys(str(p) for p in d.get("patient_ids") or [] if p):
            rows.append({"alert_id": alert_id, "patient_id": pid[:128]})
        if len(rows) >= _BATCH:
            op.bulk_insert(table, rows)
            rows = []
    if rows:
        op.bulk_insert(table, rows)


def downgrade() -> None:
    op.drop_index("ix_alert_patients_patient", table_name="alert_patients")
    op.drop_table("alert_patients")
