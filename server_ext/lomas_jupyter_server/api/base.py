"""The base of every REST handler: JSON in and out, the caller, errors as JSON naming the problem.

Every verb is authenticated (`@tornado.web.authenticated`) and authorized (`@authorized` on `auth_resource`).
"""

from __future__ import annotations

import json
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin

from ..errors import BadRequest, LomasError
from ..service import DPService
from ..store import UserRecord
from .identity import TokenOverlay

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
    def identity_provider(self) -> Any:  # type: ignore[override]
        """Embedded: the server's own provider, which also takes lomas tokens on this API (TokenOverlay)."""
        base = super().identity_provider
        if self.extensionapp.effective_identity_mode == "local":
            return TokenOverlay(base)
        return base

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
        # send_error() cleared the headers: without CORS again, a browser on another origin (the sidebar of a
        # remote service) reads every error as "cannot be reached" instead of its message
        self.set_cors_headers()
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, LomasError):
            payload = exc.to_json()
        elif isinstance(exc, Unauthorized):
            mode = self.extensionapp.effective_identity_mode
            sent = self.request.headers.get("Authorization", "").strip()
            if sent.lower().startswith(("token ", "bearer ")) and len(sent.split(None, 1)) == 2:
                how = ("the token sent is not valid here (unknown, revoked, or issued by another service); "
                       "ask an admin for a new one")
                if mode == "local":
                    how += ", or log in to this Jupyter server"
            elif mode == "token":
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
