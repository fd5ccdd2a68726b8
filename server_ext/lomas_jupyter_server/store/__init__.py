"""The store room: users, tokens, datasets, grants, the append-only ledger and the release archive, behind one
interface (`base.AdminStore`) with its SQLite implementation.

May import: `errors` only (never `api`, `service`, `hub` or `engine`)."""

from .base import (
    AdminStore,
    AuditEntry,
    Budget,
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
from .sqlite import SQLiteStore

__all__ = [
    "AdminStore",
    "AuditEntry",
    "Budget",
    "ClassSpending",
    "CourseDataset",
    "CourseRecord",
    "DatasetRecord",
    "GrantRecord",
    "InstanceRecord",
    "ReleaseDraft",
    "ReleaseRecord",
    "SQLiteStore",
    "UserRecord",
]
