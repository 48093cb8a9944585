"""Tables of the alert store and the notification outbox (one database, SQLAlchemy Core).

The schema is created and upgraded only by the Alembic migrations in ``migrations/``
(:func:`migrate`); ``METADATA`` is the model the migrations must match, which a test
checks with Alembic's autogenerate comparison. Times are stored as naive UTC datetimes.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

#: the Alembic version table; named so it cannot collide with another application's.
VERSION_TABLE = "emrwatch_schema_version"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# BIGINT on PostgreSQL, INTEGER on SQLite (where only INTEGER PRIMARY KEY auto-increments).
BigId = BigInteger().with_variant(Integer(), "sqlite")

METADATA = MetaData()

alerts = Table(
    "alerts",
    METADATA,
    Column("alert_id", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("severity", String(16), nullable=False),
    Column("severity_rank", Integer, nullable=False),  # 0 low .. 3 critical, for sorting
    Column("score", Float, nullable=False),
    Column("risk", Float, nullable=False),
    Column("user_id", String(128), nullable=False),
    Column("department_id", String(64), nullable=False),
    Column("role", String(64), nullable=False),
    Column("detectors", Text, nullable=False),  # comma-joined, for display
    Column("reason", Text, nullable=False),
    Column("first_seen", DateTime, nullable=True),  # UTC
    Column("last_seen", DateTime, nullable=False),  # UTC; the feed's sort key
    Column("first_seen_text", String(40), nullable=False),  # as the detector wrote it
    Column("last_seen_text", String(40), nullable=False),
    Column("n_events", Integer, nullable=False),
    Column("n_patients", Integer, nullable=False),
    Column("status", String(16), nullable=False),  # detector's: open | retracted
    Column("state", String(24), nullable=False),  # triage: new .. closed_benign
    Column("assignee", String(128), nullable=True),
    Column("verdict", String(16), nullable=True),  # confirmed | benign once closed
    Column("decided_by", String(128), nullable=True),
    Column("decided_at", DateTime, nullable=True),
    Column("payload", JSON, nullable=False),  # the whole alert dict of this version
    Column("received_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Index("ix_alerts_last_seen", "last_seen", "alert_id"),
    Index("ix_alerts_updated_at", "updated_at"),
    Index("ix_alerts_severity", "severity_rank", "last_seen", "alert_id"),
    Index("ix_alerts_state", "state", "last_seen", "alert_id"),
    Index("ix_alerts_status", "status", "last_seen", "alert_id"),
    Index("ix_alerts_department", "department_id", "last_seen", "alert_id"),
    Index("ix_alerts_user", "user_id", "last_seen", "alert_id"),
    Index("ix_alerts_verdict", "verdict", "decided_at"),
)


def _alert_key() -> Column[str]:
    """The ``alert_id`` that keys a table of what an alert holds (gone with the alert)."""
    return Column(
        "alert_id",
        String(64),
        ForeignKey("alerts.alert_id", ondelete="CASCADE"),
        primary_key=True,
    )


alert_events = Table(
    "alert_events",
    METADATA,
    _alert_key(),
    Column("event_id", String(128), primary_key=True),
    Column("seq", Integer, nullable=False),  # the alert's own (time) order
    Index("ix_alert_events_event", "event_id"),
)

alert_patients = Table(
    "alert_patients",
    METADATA,
    _alert_key(),
    Column("patient_id", String(128), primary_key=True),
    Index("ix_alert_patients_patient", "patient_id"),  # the other cases on a patient
)

alert_detectors = Table(
    "alert_detectors",
    METADATA,
    _alert_key(),
    Column("detector", String(128), primary_key=True),
    Column("last_seen", DateTime, nullable=False),  # copied so the feed filter is one index
    Index("ix_alert_detectors_feed", "detector", "last_seen", "alert_id"),
)

triage_history = Table(
    "triage_history",
    METADATA,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column(
        "alert_id",
        String(64),
        ForeignKey("alerts.alert_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("at", DateTime, nullable=False),
    Column("actor", String(128), nullable=False),
    Column("from_state", String(24), nullable=False),
    Column("to_state", String(24), nullable=False),
    Column("assignee", String(128), nullable=True),
    Column("note", Text, nullable=False),
    Column("chain", String(64), nullable=True),  # tamper evidence: pipeline.alerting.chain
    Index("ix_triage_history_alert", "alert_id", "id"),
)

suppressions = Table(
    "suppressions",
    METADATA,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("rule", String(128), nullable=False),
    Column("user_id", String(128), nullable=False),
    Column("role", String(64), nullable=False),
    Column("department", String(64), nullable=False),
    Column("patient_id", String(128), nullable=False),
    Column("workstation", String(128), nullable=False),
    Column("until", String(10), nullable=False),  # ISO date, '' for no end
    Column("description", Text, nullable=False),
    Column("source_alert_id", String(64), nullable=True),
    Column("created_by", String(128), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("active", Boolean, nullable=False),
    Column("revoked_by", String(128), nullable=True),
    Column("revoked_at", DateTime, nullable=True),
    Index("ix_suppressions_active", "active"),
)

audit_log = Table(
    "audit_log",
    METADATA,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("at", DateTime, nullable=False),
    Column("actor", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("alert_id", String(64), nullable=True),  # no FK: the log outlives any row
    Column("detail", Text, nullable=False),
    Column("chain", String(64), nullable=True),  # tamper evidence: pipeline.alerting.chain
    Index("ix_audit_log_at", "at"),
    Index("ix_audit_log_alert", "alert_id", "at"),
    Index("ix_audit_log_actor", "actor", "at"),
)

outbox = Table(
    "outbox",
    METADATA,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("key", String(400), nullable=False, unique=True),
    Column("sink", String(16), nullable=False),  # slack | email
    Column("kind", String(16), nullable=False),  # message | digest_item | digest
    Column("target", String(255), nullable=False),  # channel or mail address
    Column("alert_id", String(64), nullable=True),
    Column("alert_version", Integer, nullable=True),
    Column("severity_rank", Integer, nullable=True),
    Column("event", String(16), nullable=False),  # new | escalated | retracted | digest
    Column("payload", JSON, nullable=False),
    # pending → delivered; digest items: held → batched (into a digest) | superseded
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", DateTime, nullable=False),
    Column("lease_until", DateTime, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("batch_key", String(400), nullable=True),
    Column("created_at", DateTime, nullable=False),
    Column("delivered_at", DateTime, nullable=True),
    Index("ix_outbox_due", "state", "next_attempt_at"),
    Index("ix_outbox_alert", "alert_id", "sink"),
    Index("ix_outbox_held", "sink", "state", "target"),
)


# The alert feed's own state, shared by every feed process on this database
# (pipeline.web.sessions): its sign-in sessions, failed sign-ins, and used one-time codes.
feed_sessions = Table(
    "feed_sessions",
    METADATA,
    # a hash of the session's random id (the id itself is only in the signed cookie)
    Column("session_id", String(64), primary_key=True),
    Column("username", String(128), nullable=False),
    Column("fingerprint", String(32), nullable=False),  # the user's credentials then
    Column("address", String(64), nullable=False),
    Column("agent", String(256), nullable=False),  # the browser's User-Agent
    Column("started_at", DateTime, nullable=False),
    Column("seen_at", DateTime, nullable=False),  # the user's last activity (roughly)
    Column("ended_at", DateTime, nullable=True),
    Column("ended_by", String(128), nullable=True),
    Column("end_reason", String(32), nullable=True),
    Column("updated_at", DateTime, nullable=False),  # what each feed process syncs by
    Index("ix_feed_sessions_updated", "updated_at"),
    Index("ix_feed_sessions_user", "username", "started_at"),
)

feed_login_failures = Table(
    "feed_login_failures",
    METADATA,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("scope", String(8), nullable=False),  # user | address
    Column("key", String(64), nullable=False),  # a keyed hash: never the name typed
    Column("at", DateTime, nullable=False),
    Index("ix_feed_login_failures_key", "scope", "key", "at"),
    Index("ix_feed_login_failures_at", "at"),
)

feed_code_steps = Table(
    "feed_code_steps",
    METADATA,
    Column("username", String(128), primary_key=True),
    Column("step", BigInteger, nullable=False),  # the last TOTP time step signed in with
)


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the database to ``revision`` with the Alembic migrations shipped here.

    Safe to call from several processes at once on PostgreSQL (an advisory lock serialises
    them); on SQLite the database file's own write lock does the same.
    """
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(7265786174636801)"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    """Undo migrations down to ``revision`` (``base``: drop everything)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return ctx.get_current_revision()
