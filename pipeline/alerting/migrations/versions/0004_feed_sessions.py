"""The alert feed's sessions, failed sign-ins and used one-time codes in the database:
a sign-out ends the session everywhere, a supervisor can end anyone's, and several feed
processes behind a load balancer share sessions, lockouts and codes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "feed_sessions",
        sa.Column("session_id", sa.String(64), primary_key=True),
        sa.Column("username", sa.String(128), nullable=False),
        sa.Column("fingerprint", sa.String(32), nullable=False),
        sa.Column("address", sa.String(64), nullable=False),
        sa.Column("agent", sa.String(256), nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("seen_at", sa.DateTime, nullable=False),
        sa.Column("ended_at", sa.DateTime, nullable=True),
        sa.Column("ended_by", sa.String(128), nullable=True),
        sa.Column("end_reason", sa.String(32), nullable=True),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_feed_sessions_updated", "feed_sessions", ["updated_at"])
    op.create_index("ix_feed_sessions_user", "feed_sessions", ["username", "started_at"])
    op.create_table(
        "feed_login_failures",
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_feed_login_failures_key", "feed_login_failures", ["scope", "key", "at"])
    op.create_index("ix_feed_login_failures_at", "feed_login_failures", ["at"])
    op.create_table(
        "feed_code_steps",
        sa.Column("username", sa.String(128), primary_key=True),
        sa.Column("step", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("feed_code_steps")
    op.drop_index("ix_feed_login_failures_at", table_name="feed_login_failures")
    op.drop_index("ix_feed_login_failures_key", table_name="feed_login_failures")
    op.drop_table("feed_login_failures")
    op.drop_index("ix_feed_sessions_user", table_name="feed_sessions")
    op.drop_index("ix_feed_sessions_updated", table_name="feed_sessions")
    op.drop_table("feed_sessions")
