"""The store room: users, tokens, datasets, grants, the append-only ledger and the release archive, behind one
interface (`base.AdminStore`), implemented once on SQLAlchemy (`sql.SQLStore`) for SQLite and PostgreSQL, with
the tables in `schema` and their versions in Alembic migrations (`migrate`, `alembic/`).

May import: `errors` only (never `api`, `service`, `hub` or `engine`)."""

from .base import (
    AdminStore,
    AuditEntry,
    Budget,
    BudgetRequest,
    ClassSpending,
    CourseDataset,
    CourseRecord,
    DatasetRecord,
    GrantRecord,
    InstanceRecord,
    ReleaseDraft,
    ReleaseRecord,
    UserRecord,
)
from .migrate import StoreNeedsUpgrade
from .sql import SQLStore, database_url

__all__ = [
    "AdminStore",
    "AuditEntry",
    "Budget",
    "BudgetRequest",
    "ClassSpending",
    "CourseDataset",
    "CourseRecord",
    "DatasetRecord",
    "GrantRecord",
    "InstanceRecord",
    "ReleaseDraft",
    "ReleaseRecord",
    "SQLStore",
    "StoreNeedsUpgrade",
    "UserRecord",
    "database_url",
]
