"""Administration: users, roles, tokens and grants; who is an admin (the Hub decides for instructors); the
identity of a JupyterHub user as a lomas user."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from ..errors import BadRequest, Conflict, Forbidden, LomasError, NotFound
from ..store import AdminStore, UserRecord


def require_admin(user: UserRecord) -> None:
    if user.role != "admin":
        raise Forbidden("this needs the admin role")


def amount(body: dict[str, Any], name: str) -> float:
    """A budget amount from a request body (delta defaults to 0): a finite, non-negative number."""
    value = body.get(name, 0.0 if name.startswith("delta") else None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BadRequest(f"'{name}' must be a non-negative number")
    return float(value)


class AdminService:
    def __init__(self, store: AdminStore, protect_admin_access: bool = False) -> None:
        self.store = store
        # with token identity, the API must never lock every admin out (lomas-admin can always recover)
        self.protect_admin_access = protect_admin_access

    def ensure_user(self, username: str, role: str) -> UserRecord:
        user = self.store.get_user(username)
        if user is None:
            try:
                user = self.store.create_user(username, role, actor="system")
            except LomasError:
                user = self.store.get_user(username)  # created concurrently
                assert user is not None
        return user

    def hub_user(self, username: str, hub_groups: list[str], instructor: bool) -> UserRecord:
        """The lomas user behind a JupyterHub identity: created as an analyst on first use, enrolled in exactly
        the courses of their Hub groups, and an admin for this request when the Hub grants the instructor
        scope (the Hub, not this store, decides who teaches)."""
        user = self.store.get_user(username)
        if user is None:
            try:
                user = self.store.create_user(username, "analyst", actor="hub", revive=False)
            except Conflict:
                user = self.store.get_user(username)  # created by a concurrent first request
                assert user is not None
        self.store.sync_course_memberships(username, hub_groups, actor="hub")
        return replace(user, role="admin") if instructor and user.role != "admin" else user


    def create_user(self, admin: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        require_admin(admin)
        username = body.get("username")
        if not isinstance(username, str):
            raise BadRequest("'username' is required")
        return self.store.create_user(username, body.get("role", "analyst"), admin.username).to_json()

    def set_role(self, admin: UserRecord, username: str, body: dict[str, Any]) -> dict[str, Any]:
        require_admin(admin)
        return self.store.set_role(username, body.get("role", ""), admin.username,
                                   keep_admin_access=self.protect_admin_access).to_json()

    def remove_user(self, admin: UserRecord, username: str) -> dict[str, Any]:
        require_admin(admin)
        revoked = self.store.remove_user(username, admin.username, keep_admin_access=self.protect_admin_access)
        return {"username": username, "removed": True, "tokens_revoked": revoked}

    def issue_token(self, admin: UserRecord, username: str, body: dict[str, Any]) -> dict[str, Any]:
        require_admin(admin)
        label = body.get("label", "")
        if not isinstance(label, str):
            raise BadRequest("label must be text")
        return {"username": username, "token": self.store.issue_token(username, label, admin.username)}

    def revoke_tokens(self, admin: UserRecord, username: str) -> dict[str, Any]:
        require_admin(admin)
        if self.store.get_user(username) is None:
            raise NotFound(f"no user '{username}'")
        revoked = self.store.revoke_tokens(username, admin.username, keep_admin_access=self.protect_admin_access)
        return {"username": username, "revoked": revoked}

    def set_grant(self, admin: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        require_admin(admin)
        usernames, dataset = body.get("usernames"), body.get("dataset")
        if usernames is None:
            usernames = [body.get("username")]
        if (not isinstance(usernames, list) or not all(isinstance(u, str) for u in usernames)
                or not isinstance(dataset, str)):
            raise BadRequest("'username' (or a list 'usernames') and 'dataset' are required")
        epsilon, delta = amount(body, "epsilon"), amount(body, "delta")
        grants = self.store.set_grants(usernames, dataset, epsilon, delta, admin.username)
        return grants[0].to_json() if "usernames" not in body else {"grants": [g.to_json() for g in grants]}


    def users(self, admin: UserRecord) -> list[dict[str, Any]]:
        require_admin(admin)
        return [u.to_json() for u in self.store.list_users()]

    def grants(self, admin: UserRecord, username: str | None) -> list[dict[str, Any]]:
        require_admin(admin)
        return [g.to_json() for g in self.store.list_grants(username)]

    def releases(self, admin: UserRecord, username: str | None, dataset: str | None, limit: int) -> list[dict[str, Any]]:
        require_admin(admin)
        return [r.to_json() for r in self.store.list_releases(username, dataset, limit)]

    def ledger(self, admin: UserRecord, username: str | None, limit: int) -> list[dict[str, Any]]:
        require_admin(admin)
        return self.store.ledger(username, limit)

    def audit(self, admin: UserRecord, limit: int) -> list[dict[str, Any]]:
        require_admin(admin)
        return [a.to_json() for a in self.store.audit(limit)]
