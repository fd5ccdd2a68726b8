"""Alembic's entry point for the store: always run by `store.migrate` on a connection it opened (never with
alembic's own ini file), so that the URL and its credentials stay in the service's configuration."""

from __future__ import annotations

from alembic import context

from lomas_jupyter_server.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
