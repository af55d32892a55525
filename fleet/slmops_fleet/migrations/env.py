"""Alembic environment for the fleet store: always run programmatically by `Store.migrate()`,
which hands over an open connection in `config.attributes["connection"]`."""

from __future__ import annotations

from alembic import context

from slmops_fleet.store.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the fleet's migrations through slmops_fleet.store.Store.migrate()")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
