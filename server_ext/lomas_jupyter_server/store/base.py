"""The one interface every store implements (SQLite now; PostgreSQL later), so the engine and handlers
never see SQL dialects or connections."""

from __future__ import annotations

import hashlib
import secrets
from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

ROLES = ("admin", "analyst")


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_token() -> str:
    return "lomas_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """Tokens are 256-bit random, so a plain SHA-256 is enough to make a leaked table useless."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class UserRecord:
    username: str
    role: str
    created_at: str

    def to_json(self) -> dict[str, Any]:
        return {"username": self.username, "role": self.role, "created_at": self.created_at}


@dataclass(frozen=True)
class DatasetRecord:
    name: str
    description: str
    metadata: dict[str, Any]
    parquet_path: str
    version: int
    created_at: str

    def to_public_json(self) -> dict[str, Any]:
        """What analysts may see: never the storage location."""
        return {
            "name": self.name,
            "description": self.description,
            "version": self.version,
            "metadata": self.metadata,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class GrantRecord:
    username: str
    dataset: str
    epsilon: float
    delta: float
    updated_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "username": self.username,
            "dataset": self.dataset,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class Budget:
    username: str
    dataset: str
    epsilon_total: float
    delta_total: float
    epsilon_spent: float
    delta_spent: float
    releases: int
    last_cost: float | None
    epsilon_pending: float = 0.0  # reserved by queries still running (included in epsilon_spent)
    delta_pending: float = 0.0
    pending: int = 0

    @property
    def epsilon_remaining(self) -> float:
        return max(self.epsilon_total - self.epsilon_spent, 0.0)

    @property
    def delta_remaining(self) -> float:
        return max(self.delta_total - self.delta_spent, 0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "username": self.username,
            "epsilon_total": self.epsilon_total,
            "epsilon_spent": self.epsilon_spent,
            "epsilon_remaining": self.epsilon_remaining,
            "delta_total": self.delta_total,
            "delta_spent": self.delta_spent,
            "delta_remaining": self.delta_remaining,
            "releases": self.releases,
            "last_cost": self.last_cost,
            "epsilon_pending": self.epsilon_pending,
            "delta_pending": self.delta_pending,
            "pending": self.pending,
        }


@dataclass(frozen=True)
class CourseDataset:
    """A dataset attached to a course: what each student gets, and what the whole class may spend on it (all
    students' releases are about the same people, so their losses add up against one cap)."""

    course: str
    dataset: str
    epsilon_per_student: float
    delta_per_student: float
    epsilon_cap: float
    delta_cap: float

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "epsilon_per_student": self.epsilon_per_student,
                "delta_per_student": self.delta_per_student, "epsilon_cap": self.epsilon_cap,
                "delta_cap": self.delta_cap}


@dataclass(frozen=True)
class CourseRecord:
    name: str
    hub_group: str
    created_at: str
    members: tuple[str, ...]
    datasets: tuple[CourseDataset, ...]
    share_answers: bool = False  # a question one student paid for is answered free to the others

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "hub_group": self.hub_group, "created_at": self.created_at,
                "members": list(self.members), "datasets": [d.to_json() for d in self.datasets],
                "share_answers": self.share_answers}


@dataclass(frozen=True)
class BudgetRequest:
    """A student's ask for more budget on a dataset and, once decided, the decision (never changed again)."""

    id: int
    username: str
    dataset: str
    course: str | None  # the class whose cap bounds the approval
    epsilon: float
    delta: float
    reason: str
    status: str  # pending, approved or declined
    granted_epsilon: float | None
    granted_delta: float | None
    decided_by: str | None
    note: str
    created_at: str
    decided_at: str | None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "username": self.username, "dataset": self.dataset, "course": self.course,
                "epsilon": self.epsilon, "delta": self.delta, "reason": self.reason, "status": self.status,
                "granted_epsilon": self.granted_epsilon, "granted_delta": self.granted_delta,
                "decided_by": self.decided_by, "note": self.note, "created_at": self.created_at,
                "decided_at": self.decided_at}


@dataclass(frozen=True)
class ClassSpending:
    """A class's spending on one dataset: the pool (every reservation ever charged to it, pending included,
    removed students too) against its cap, and each current student's own spending."""

    course: str
    dataset: str
    epsilon_cap: float
    delta_cap: float
    epsilon_spent: float
    delta_spent: float
    per_student: dict[str, dict[str, float]]

    def to_json(self) -> dict[str, Any]:
        return {"course": self.course, "dataset": self.dataset, "epsilon_cap": self.epsilon_cap,
                "delta_cap": self.delta_cap, "epsilon_spent": self.epsilon_spent, "delta_spent": self.delta_spent,
                "per_student": self.per_student}


