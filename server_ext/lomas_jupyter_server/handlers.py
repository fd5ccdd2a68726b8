"""Thin REST handlers: parse JSON, find the caller, call the service, write JSON.

Every verb is authenticated (`@tornado.web.authenticated`) and authorized (`@authorized` on `auth_resource`).
"""

from __future__ import annotations

import json
from typing import Any

import tornado.web
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin

from .errors import BadRequest, LomasError
from .service import DPService
from .store import UserRecord

MAX_BODY_BYTES = 200 * 1024 * 1024
MAX_JSON_DEPTH = 16  # the deepest valid request (bounds: {col: [lo, hi]}) is 3


def json_depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value, without recursion (a hostile body must not exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                return depth
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def invalid_text_field(value: Any) -> str | None:
    """The name of the first field (or key) whose text is not valid Unicode (a lone UTF-16 surrogate, which
    JSON's \\u escapes allow but no store or encoder can hold), or None."""
    stack: list[tuple[Any, str]] = [(value, "body")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(item, dict):
            for key, child in item.items():
                stack.append((key, "a field name"))
                stack.append((child, f"'{key}'" if where == "body" else where))
        elif isinstance(item, list):
            stack.extend((child, where) for child in item)
    return None


class Unauthorized(tornado.web.HTTPError):
    def __init__(self) -> None:
        super().__init__(401)


class LomasHandler(ExtensionHandlerMixin, APIHandler):
    auth_resource = "lomas"

    @property
    def service(self) -> DPService:
        return self.settings["lomas_service"]

    @property
    def lomas_user(self) -> UserRecord:
        return self.extensionapp.resolve_user(self.current_user)

    def json_body(self) -> dict[str, Any]:
        raw = self.request.body or b"{}"
        if len(raw) > MAX_BODY_BYTES:
            raise BadRequest("the request body is too large")
        try:
            body = json.loads(raw)
        except RecursionError:
            raise BadRequest(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        if json_depth(body) > MAX_JSON_DEPTH:
            raise BadRequest(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")
        field = invalid_text_field(body)
        if field is not None:
            # "'sql'" names a top-level field; a nested one is named by the top-level field that holds it
            raise BadRequest(f"{field} is not valid text: it holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
        return body

    async def with_hub_roster(self, course: dict[str, Any]) -> dict[str, Any]:
        """Under JupyterHub, a course also lists who is in its Hub group but has not used the service yet (they
        join, and get their grants, on their first request)."""
        members_of = getattr(self.identity_provider, "group_members", None)
        if members_of is None:
            return course
        in_group = await members_of(course["hub_group"])
        if in_group is None:
            return course
        return course | {"waiting": [u for u in in_group if u not in course["members"]]}

    def reply(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(payload))

    def int_argument(self, name: str, default: int) -> int:
        raw = self.get_argument(name, str(default))
        if not raw.isdigit() or not 1 <= int(raw) <= 10_000:
            raise BadRequest(f"'{name}' must be a whole number from 1 to 10000")
        return int(raw)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, LomasError):
            payload = exc.to_json()
        elif isinstance(exc, Unauthorized):
            mode = self.extensionapp.effective_identity_mode
            if mode == "token":
                how = "send your lomas token in the header 'Authorization: token <token>'"
            elif mode == "hub":
                how = "sign in to JupyterHub, or send a Hub API token in the header 'Authorization: token <token>'"
            else:
                how = "log in to this Jupyter server or send its token"
            payload = {"error": "unauthorized", "message": f"authentication required: {how}"}
            self.set_header("WWW-Authenticate", 'token realm="lomas"')
        elif isinstance(exc, tornado.web.HTTPError):
            if exc.log_message:
                message = exc.log_message % exc.args if exc.args else exc.log_message
            else:
                message = exc.reason or tornado.httputil.responses.get(status_code, "error")
            payload = {"error": "http_error", "message": message}
        elif status_code >= 500:
            payload = {"error": "internal", "message": "internal error in the DP service; nothing was charged"}
        else:
            payload = {"error": "http_error", "message": self._reason}
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(payload))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, LomasError):
            self.log.info("lomas: %s %s -> %s %s", self.request.method, self.request.path, value.status, value.code)
            return
        super().log_exception(typ, value, tb)

    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, LomasError):
            status_code = exc.status
        elif status_code == 403 and getattr(self, "_jupyter_current_user", None) is None:
            # nobody was identified (no token, a wrong or revoked one, an XSRF refusal of a cookie-less call):
            # that is "who are you?", not "you may not"
            status_code = 401
            kwargs["exc_info"] = (Unauthorized, Unauthorized(), None)
        super().send_error(status_code, **kwargs)


class WhoAmIHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.reply(self.lomas_user.to_json())


class DatasetsHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.reply(self.service.list_datasets(self.lomas_user))


class DatasetHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self, name: str) -> None:
        self.lomas_user  # noqa: B018  (registers the caller)
        self.reply(self.service.describe(name))


class QueryHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    async def post(self) -> None:
        self.reply(await self.service.query(self.lomas_user, self.json_body()), 201)


class PreviewHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    async def post(self) -> None:
        self.reply(await self.service.preview(self.lomas_user, self.json_body()))


class DummyQueryHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    async def post(self) -> None:
        self.reply(await self.service.dummy_query(self.lomas_user, self.json_body()))


class DummyRowsHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self, name: str) -> None:
        self.lomas_user  # noqa: B018  (registers the caller)
        self.reply(self.service.dummy_rows(name, self.int_argument("rows", 100)))


class BudgetsHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.reply(self.service.budgets(self.lomas_user))


class BudgetHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self, dataset: str) -> None:
        self.reply(self.service.budget(self.lomas_user, dataset))


class ArchiveHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        dataset = self.get_argument("dataset", None)
        self.reply(self.service.archive(self.lomas_user, dataset, self.int_argument("limit", 200)))


# --- admin ------------------------------------------------------------------------------------------------


class AdminUsersHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.service.require_admin(self.lomas_user)
        self.reply([u.to_json() for u in self.service.store.list_users()])

    @tornado.web.authenticated
    @authorized
    def post(self) -> None:
        self.reply(self.service.create_user(self.lomas_user, self.json_body()), 201)


class AdminUserHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def patch(self, username: str) -> None:
        self.reply(self.service.set_role(self.lomas_user, username, self.json_body()))

    @tornado.web.authenticated
    @authorized
    def delete(self, username: str) -> None:
        self.reply(self.service.remove_user(self.lomas_user, username))


class AdminTokensHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def post(self, username: str) -> None:
        self.reply(self.service.issue_token(self.lomas_user, username, self.json_body()), 201)

    @tornado.web.authenticated
    @authorized
    def delete(self, username: str) -> None:
        self.reply(self.service.revoke_tokens(self.lomas_user, username))


class AdminDatasetsHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.service.require_admin(self.lomas_user)
        self.reply([d.to_public_json() for d in self.service.store.list_datasets()])

    @tornado.web.authenticated
    @authorized
    async def post(self) -> None:
        self.reply(await self.service.import_dataset(self.lomas_user, self.json_body()), 201)


class AdminDatasetDraftHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    async def post(self) -> None:
        self.reply(await self.service.draft_metadata(self.lomas_user, self.json_body()))


class AdminUploadsHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def post(self) -> None:
        self.reply(self.service.create_upload(self.lomas_user, self.json_body()), 201)


class AdminUploadHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self, upload: str) -> None:
        self.reply(self.service.upload_status(self.lomas_user, upload))

    @tornado.web.authenticated
    @authorized
    def put(self, upload: str) -> None:
        """One chunk, as the raw request body, at byte `offset` of the file."""
        self.service.require_admin(self.lomas_user)  # an analyst learns nothing, not even what a bad offset is
        raw = self.get_argument("offset", "")
        if not raw.isdigit() or len(raw) > 15:
            raise BadRequest("'offset' must be the chunk's position in the file, in bytes")
        self.reply(self.service.upload_chunk(self.lomas_user, upload, int(raw), self.request.body or b""))

    @tornado.web.authenticated
    @authorized
    def delete(self, upload: str) -> None:
        self.reply(self.service.discard_upload(self.lomas_user, upload))


class AdminGrantsHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.service.require_admin(self.lomas_user)
        username = self.get_argument("username", None)
        self.reply([g.to_json() for g in self.service.store.list_grants(username)])

    @tornado.web.authenticated
    @authorized
    def put(self) -> None:
        self.reply(self.service.set_grant(self.lomas_user, self.json_body()))


class AdminArchiveHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.service.require_admin(self.lomas_user)
        releases = self.service.store.list_releases(
            self.get_argument("username", None), self.get_argument("dataset", None), self.int_argument("limit", 200)
        )
        self.reply([r.to_json() for r in releases])


class AdminLedgerHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.service.require_admin(self.lomas_user)
        self.reply(self.service.store.ledger(self.get_argument("username", None), self.int_argument("limit", 500)))


class AdminAuditHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.service.require_admin(self.lomas_user)
        self.reply([a.to_json() for a in self.service.store.audit(self.int_argument("limit", 200))])


class AdminCoursesHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    async def get(self) -> None:
        self.service.require_admin(self.lomas_user)
        self.reply([await self.with_hub_roster(c.to_json()) for c in self.service.store.list_courses()])

    @tornado.web.authenticated
    @authorized
    def post(self) -> None:
        self.reply(self.service.create_course(self.lomas_user, self.json_body()), 201)


class AdminCourseHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    async def get(self, course: str) -> None:
        self.reply(await self.with_hub_roster(self.service.course(self.lomas_user, course)))


class AdminCourseDatasetsHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def put(self, course: str) -> None:
        self.reply(self.service.set_course_dataset(self.lomas_user, course, self.json_body()))


class AdminCourseMembersHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def post(self, course: str) -> None:
        self.reply(self.service.add_course_member(self.lomas_user, course, self.json_body()))


class AdminCourseMemberHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def delete(self, course: str, username: str) -> None:
        self.reply(self.service.remove_course_member(self.lomas_user, course, username))


class AdminCourseSpendingHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self, course: str, dataset: str) -> None:
        self.reply(self.service.class_spending(self.lomas_user, course, dataset))


NAME = r"(?P<{}>[^/]+)"
ROUTES: list[tuple[str, type[LomasHandler]]] = [
    ("whoami", WhoAmIHandler),
    ("datasets", DatasetsHandler),
    ("datasets/" + NAME.format("name"), DatasetHandler),
    ("datasets/" + NAME.format("name") + "/dummy", DummyRowsHandler),
    ("query", QueryHandler),
    ("dummy", DummyQueryHandler),
    ("preview", PreviewHandler),
    ("budget", BudgetsHandler),
    ("budget/" + NAME.format("dataset"), BudgetHandler),
    ("archive", ArchiveHandler),
    ("admin/users", AdminUsersHandler),
    ("admin/users/" + NAME.format("username"), AdminUserHandler),
    ("admin/users/" + NAME.format("username") + "/tokens", AdminTokensHandler),
    ("admin/datasets", AdminDatasetsHandler),
    ("admin/datasets/draft", AdminDatasetDraftHandler),
    ("admin/uploads", AdminUploadsHandler),
    ("admin/uploads/" + NAME.format("upload"), AdminUploadHandler),
    ("admin/grants", AdminGrantsHandler),
    ("admin/archive", AdminArchiveHandler),
    ("admin/ledger", AdminLedgerHandler),
    ("admin/audit", AdminAuditHandler),
    ("admin/courses", AdminCoursesHandler),
    ("admin/courses/" + NAME.format("course"), AdminCourseHandler),
    ("admin/courses/" + NAME.format("course") + "/datasets", AdminCourseDatasetsHandler),
    ("admin/courses/" + NAME.format("course") + "/members", AdminCourseMembersHandler),
    ("admin/courses/" + NAME.format("course") + "/members/" + NAME.format("username"), AdminCourseMemberHandler),
    ("admin/courses/" + NAME.format("course") + "/spending/" + NAME.format("dataset"), AdminCourseSpendingHandler),
]
API_PREFIX = "lomas/api/"
