"""Alembic's environment for pipeline's state database: migrations run on the connection that
`pipeline.state.migrate.upgrade` hands over (never on a URL from a config file)."""

from __future__ import annotations

from alembic import context

from pipeline.state.schema import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things in place; batch mode copies the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
