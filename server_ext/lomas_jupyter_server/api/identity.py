"""Who is calling.

Embedded in a user's own Jupyter server, whoever authenticates to that server is its owner: one stable
username (jupyter_server's default provider would invent a random user per cookie-less token request).
Standalone, each person holds a lomas API token an admin issued; only its hash is stored.
"""

from __future__ import annotations

import asyncio
import re

from jupyter_server.auth.identity import IdentityProvider, User
from tornado import web
from traitlets import default

_AUTHORIZATION = re.compile(r"(?:token|bearer)\s+(\S+)\s*$", re.IGNORECASE)


def header_token(handler: web.RequestHandler) -> str | None:
    """The token in `Authorization: token <t>` (or `Bearer <t>`); never the URL, never a cookie."""
    match = _AUTHORIZATION.match(handler.request.headers.get("Authorization", ""))
    return match.group(1) if match else None


class LomasTokenUser(User):
    """A caller identified by a lomas token (standalone, or on an embedded server: see TokenOverlay)."""

    lomas_username: str = ""


async def _token_user(handler: web.RequestHandler, token: str) -> User | None:
    service = handler.settings.get("lomas_service")
    if service is None:
        return None
    store = service.store
    if getattr(store, "on_network", False):  # every request asks: off the event loop when it may wait
        record = await asyncio.to_thread(store.user_for_token, token)
    else:
        record = store.user_for_token(token)
    if record is None:
        return None
    # A header token cannot be sent by a cross-site form, so XSRF checks do not apply.
    handler._token_authenticated = True  # type: ignore[attr-defined]
    user = LomasTokenUser(username=record.username, name=record.username, display_name=record.username)
    user.lomas_username = record.username
    return user


class TokenOverlay:
    """An embedded server's identity provider, which also accepts lomas tokens on the lomas API: a token issued
    by `lomas-admin` or the sidebar then works where it was issued, as its own user (not as the server's
    owner). Every other caller is left to the server's own provider."""

    def __init__(self, base: IdentityProvider) -> None:
        self._base = base

    def __getattr__(self, name: str) -> object:
        return getattr(self._base, name)

    async def get_user(self, handler: web.RequestHandler) -> User | None:
        token = header_token(handler)
        if token and token.startswith(TOKEN_PREFIX):
            return await _token_user(handler, token)
        user = self._base.get_user(handler)
        return await user if hasattr(user, "__await__") else user  # type: ignore[misc]


TOKEN_PREFIX = "lomas_"  # every lomas token starts so (store.base.new_token); a Jupyter token never does


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
        return await _token_user(handler, token) if token else None

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
