"""Index alerts by updated_at: the live feed asks "what changed since my cursor?".

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_alerts_updated_at", "alerts", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_alerts_updated_at", table_name="alerts")
