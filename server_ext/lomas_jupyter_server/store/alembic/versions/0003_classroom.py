"""The classroom: a course may share answers (a question a classmate already paid for from the class's pool is
answered again for free to the others), and students ask for more budget with a request an admin decides.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("courses") as batch:
        batch.add_column(sa.Column("share_answers", sa.Integer, nullable=False, server_default="0"))
    op.create_table(
        "budget_requests",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("username", sa.Text, sa.ForeignKey("users.username"), nullable=False),
        sa.Column("dataset", sa.Text, sa.ForeignKey("datasets.name"), nullable=False),
        sa.Column("course", sa.Text),
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
    )
    op.create_index("budget_requests_status", "budget_requests", ["status"])
    op.create_index("budget_requests_user", "budget_requests", ["username"])


def downgrade() -> None:
    op.drop_index("budget_requests_user", table_name="budget_requests")
    op.drop_index("budget_requests_status", table_name="budget_requests")
    op.drop_table("budget_requests")
    with op.batch_alter_table("courses") as batch:
        batch.drop_column("share_answers")