@dataclass(frozen=True)
class InstanceRecord:
    """A running service process that may hold reservations (one per replica and start)."""

    id: str
    hostname: str
    pid: int
    process_start: str  # the OS's start time of `pid`, so a reused pid is not mistaken for the owner
    started_at: str
    heartbeat_at: str


@dataclass(frozen=True)
class ReleaseDraft:
    """A release about to be archived with the commit of its reservation (ReleaseRecord without id and time)."""

    username: str
    dataset: str
    dataset_version: int
    sql: str
    canonical: str
    params: dict[str, Any]
    epsilon: float
    delta: float
    result: dict[str, Any]


@dataclass(frozen=True)
class ReleaseRecord:
    id: int
    username: str
    dataset: str
    dataset_version: int
    sql: str
    canonical: str
    params: dict[str, Any]
    epsilon: float
    delta: float
    result: dict[str, Any]
    created_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "username": self.username,
            "dataset": self.dataset,
            "dataset_version": self.dataset_version,
            "sql": self.sql,
            "params": self.params,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "result": self.result,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class AuditEntry:
    id: int
    actor: str
    action: str
    detail: dict[str, Any]
    created_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "actor": self.actor,
            "action": self.action,
            "detail": self.detail,
            "created_at": self.created_at,
        }


class AdminStore(ABC):
    """Everything the service persists. Implementations must make `reserve` atomic across threads,
    processes and (for a networked database) replicas."""

    # users and tokens
    @abstractmethod
    def create_user(self, username: str, role: str, actor: str, revive: bool = True) -> UserRecord:
        """A new user, or (`revive`) a removed one back with their history; without `revive`, a removed user
        stays removed (Forbidden): users created on first use must not undo an admin's removal."""

    @abstractmethod
    def get_user(self, username: str) -> UserRecord | None: ...

    @abstractmethod
    def list_users(self) -> list[UserRecord]: ...

    @abstractmethod
    def set_role(self, username: str, role: str, actor: str, keep_admin_access: bool = False) -> UserRecord:
        """With `keep_admin_access`, refuse (atomically) a change that leaves no admin with a valid token."""

    @abstractmethod
    def remove_user(self, username: str, actor: str, keep_admin_access: bool = False) -> int:
        """Ends a user's access (their tokens are revoked); their ledger and releases stay. Returns tokens revoked."""

    @abstractmethod
    def issue_token(self, username: str, label: str, actor: str) -> str:
        """Returns the plaintext token; only its hash is stored."""

    @abstractmethod
    def user_for_token(self, token: str) -> UserRecord | None: ...

    @abstractmethod
    def revoke_tokens(self, username: str, actor: str, keep_admin_access: bool = False) -> int: ...

    # datasets
    @abstractmethod
    def put_dataset(
        self, name: str, description: str, metadata: dict[str, Any], parquet_path: str, actor: str
    ) -> DatasetRecord:
        """Adds a dataset or a new version of it."""

    @abstractmethod
    def get_dataset(self, name: str) -> DatasetRecord | None: ...

    @abstractmethod
    def list_datasets(self) -> list[DatasetRecord]: ...

    # grants and the ledger
    @abstractmethod
    def set_grant(self, username: str, dataset: str, epsilon: float, delta: float, actor: str) -> GrantRecord: ...

    @abstractmethod
    def set_grants(self, usernames: list[str], dataset: str, epsilon: float, delta: float,
                   actor: str) -> list[GrantRecord]:
        """The same grant for several users, in one transaction: an unknown user changes nothing."""

    @abstractmethod
    def get_grant(self, username: str, dataset: str) -> GrantRecord | None: ...

    @abstractmethod
    def list_grants(self, username: str | None = None) -> list[GrantRecord]: ...

    @abstractmethod
    def budget(self, username: str, dataset: str) -> Budget | None: ...

    @abstractmethod
    def reserve(self, username: str, dataset: str, epsilon: float, delta: float, owner: str | None = None) -> str:
        """Atomically check the remaining budget and record a reservation held by service instance `owner`;
        returns its id. Raises InsufficientBudget (with cost and remaining) when it does not fit."""

    @abstractmethod
    def commit(self, reservation_id: str, note: str = "") -> None: ...

    @abstractmethod
    def commit_release(self, reservation_id: str, release: ReleaseDraft) -> ReleaseRecord:
        """Commit the reservation and archive its release in one transaction: a charge never stands without
        its answer (if the archive fails, the reservation stays pending, to be refunded)."""

    @abstractmethod
    def refund(self, reservation_id: str, note: str = "") -> None: ...

    # service instances: a replica settles only the reservations that a dead owner left
    @abstractmethod
    def register_instance(self, instance: InstanceRecord) -> None: ...

    @abstractmethod
    def heartbeat(self, instance_id: str) -> None: ...

    @abstractmethod
    def running_instances(self) -> list[InstanceRecord]: ...

    # --- courses: class pools with a cap checked in the same step as each student's grant ----------------

    @abstractmethod
    def create_course(self, name: str, hub_group: str, actor: str) -> CourseRecord: ...

    @abstractmethod
    def get_course(self, name: str) -> CourseRecord | None: ...

    @abstractmethod
    def list_courses(self) -> list[CourseRecord]: ...

    @abstractmethod
    def set_course_dataset(self, course: str, dataset: str, epsilon_per_student: float, delta_per_student: float,
                           epsilon_cap: float, delta_cap: float, actor: str) -> CourseRecord:
        """Attach or change a dataset; every member's grant is raised to the per-student amount (a top-up never
        lowers what a student already has)."""

    @abstractmethod
    def add_course_member(self, course: str, username: str, actor: str) -> CourseRecord:
        """Enrol an existing user; they get the per-student grant on every attached dataset."""

    @abstractmethod
    def remove_course_member(self, course: str, username: str, actor: str) -> CourseRecord:
        """End a student's access to the course's datasets: their grant drops to what they have spent. What they
        spent stays in the class pool."""

    @abstractmethod
    def sync_course_memberships(self, username: str, hub_groups: Collection[str],
                                actor: str) -> tuple[list[str], list[str]]:
        """Make the user a member of exactly the courses bound to one of `hub_groups` (under JupyterHub the
        group is the roster), in one transaction. Returns the courses joined and left."""

    @abstractmethod
    def class_spending(self, course: str, dataset: str) -> ClassSpending: ...

    # --- budget requests: a student asks, an admin (the instructor) approves all or part, or declines --------

    @abstractmethod
    def request_budget(self, username: str, dataset: str, epsilon: float, delta: float,
                       reason: str) -> BudgetRequest:
        """File a request (one pending per user and dataset), tied to the user's class on that dataset if any."""

    @abstractmethod
    def list_budget_requests(self, username: str | None = None, status: str | None = None,
                             limit: int = 200) -> list[BudgetRequest]: ...

    @abstractmethod
    def decide_budget_request(self, request_id: int, approve: bool, actor: str, epsilon: float | None = None,
                              delta: float | None = None, note: str = "", raise_cap: bool = False) -> BudgetRequest:
        """Approve (all, or `epsilon` of it: the grant goes up by that much) or decline, with a note. An approval
        the class could not spend under its cap is refused unless `raise_cap` lifts the cap just enough."""

    @abstractmethod
    def set_course_sharing(self, course: str, share_answers: bool, actor: str) -> CourseRecord:
        """Turn shared answers on or off for a course (off by default)."""

    @abstractmethod
    def find_class_release(
        self, username: str, dataset: str, dataset_version: int, canonical: str, params: dict[str, Any]
    ) -> tuple[ReleaseRecord, str] | None:
        """The first release of the same query on the same dataset version whose cost was charged to the pool of
        a class that shares answers and that `username` is in now, with that course's name."""

    @abstractmethod
    def retire_instance(self, instance_id: str | None, note: str) -> int:
        """Mark an instance stopped and refund, with `note`, every reservation it left unsettled, in one
        transaction (None: reservations from before instances were recorded). Returns how many."""

    @abstractmethod
    def ledger(self, username: str | None = None, limit: int = 500) -> list[dict[str, Any]]: ...

    # archive (written by commit_release) and audit
    @abstractmethod
    def list_releases(
        self, username: str | None = None, dataset: str | None = None, limit: int = 200
    ) -> list[ReleaseRecord]: ...

    @abstractmethod
    def find_release(
        self, username: str, dataset: str, dataset_version: int, canonical: str, params: dict[str, Any]
    ) -> ReleaseRecord | None:
        """The newest earlier release of the same query by the same user on the same dataset version."""

    @abstractmethod
    def audit(self, limit: int = 200) -> list[AuditEntry]: ...

    @abstractmethod
    def close(self) -> None: ...
