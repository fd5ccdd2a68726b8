"""The admin store: users, tokens, datasets, grants, the append-only ledger and the release archive."""

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
