"""Who is calling.

Embedded in a user's own Jupyter server, whoever authenticates to that server is its owner: one stable
username (jupyter_server's default provider would invent a random user per cookie-less token request).
Standalone, each person holds a lomas API token an admin issued; only its hash is stored.
"""

from __future__ import annotations

import re

from jupyter_server.auth.identity import IdentityProvider, User
from tornado import web
from traitlets import default

_AUTHORIZATION = re.compile(r"(?:token|bearer)\s+(\S+)\s*$", re.IGNORECASE)


def header_token(handler: web.RequestHandler) -> str | None:
    """The token in `Authorization: token <t>` (or `Bearer <t>`); never the URL, never a cookie."""
    match = _AUTHORIZATION.match(handler.request.headers.get("Authorization", ""))
    return match.group(1) if match else None


class LomasTokenIdentityProvider(IdentityProvider):
    """Authenticates `Authorization: token <lomas token>` against the admin store, on every request.

    Nothing else identifies a caller: no login cookie is ever set or read, tokens in the query string are
    ignored, and there is no login page. Revoking a token, removing a user or changing a role therefore takes
    effect on the very next request.
    """

    need_token = False  # the Jupyter server token does not exist here: lomas tokens replace it

    @default("token")
    def _token_default(self) -> str:
        self.token_generated = False
        return ""

    async def get_user(self, handler: web.RequestHandler) -> User | None:  # type: ignore[override]
        token = header_token(handler)
        service = handler.settings.get("lomas_service")
        if not token or service is None:
            return None
        record = service.store.user_for_token(token)
        if record is None:
            return None
        # A header token cannot be sent by a cross-site form, so XSRF checks do not apply.
        handler._token_authenticated = True  # type: ignore[attr-defined]
        return User(username=record.username, name=record.username, display_name=record.username)

    def get_handlers(self) -> list[tuple[str, object]]:
        return []  # no /login, no /logout

    def set_login_cookie(self, handler: web.RequestHandler, user: User) -> None:
        return None

    def get_user_cookie(self, handler: web.RequestHandler) -> None:  # type: ignore[override]
        return None

    @property
    def auth_enabled(self) -> bool:
        return True

    @property
    def login_available(self) -> bool:
        return False

    @property
    def logout_available(self) -> bool:
        return False
