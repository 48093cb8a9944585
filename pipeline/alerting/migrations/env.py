"""Alembic environment: runs on the connection that :func:`schema.migrate` hands over.

Operators may also run ``alembic -x url=postgresql+psycopg://... upgrade head`` with
``script_location`` pointing here. Importing this module outside Alembic (pytest's doctest
collection does) is a no-op.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import create_engine

from pipeline.alerting.schema import METADATA, VERSION_TABLE


def _run(config: Any) -> None:
    conn = config.attributes.get("connection")
    opts: dict[str, Any] = {
        "target_metadata": METADATA,
        "version_table": VERSION_TABLE,
        "compare_type": True,
    }
    if conn is not None:
        context.configure(connection=conn, render_as_batch=conn.dialect.name == "sqlite", **opts)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    engine = create_engine(url)
    with engine.begin() as c:
        context.configure(connection=c, render_as_batch=c.dialect.name == "sqlite", **opts)
        with context.begin_transaction():
            context.run_migrations()


_config: Any
try:
    _config = context.config
except (NameError, AttributeError):  # imported outside an Alembic run
    _config = None
if _config is not None:
    _run(_config)
