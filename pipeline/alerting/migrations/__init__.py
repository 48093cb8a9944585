"""Alembic migrations of the alert store (run by :func:`pipeline.alerting.schema.migrate`)."""
