"""Alert store, triage history, suppressions, audit log and notification outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("alert_id", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("severity_rank", sa.Integer, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("risk", sa.Float, nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("department_id", sa.String(64), nullable=False),
        sa.Column("role", sa.String(64), nullable=False),
        sa.Column("detectors", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("first_seen", sa.DateTime, nullable=True),
        sa.Column("last_seen", sa.DateTime, nullable=False),
        sa.Column("first_seen_text", sa.String(40), nullable=False),
        sa.Column("last_seen_text", sa.String(40), nullable=False),
        sa.Column("n_events", sa.Integer, nullable=False),
        sa.Column("n_patients", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("assignee", sa.String(128), nullable=True),
        sa.Column("verdict", sa.String(16), nullable=True),
        sa.Column("decided_by", sa.String(128), nullable=True),
        sa.Column("decided_at", sa.DateTime, nullable=True),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("received_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_alerts_last_seen", "alerts", ["last_seen", "alert_id"])
    op.create_index("ix_alerts_severity", "alerts", ["severity_rank", "last_seen", "alert_id"])
    op.create_index("ix_alerts_state", "alerts", ["state", "last_seen", "alert_id"])
    op.create_index("ix_alerts_status", "alerts", ["status", "last_seen", "alert_id"])
    op.create_index("ix_alerts_department", "alerts", ["department_id", "last_seen", "alert_id"])
    op.create_index("ix_alerts_user", "alerts", ["user_id", "last_seen", "alert_id"])
    op.create_index("ix_alerts_verdict", "alerts", ["verdict", "decided_at"])

    op.create_table(
        "alert_events",
        sa.Column(
            "alert_id",
            sa.String(64),
            sa.ForeignKey("alerts.alert_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("event_id", sa.String(128), primary_key=True),
        sa.Column("seq", sa.Integer, nullable=False),
    )
    op.create_index("ix_alert_events_event", "alert_events", ["event_id"])

    op.create_table(
        "alert_detectors",
        sa.Column(
            "alert_id",
            sa.String(64),
            sa.ForeignKey("alerts.alert_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("detector", sa.String(128), primary_key=True),
        sa.Column("last_seen", sa.DateTime, nullable=False),
    )
    op.create_index(
        "ix_alert_detectors_feed", "alert_detectors", ["detector", "last_seen", "alert_id"]
    )

    op.create_table(
        "triage_history",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "alert_id",
            sa.String(64),
            sa.ForeignKey("alerts.alert_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("from_state", sa.String(24), nullable=False),
        sa.Column("to_state", sa.String(24), nullable=False),
        sa.Column("assignee", sa.String(128), nullable=True),
        sa.Column("note", sa.Text, nullable=False),
    )
    op.create_index("ix_triage_history_alert", "triage_history", ["alert_id", "id"])

    op.create_table(
        "suppressions",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("rule", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("role", sa.String(64), nullable=False),
        sa.Column("department", sa.String(64), nullable=False),
        sa.Column("patient_id", sa.String(128), nullable=False),
        sa.Column("workstation", sa.String(128), nullable=False),
        sa.Column("until", sa.String(10), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("source_alert_id", sa.String(64), nullable=True),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("revoked_by", sa.String(128), nullable=True),
        sa.Column("revoked_at", sa.DateTime, nullable=True),
    )
    op.create_index("ix_suppressions_active", "suppressions", ["active"])

    op.create_table(
        "audit_log",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("alert_id", sa.String(64), nullable=True),
        sa.Column("detail", sa.Text, nullable=False),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_audit_log_alert", "audit_log", ["alert_id", "at"])
    op.create_index("ix_audit_log_actor", "audit_log", ["actor", "at"])

    op.create_table(
        "outbox",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(400), nullable=False, unique=True),
        sa.Column("sink", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("alert_id", sa.String(64), nullable=True),
        sa.Column("alert_version", sa.Integer, nullable=True),
        sa.Column("severity_rank", sa.Integer, nullable=True),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("next_attempt_at", sa.DateTime, nullable=False),
        sa.Column("lease_until", sa.DateTime, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("batch_key", sa.String(400), nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("delivered_at", sa.DateTime, nullable=True),
    )
    op.create_index("ix_outbox_due", "outbox", ["state", "next_attempt_at"])
    op.create_index("ix_outbox_alert", "outbox", ["alert_id", "sink"])
    op.create_index("ix_outbox_held", "outbox", ["sink", "state", "target"])


def downgrade() -> None:
    for table in (
        "outbox",
        "audit_log",
        "suppressions",
        "triage_history",
        "alert_detectors",
        "alert_events",
        "alerts",
    ):
        op.drop_table(table)
