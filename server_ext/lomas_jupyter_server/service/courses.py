"""Courses: a class shares one cap per dataset, each student has their own grant; Hub groups are rosters."""

from __future__ import annotations

from typing import Any

from ..errors import BadRequest, NotFound
from ..store import AdminStore, UserRecord
from .admin import amount, require_admin


class CourseService:
    def __init__(self, store: AdminStore) -> None:
        self.store = store

    def courses(self, admin: UserRecord) -> list[dict[str, Any]]:
        require_admin(admin)
        return [c.to_json() for c in self.store.list_courses()]

    def create_course(self, admin: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        require_admin(admin)
        name, group = body.get("name"), body.get("hub_group")
        if not isinstance(name, str) or not isinstance(group, str):
            raise BadRequest("'name' and 'hub_group' (the Hub group of its students) are required")
        return self.store.create_course(name, group, admin.username).to_json()

    def course(self, admin: UserRecord, name: str) -> dict[str, Any]:
        require_admin(admin)
        record = self.store.get_course(name)
        if record is None:
            raise NotFound(f"no course '{name}'")
        return record.to_json()

    def set_course_dataset(self, admin: UserRecord, course: str, body: dict[str, Any]) -> dict[str, Any]:
        require_admin(admin)
        dataset = body.get("dataset")
        if not isinstance(dataset, str):
            raise BadRequest("'dataset' is required")
        amounts = [amount(body, name) for name in ("epsilon_per_student", "delta_per_student", "epsilon_cap",
                                                     "delta_cap")]
        return self.store.set_course_dataset(course, dataset, *amounts, admin.username).to_json()

    def add_course_member(self, admin: UserRecord, course: str, body: dict[str, Any]) -> dict[str, Any]:
        require_admin(admin)
        username = body.get("username")
        if not isinstance(username, str):
            raise BadRequest("'username' is required")
        return self.store.add_course_member(course, username, admin.username).to_json()

    def remove_course_member(self, admin: UserRecord, course: str, username: str) -> dict[str, Any]:
        require_admin(admin)
        return self.store.remove_course_member(course, username, admin.username).to_json()

    def set_course_sharing(self, admin: UserRecord, course: str, body: dict[str, Any]) -> dict[str, Any]:
        """Shared answers on or off: `{"share_answers": true}`."""
        require_admin(admin)
        share = body.get("share_answers")
        if not isinstance(share, bool):
            raise BadRequest("'share_answers' (true or false) is required")
        return self.store.set_course_sharing(course, share, admin.username).to_json()

    def class_spending(self, admin: UserRecord, course: str, dataset: str) -> dict[str, Any]:
        require_admin(admin)
        return self.store.class_spending(course, dataset).to_json()
