"""Alembic environment: migrations always run on a connection handed in by ``db.migrate``."""

from __future__ import annotations

from alembic import context

from imap_store.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reachable from the alembic CLI
    raise SystemExit("run migrations through 'mssante-gateway init' or any mssante-policy command")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
