"""The schema of lomas-jupyter 0.1.0 (its SQLite stores are stamped with this revision, then upgraded).

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

APPEND_ONLY = "the ledger is append-only"


def upgrade() -> None:
    text, real, integer = sa.Text, sa.Float, sa.Integer
    op.create_table(
        "users",
        sa.Column("username", text, primary_key=True),
        sa.Column("role", text, sa.CheckConstraint("role IN ('admin', 'analyst')", name="users_role"),
                  nullable=False),
        sa.Column("created_at", text, nullable=False),
        sa.Column("removed_at", text),
    )
    op.create_table(
        "tokens",
        sa.Column("id", integer, primary_key=True),
        sa.Column("username", text, sa.ForeignKey("users.username"), nullable=False),
        sa.Column("token_hash", text, nullable=False, unique=True),
        sa.Column("label", text, nullable=False, server_default=""),
        sa.Column("revoked", integer, nullable=False, server_default="0"),
        sa.Column("created_at", text, nullable=False),
    )
    op.create_table(
        "datasets",
        sa.Column("name", text, primary_key=True),
        sa.Column("description", text, nullable=False, server_default=""),
        sa.Column("metadata_json", text, nullable=False),
        sa.Column("parquet_path", text, nullable=False),
        sa.Column("version", integer, nullable=False),
        sa.Column("created_at", text, nullable=False),
    )
    op.create_table(
        "grants",
        sa.Column("username", text, sa.ForeignKey("users.username"), primary_key=True),
        sa.Column("dataset", text, sa.ForeignKey("datasets.name"), primary_key=True),
        sa.Column("epsilon", real, sa.CheckConstraint("epsilon >= 0", name="grants_epsilon"), nullable=False),
        sa.Column("delta", real, sa.CheckConstraint("delta >= 0 AND delta < 1", name="grants_delta"),
                  nullable=False),
        sa.Column("updated_at", text, nullable=False),
    )
    op.create_table(
        "ledger",
        sa.Column("id", integer, primary_key=True),
        sa.Column("reservation_id", text, nullable=False),
        sa.Column("username", text, nullable=False),
        sa.Column("dataset", text, nullable=False),
        sa.Column("kind", text, sa.CheckConstraint("kind IN ('reserve', 'commit', 'refund')", name="ledger_kind"),
                  nullable=False),
        sa.Column("epsilon", real, nullable=False),
        sa.Column("delta", real, nullable=False),
        sa.Column("created_at", text, nullable=False),
        sa.Column("instance_id", text),
        sa.Column("note", text, nullable=False, server_default=""),
        sa.Column("pools", text, nullable=False, server_default="[]"),
    )
    op.create_index("ledger_user_dataset", "ledger", ["username", "dataset"])
    op.create_index("ledger_reservation", "ledger", ["reservation_id"])
    op.create_index("ledger_one_settlement", "ledger", ["reservation_id", "kind"], unique=True)
    op.create_table(
        "releases",
        sa.Column("id", integer, primary_key=True),
        sa.Column("username", text, nullable=False),
        sa.Column("dataset", text, nullable=False),
        sa.Column("dataset_version", integer, nullable=False),
        sa.Column("sql", text, nullable=False),
        sa.Column("canonical", text, nullable=False),
        sa.Column("params_json", text, nullable=False),
        sa.Column("epsilon", real, nullable=False),
        sa.Column("delta", real, nullable=False),
        sa.Column("result_json", text, nullable=False),
        sa.Column("reservation_id", text, nullable=False),
        sa.Column("created_at", text, nullable=False),
    )
    op.create_index("releases_user", "releases", ["username", "dataset"])
    op.create_index("releases_replay", "releases", ["username", "dataset", "dataset_version", "canonical"])
    op.create_table(
        "audit",
        sa.Column("id", integer, primary_key=True),
        sa.Column("actor", text, nullable=False),
        sa.Column("action", text, nullable=False),
        sa.Column("detail_json", text, nullable=False),
        sa.Column("created_at", text, nullable=False),
    )
    op.create_table(
        "budget_totals",
        sa.Column("username", text, primary_key=True),
        sa.Column("dataset", text, primary_key=True),
        sa.Column("epsilon_spent", text, nullable=False),
        sa.Column("delta_spent", text, nullable=False),
        sa.Column("releases", integer, nullable=False),
        sa.Column("last_cost", real),
        sa.Column("epsilon_pending", text, nullable=False, server_default="0"),
        sa.Column("delta_pending", text, nullable=False, server_default="0"),
        sa.Column("pending", integer, nullable=False, server_default="0"),
    )
    op.create_table(
        "instances",
        sa.Column("id", text, primary_key=True),
        sa.Column("hostname", text, nullable=False),
        sa.Column("pid", integer, nullable=False),
        sa.Column("process_start", text, nullable=False),
        sa.Column("started_at", text, nullable=False),
        sa.Column("heartbeat_at", text, nullable=False),
        sa.Column("stopped_at", text),
    )
    op.create_table(
        "courses",
        sa.Column("name", text, primary_key=True),
        sa.Column("hub_group", text, nullable=False),
        sa.Column("created_at", text, nullable=False),
    )
    op.create_table(
        "course_datasets",
        sa.Column("course", text, sa.ForeignKey("courses.name"), primary_key=True),
        sa.Column("dataset", text, sa.ForeignKey("datasets.name"), primary_key=True),
        sa.Column("epsilon_per_student", real, nullable=False),
        sa.Column("delta_per_student", real, nullable=False),
        sa.Column("epsilon_cap", real, nullable=False),
        sa.Column("delta_cap", real, nullable=False),
        sa.Column("updated_at", text, nullable=False),
    )
    op.create_table(
        "course_members",
        sa.Column("course", text, sa.ForeignKey("courses.name"), primary_key=True),
        sa.Column("username", text, sa.ForeignKey("users.username"), primary_key=True),
        sa.Column("joined_at", text, nullable=False),
    )
    op.create_index("course_members_user", "course_members", ["username"])
    op.create_table(
        "pool_totals",
        sa.Column("course", text, primary_key=True),
        sa.Column("dataset", text, primary_key=True),
        sa.Column("epsilon_spent", text, nullable=False),
        sa.Column("delta_spent", text, nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE FUNCTION lomas_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS "
                   f"$$ BEGIN RAISE EXCEPTION '{APPEND_ONLY}'; END $$")
        op.execute("CREATE TRIGGER ledger_no_change BEFORE UPDATE OR DELETE ON ledger FOR EACH ROW "
                   "EXECUTE FUNCTION lomas_ledger_append_only()")
        op.execute("CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger FOR EACH STATEMENT "
                   "EXECUTE FUNCTION lomas_ledger_append_only()")
    else:
        op.execute(f"CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger BEGIN SELECT RAISE(ABORT, "
                   f"'{APPEND_ONLY}'); END")
        op.execute(f"CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger BEGIN SELECT RAISE(ABORT, "
                   f"'{APPEND_ONLY}'); END")


def downgrade() -> None:
    raise NotImplementedError("the baseline is not downgraded: the ledger is never dropped")
