"""The store's tables, defined once (SQLAlchemy Core) for SQLite and PostgreSQL alike.

Alembic's migrations in `alembic/versions` build exactly this schema; `tests/test_store.py` checks that they agree.
Times are ISO-8601 text (UTC, milliseconds) and running totals are exact fractions as text, so that both
databases hold the same values and a sum of many float charges is never rounded until it is compared or shown.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

users = sa.Table(
    "users", metadata,
    sa.Column("username", sa.Text, primary_key=True),
    sa.Column("role", sa.Text, sa.CheckConstraint("role IN ('admin', 'analyst')", name="users_role"), nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("removed_at", sa.Text),
)

tokens = sa.Table(
    "tokens", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.Text, sa.ForeignKey("users.username"), nullable=False),
    sa.Column("token_hash", sa.Text, nullable=False, unique=True),
    sa.Column("label", sa.Text, nullable=False, server_default=""),
    sa.Column("revoked", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Text, nullable=False),
)

datasets = sa.Table(
    "datasets", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("metadata_json", sa.Text, nullable=False),
    sa.Column("parquet_path", sa.Text, nullable=False),  # a local path or an object-store URL; never shown
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
)

grants = sa.Table(
    "grants", metadata,
    sa.Column("username", sa.Text, sa.ForeignKey("users.username"), primary_key=True),
    sa.Column("dataset", sa.Text, sa.ForeignKey("datasets.name"), primary_key=True),
    sa.Column("epsilon", sa.Float, sa.CheckConstraint("epsilon >= 0", name="grants_epsilon"), nullable=False),
    sa.Column("delta", sa.Float, sa.CheckConstraint("delta >= 0 AND delta < 1", name="grants_delta"),
              nullable=False),
    sa.Column("updated_at", sa.Text, nullable=False),
)

# Append-only (triggers refuse UPDATE and DELETE). A reservation is one 'reserve' row and at most one settlement.
ledger = sa.Table(
    "ledger", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("reservation_id", sa.Text, nullable=False),
    sa.Column("username", sa.Text, nullable=False),
    sa.Column("dataset", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, sa.CheckConstraint("kind IN ('reserve', 'commit', 'refund')", name="ledger_kind"),
              nullable=False),
    sa.Column("epsilon", sa.Float, nullable=False),
    sa.Column("delta", sa.Float, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("instance_id", sa.Text),
    sa.Column("note", sa.Text, nullable=False, server_default=""),
    sa.Column("pools", sa.Text, nullable=False, server_default="[]"),  # the class pools the reserve charged
    sa.Index("ledger_user_dataset", "username", "dataset"),
    sa.Index("ledger_reservation", "reservation_id"),
    sa.Index("ledger_one_reserve", "reservation_id", unique=True, sqlite_where=sa.text("kind = 'reserve'"),
             postgresql_where=sa.text("kind = 'reserve'")),
    sa.Index("ledger_one_settlement", "reservation_id", unique=True, sqlite_where=sa.text("kind != 'reserve'"),
             postgresql_where=sa.text("kind != 'reserve'")),
)

releases = sa.Table(
    "releases", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.Text, nullable=False),
    sa.Column("dataset", sa.Text, nullable=False),
    sa.Column("dataset_version", sa.Integer, nullable=False),
    sa.Column("sql", sa.Text, nullable=False),
    sa.Column("canonical", sa.Text, nullable=False),
    sa.Column("params_json", sa.Text, nullable=False),
    sa.Column("epsilon", sa.Float, nullable=False),
    sa.Column("delta", sa.Float, nullable=False),
    sa.Column("result_json", sa.Text, nullable=False),
    sa.Column("reservation_id", sa.Text, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Index("releases_user", "username", "dataset"),
    sa.Index("releases_replay", "username", "dataset", "dataset_version", "canonical"),
    sa.Index("releases_one_per_reservation", "reservation_id", unique=True),
)

audit = sa.Table(
    "audit", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("detail_json", sa.Text, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
)

# Running totals per (user, dataset); the row is also the lock that serialises one user's reservations on one
# dataset across replicas (SELECT ... FOR UPDATE on PostgreSQL).
budget_totals = sa.Table(
    "budget_totals", metadata,
    sa.Column("username", sa.Text, primary_key=True),
    sa.Column("dataset", sa.Text, primary_key=True),
    sa.Column("epsilon_spent", sa.Text, nullable=False),
    sa.Column("delta_spent", sa.Text, nullable=False),
    sa.Column("releases", sa.Integer, nullable=False),
    sa.Column("last_cost", sa.Float),
    sa.Column("epsilon_pending", sa.Text, nullable=False, server_default="0"),
    sa.Column("delta_pending", sa.Text, nullable=False, server_default="0"),
    sa.Column("pending", sa.Integer, nullable=False, server_default="0"),
)

instances = sa.Table(
    "instances", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("hostname", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("process_start", sa.Text, nullable=False),
    sa.Column("started_at", sa.Text, nullable=False),
    sa.Column("heartbeat_at", sa.Text, nullable=False),
    sa.Column("stopped_at", sa.Text),
)

courses = sa.Table(
    "courses", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("hub_group", sa.Text, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
    # 1: a release paid from this class's pool is answered again, free, to the class's other students
    sa.Column("share_answers", sa.Integer, nullable=False, server_default="0"),
)

course_datasets = sa.Table(
    "course_datasets", metadata,
    sa.Column("course", sa.Text, sa.ForeignKey("courses.name"), primary_key=True),
    sa.Column("dataset", sa.Text, sa.ForeignKey("datasets.name"), primary_key=True),
    sa.Column("epsilon_per_student", sa.Float, nullable=False),
    sa.Column("delta_per_student", sa.Float, nullable=False),
    sa.Column("epsilon_cap", sa.Float, nullable=False),
    sa.Column("delta_cap", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Text, nullable=False),
)

course_members = sa.Table(
    "course_members", metadata,
    sa.Column("course", sa.Text, sa.ForeignKey("courses.name"), primary_key=True),
    sa.Column("username", sa.Text, sa.ForeignKey("users.username"), primary_key=True),
    sa.Column("joined_at", sa.Text, nullable=False),
    sa.Index("course_members_user", "username"),  # every reservation looks up the student's classes
)

# Everything charged to a (course, dataset) class pool; the row is the pool's lock, like budget_totals.
pool_totals = sa.Table(
    "pool_totals", metadata,
    sa.Column("course", sa.Text, primary_key=True),
    sa.Column("dataset", sa.Text, primary_key=True),
    sa.Column("epsilon_spent", sa.Text, nullable=False),
    sa.Column("delta_spent", sa.Text, nullable=False),
)

# A student's ask for more budget, and the admin's decision; a decided request is never changed again.
budget_requests = sa.Table(
    "budget_requests", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.Text, sa.ForeignKey("users.username"), nullable=False),
    sa.Column("dataset", sa.Text, sa.ForeignKey("datasets.name"), nullable=False),
    sa.Column("course", sa.Text),  # the class whose cap bounds the approval (None: a grant outside any class)
    sa.Column("epsilon", sa.Float, nullable=False),
    sa.Column("delta", sa.Float, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("status", sa.Text, sa.CheckConstraint("status IN ('pending', 'approved', 'declined')",
                                                    name="budget_requests_status"), nullable=False),
    sa.Column("granted_epsilon", sa.Float),
    sa.Column("granted_delta", sa.Float),
    sa.Column("decided_by", sa.Text),
    sa.Column("note", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("decided_at", sa.Text),
    sa.Index("budget_requests_status", "status"),
    sa.Index("budget_requests_user", "username"),
)
