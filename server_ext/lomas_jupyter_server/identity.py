"""Who is calling.

Embedded in a user's own Jupyter server, whoever authenticates to that server is its owner: one stable
username (jupyter_server's default provider would invent a random user per cookie-less token request).
Standalone, each person holds a lomas API token an admin issued; only its hash is stored.
"""

from __future__ import annotations

from jupyter_server.auth.identity import IdentityProvider, User
from tornado import web


class LomasTokenIdentityProvider(IdentityProvider):
    """Authenticates `Authorization: token <lomas token>` against the admin store."""

    async def get_user_token(self, handler: web.RequestHandler) -> User | None:
        token = self.get_token(handler)
        service = handler.settings.get("lomas_service")
        if not token or service is None:
            return None
        record = service.store.user_for_token(token)
        if record is None:
            return None
        return User(username=record.username, name=record.username, display_name=record.username)

    @property
    def auth_enabled(self) -> bool:
        return True
