"""Schema versions: Alembic migrations (in `alembic/`) on a connection the store opened, the way JupyterHub
upgrades its database (`lomas-admin db upgrade`, or automatically for a local SQLite file, after a backup).

A SQLite store made by lomas-jupyter 0.1.0 (before Alembic) carries `PRAGMA user_version = 5`; it is stamped with
the baseline revision, which is exactly its schema, and upgraded from there.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ..errors import LomasError

# Alembic is imported only to migrate: a store already at the head is recognised by reading its version table
# (most starts), which keeps Alembic's import (about half a second) off the service's start. HEAD is the newest
# revision in alembic/versions; tests/test_store.py checks it against Alembic's own.
HEAD = "0003"
BASELINE = "0001"
LEGACY_USER_VERSION = 5  # the last schema of the hand-written migration list (0.1.0)
PG_MIGRATION_LOCK = 0x10_4A5  # pg_advisory_lock key: replicas starting together migrate one at a time


class StoreNeedsUpgrade(LomasError):
    status = 503
    code = "store_needs_upgrade"


def _config(connection: sa.Connection | None = None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "alembic"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    return HEAD


def alembic_head() -> str:
    """The head of the migration scripts, as Alembic reads them (HEAD must equal it)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def _stamped_revision(connection: sa.Connection) -> str | None:
    """What Alembic's version table says (what MigrationContext.get_current_revision reads), without Alembic."""
    if not sa.inspect(connection).has_table("alembic_version"):
        return None
    return connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()


def current_revision(connection: sa.Connection) -> str | None:
    """The store's revision; BASELINE for a 0.1.0 SQLite store; None for an empty database."""
    revision = _stamped_revision(connection)
    if revision is not None:
        return revision
    if not sa.inspect(connection).has_table("users"):
        return None
    if connection.dialect.name == "sqlite":
        user_version = connection.exec_driver_sql("PRAGMA user_version").scalar()
        if user_version == LEGACY_USER_VERSION:
            return BASELINE
        raise StoreNeedsUpgrade(f"this store was made by a lomas-jupyter older than 0.1.0 (schema {user_version}); "
                                "open it once with lomas-jupyter 0.1.0, then with this release")
    raise StoreNeedsUpgrade("this database holds tables that are not a lomas store")


def upgrade(engine: sa.Engine, allow: bool, backup: bool = True) -> tuple[str | None, str]:
    """Bring the schema to the head revision; returns (from, to). An empty database is created at the head. An
    older schema is upgraded only when `allow` is set (a SQLite file is copied aside first, with `backup`)."""
    head = head_revision()
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_lock({PG_MIGRATION_LOCK})")
            connection.commit()
        try:
            with connection.begin():
                found = current_revision(connection)
            if found == head:
                return found, head
            if found is not None and not allow:
                raise StoreNeedsUpgrade(
                    f"the store's schema is at revision {found} and this release needs {head}: back it up, then "
                    "run `lomas-admin db upgrade` (or start the service with --LomasApp.upgrade_db=True)")
            if found is not None and backup and engine.url.get_backend_name() == "sqlite" and engine.url.database:
                stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
                shutil.copy2(engine.url.database, f"{engine.url.database}.{found}-{stamp}.bak")
            from alembic import command

            with connection.begin():
                config = _config(connection)
                legacy = found == BASELINE and not _stamped_revision(connection)
                if legacy:
                    command.stamp(config, BASELINE)
                command.upgrade(config, "head")
            return found, head
        finally:
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_unlock({PG_MIGRATION_LOCK})")
                connection.commit()
