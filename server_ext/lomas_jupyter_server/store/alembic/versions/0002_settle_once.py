"""A reservation is settled once (commit or refund, never both) and archives at most one release, enforced by
the database, so concurrent replicas cannot double-settle.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ledger_one_settlement", table_name="ledger")
    op.create_index("ledger_one_reserve", "ledger", ["reservation_id"], unique=True,
                    sqlite_where=sa.text("kind = 'reserve'"), postgresql_where=sa.text("kind = 'reserve'"))
    op.create_index("ledger_one_settlement", "ledger", ["reservation_id"], unique=True,
                    sqlite_where=sa.text("kind != 'reserve'"), postgresql_where=sa.text("kind != 'reserve'"))
    op.create_index("releases_one_per_reservation", "releases", ["reservation_id"], unique=True)


def downgrade() -> None:
    op.drop_index("releases_one_per_reservation", table_name="releases")
    op.drop_index("ledger_one_settlement", table_name="ledger")
    op.drop_index("ledger_one_reserve", table_name="ledger")
    op.create_index("ledger_one_settlement", "ledger", ["reservation_id", "kind"], unique=True)
