"""Budget requests: a student asks for more on a dataset from where they are; an admin (the course's instructor)
approves all or part, within the class's cap or raising it explicitly, or declines with a note."""

from __future__ import annotations

from typing import Any

from ..errors import BadRequest, NotFound
from ..store import AdminStore, UserRecord
from .admin import amount, require_admin

STATUSES = ("pending", "approved", "declined")


def _text(body: dict[str, Any], name: str, default: str | None = None) -> str:
    value = body.get(name, default)
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be text")
    return value


class BudgetRequestService:
    def __init__(self, store: AdminStore) -> None:
        self.store = store

    def ask(self, user: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        dataset = _text(body, "dataset")
        return self.store.request_budget(user.username, dataset, amount(body, "epsilon"), amount(body, "delta"),
                                         _text(body, "reason")).to_json()

    def mine(self, user: UserRecord) -> list[dict[str, Any]]:
        return [r.to_json() for r in self.store.list_budget_requests(user.username)]

    def all(self, admin: UserRecord, status: str | None = None) -> list[dict[str, Any]]:
        require_admin(admin)
        if status is not None and status not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
        return [r.to_json() for r in self.store.list_budget_requests(status=status)]

    def decide(self, admin: UserRecord, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
        require_admin(admin)
        if not (request_id.isascii() and request_id.isdigit() and len(request_id) <= 12):
            raise NotFound(f"no budget request #{request_id[:20]}")
        decision = body.get("decision")
        if decision not in ("approve", "decline"):
            raise BadRequest("'decision' must be 'approve' or 'decline'")
        raise_cap = body.get("raise_cap", False)
        if not isinstance(raise_cap, bool):
            raise BadRequest("'raise_cap' must be true or false")
        epsilon = amount(body, "epsilon") if body.get("epsilon") is not None else None
        delta = amount(body, "delta") if body.get("delta") is not None else None
        return self.store.decide_budget_request(int(request_id), decision == "approve", admin.username, epsilon,
                                                delta, _text(body, "note", ""), raise_cap).to_json()
