"""Hub identities as lomas users: Hub OAuth for browsers, Hub tokens for kernels, the instructor scope, and
Hub groups read fresh as course rosters."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import quote

import tornado.web
from jupyterhub.singleuser.extension import JupyterHubIdentityProvider, JupyterHubUser
from traitlets import Float

from ..errors import Forbidden, LomasError
from ..store import UserRecord
from .config import ADMIN_SCOPE
from .landing import LandingPageHandler


class LomasHubUser(JupyterHubUser):
    """A Hub identity with the lomas user it maps to (resolved once per request), or why it has none."""

    def __init__(self, hub_user: dict[str, Any], lomas_record: UserRecord | None,
                 refusal: LomasError | None = None) -> None:
        super().__init__(hub_user)
        self._lomas_record = lomas_record
        self._refusal = refusal

    @property
    def lomas_record(self) -> UserRecord:
        if self._lomas_record is None:
            raise self._refusal or Forbidden("no lomas user")
        return self._lomas_record


class LomasHubIdentityProvider(JupyterHubIdentityProvider):
    """Hub OAuth (browsers) and Hub tokens (kernels); every request also refreshes the caller's lomas record.

    Group membership is read from the Hub with the service's own token, not from the identity cache (kept up to
    `HubOAuth.cache_max_age`, 5 minutes): by default on every request, so a student removed from a course's
    group loses its budget on the very next query.
    """

    groups_max_age = Float(
        0.0,
        help="Seconds a user's Hub groups, once read, are reused: fewer calls to the Hub under load, at the price "
        "of a student removed from a course's group keeping its budget that long (0: read on every request)",
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._groups: dict[str, tuple[float, list[str]]] = {}

    async def get_user(self, handler: tornado.web.RequestHandler) -> LomasHubUser | None:  # type: ignore[override]
        if hasattr(handler, "_lomas_hub_user"):
            return handler._lomas_hub_user  # type: ignore[attr-defined]
        identity = await super().get_user(handler)
        user = None
        if identity is not None:
            hub_user = identity.hub_user
            groups = await self._fresh_groups(hub_user)
            instructor = bool(self.hub_auth.check_scopes({ADMIN_SCOPE}, hub_user))
            service = handler.settings["lomas_service"]
            try:
                record = await asyncio.to_thread(service.admin.hub_user, hub_user["name"], groups, instructor)
                user = LomasHubUser(hub_user, record)
            except LomasError as refusal:  # an admin removed this user: every handler answers with why
                user = LomasHubUser(hub_user, None, refusal)
        handler._lomas_hub_user = user  # type: ignore[attr-defined]
        return user

    async def _fresh_groups(self, hub_user: dict[str, Any]) -> list[str]:
        name = hub_user["name"]
        cached = self._groups.get(name)
        if cached is not None and time.monotonic() - cached[0] < self.groups_max_age:
            return cached[1]
        groups = await self._hub_groups(hub_user)
        if self.groups_max_age > 0:
            self._groups[name] = (time.monotonic(), groups)
        return groups

    async def _hub_groups(self, hub_user: dict[str, Any]) -> list[str]:
        url = f"{self.hub_auth.api_url}/users/{quote(hub_user['name'], safe='')}"
        try:
            model = await self.hub_auth._api_request("GET", url)  # the service's own token
        except tornado.web.HTTPError:
            self.log.warning("lomas: the Hub refused to list %s's groups (does the service hold "
                             "read:users:groups?); using the cached identity", hub_user["name"])
            return list(hub_user.get("groups") or [])
        return list((model or {}).get("groups") or [])

    async def group_members(self, group: str) -> list[str] | None:
        """The Hub group's users now (the service holds read:groups), or None when the Hub will not say."""
        url = f"{self.hub_auth.api_url}/groups/{quote(group, safe='')}"
        try:
            model = await self.hub_auth._api_request("GET", url)
        except tornado.web.HTTPError:
            return None
        return sorted((model or {}).get("users") or [])

    def service_routes(self, base_url: str) -> list[tuple[Any, ...]]:
        """The only routes of the Hub service besides its API: the OAuth callback and the landing page."""
        prefix = base_url.rstrip("/")
        routes: list[tuple[Any, ...]] = [(prefix + pattern, *rest) for pattern, *rest in self.get_handlers()
                                         if pattern == "/oauth_callback"]
        return [*routes, (prefix + "/?", LandingPageHandler)]
