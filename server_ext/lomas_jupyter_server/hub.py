"""The DP service as a JupyterHub managed service: Hub identities, the instructor scope, and the Hub config.

Under a Hub the service is the class's trust boundary: its own process (and, in production, its own OS user)
holding the data and the ledger. Browsers sign in through Hub OAuth; kernels send their server's
`$JUPYTERHUB_API_TOKEN`. A Hub user becomes a lomas analyst on first use; Hub groups are course rosters;
holders of the `custom:lomas:admin` scope (instructors) act as admins.
"""

from __future__ import annotations

import asyncio
import html
import os
import shutil
import sys
import time
from typing import Any
from urllib.parse import quote, urlparse

import tornado.web
from jupyter_server.base.handlers import JupyterHandler
from jupyterhub.singleuser.extension import JupyterHubIdentityProvider, JupyterHubUser
from traitlets import Float

from .errors import Forbidden, LomasError
from .store import UserRecord

ADMIN_SCOPE = "custom:lomas:admin"
SERVICE_NAME = "lomas"


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
                record = await asyncio.to_thread(service.hub_user, hub_user["name"], groups, instructor)
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


class LandingPageHandler(JupyterHandler):
    """What a browser sees at the service's URL (the Hub's Services menu links here). A page, not an API: an
    unauthenticated visit is redirected through Hub OAuth, which an API handler would refuse with 403."""

    auth_resource = "lomas"

    @tornado.web.authenticated
    def get(self) -> None:
        user: LomasHubUser = self.current_user
        service = self.settings["lomas_service"]
        try:
            record = user.lomas_record
        except LomasError as refusal:
            self.set_status(refusal.status)
            self.finish(f"<!doctype html><title>lomas DP service</title><p>{html.escape(refusal.message)}</p>")
            return
        rows = "".join(
            f"<tr><td>{html.escape(b['dataset'])}</td><td>{b['epsilon_remaining']:.4g}</td>"
            f"<td>{b['epsilon_spent']:.4g}</td><td>{b['releases']}</td></tr>"
            for b in service.budgets(record)
        )
        table = (f"<table><tr><th>dataset</th><th>ε left</th><th>ε spent</th><th>releases</th></tr>{rows}</table>"
                 if rows else "<p>You have no budget yet; your instructor grants it through your course.</p>")
        role = "instructor (admin)" if record.role == "admin" else "student (analyst)"
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(
            "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>lomas DP service</title>"
            "<style>body{font:15px/1.5 system-ui,sans-serif;max-width:44em;margin:2em auto;color:#1a1a1a}"
            "td,th{padding:.2em .8em;text-align:left}code{background:#eee;padding:0 .2em}</style></head><body>"
            f"<h1>lomas DP service</h1><p>Signed in as <b>{html.escape(record.username)}</b>, {role}.</p>"
            f"{table}<p>Ask questions from a notebook: <code>%load_ext lomas_jupyter</code>, then a "
            "<code>%%dpquery</code> cell.</p></body></html>"
        )


def main() -> None:
    """`lomas-hub-service`: the command a Hub runs. The Hub's environment says where to listen."""
    from .app import LomasApp

    os.umask(0o077)  # the store, the parquet copies and the logs are the service user's alone
    url = urlparse(os.environ["JUPYTERHUB_SERVICE_URL"])
    argv = [
        f"--ServerApp.ip={url.hostname}",
        f"--ServerApp.port={url.port}",
        f"--ServerApp.base_url={os.environ['JUPYTERHUB_SERVICE_PREFIX']}",
        "--ServerApp.identity_provider_class=lomas_jupyter_server.hub.LomasHubIdentityProvider",
        "--LomasApp.identity_mode=hub",
    ]
    if os.geteuid() == 0:
        argv.append("--ServerApp.allow_root=True")  # discouraged: run the service as its own OS user
    LomasApp.launch_instance(argv=argv + sys.argv[1:])


def configure_hub(
    c: Any,
    *,
    storage_dir: str = "",
    url: str = "http://127.0.0.1:10101",
    os_user: str | None = None,
    instructors: list[str] | tuple[str, ...] = (),
    instructor_groups: list[str] | tuple[str, ...] = (),
    kernel_url: str | None = None,
    args: list[str] | tuple[str, ...] = (),
    name: str = SERVICE_NAME,
    external_api_token: str | None = None,
    start_timeout: int = 120,
) -> None:
    """Add the lomas DP service to a JupyterHub config (`c`, in `jupyterhub_config.py`).

    - a managed service `name` at `url`, run as `os_user` when given (the Hub must then run as root);
    - every Hub user may reach it; `instructors` and members of `instructor_groups` get `custom:lomas:admin`;
    - the service may read Hub users' groups (course rosters);
    - single-user servers get `LOMAS_URL` (`kernel_url`, default the service's own URL) and a
      `$JUPYTERHUB_API_TOKEN` that may reach the service, so `%%dpquery` works with no setup. They run no DP
      service of their own.

    With `external_api_token`, the Hub does not start the service: it runs elsewhere (its own container, say)
    with that token and the `JUPYTERHUB_*` variables set by hand.

    `start_timeout`: seconds the Hub waits for the service to answer at start-up (the Hub's own default, 30 s,
    is too short on a busy machine, where importing Jupyter Server and OpenDP alone can take that long).
    """
    if not storage_dir and not external_api_token:
        raise ValueError("configure_hub: give storage_dir, the service's own folder (or external_api_token)")
    access = f"access:services!service={name}"
    command = shutil.which("lomas-hub-service") or os.path.join(os.path.dirname(sys.executable), "lomas-hub-service")
    service: dict[str, Any] = {
        "name": name,
        "url": url,
        "oauth_no_confirm": True,
        "oauth_client_allowed_scopes": [ADMIN_SCOPE],  # a browser session carries the instructor scope, if held
        "display": True,
        "timeout": start_timeout,
    }
    if external_api_token:
        service["api_token"] = external_api_token
    else:
        service["command"] = [command, f"--storage-dir={storage_dir}", *args]
        # its own folder as working directory: the Hub's may be closed to the service's OS user, and workers
        # start in the service's working directory
        service["cwd"] = storage_dir
        if os_user:
            service["user"] = os_user
    c.JupyterHub.services = [*_existing(c.JupyterHub, "services", []), service]
    c.JupyterHub.custom_scopes = {
        **_existing(c.JupyterHub, "custom_scopes", {}),
        ADMIN_SCOPE: {"description": "Administer the lomas DP service: courses, datasets, grants, spending"},
    }
    roles = [dict(r) for r in _existing(c.JupyterHub, "load_roles", [])]
    user_role = next((r for r in roles if r.get("name") == "user"), None)
    if user_role is None:
        roles.append({"name": "user", "scopes": ["self", access]})
    else:
        user_role["scopes"] = [*user_role.get("scopes", ["self"]), access]
    roles.append({"name": f"{name}-instructor", "description": "Teaches with the lomas DP service",
                  "scopes": [ADMIN_SCOPE, access], "users": list(instructors), "groups": list(instructor_groups)})
    roles.append({"name": f"{name}-service", "description": "The lomas DP service reads course rosters",
                  "scopes": ["read:users:name", "read:users:groups", "read:groups"], "services": [name]})
    c.JupyterHub.load_roles = roles
    token_scopes = list(_existing(c.Spawner, "server_token_scopes", ["users:activity!user", "access:servers!server"]))
    c.Spawner.server_token_scopes = [*token_scopes, access, ADMIN_SCOPE]  # the Hub keeps only what a user holds
    parsed = urlparse(url)
    default_kernel_url = f"{parsed.scheme}://{parsed.netloc}/services/{name}/"
    c.Spawner.environment = {**_existing(c.Spawner, "environment", {}), "LOMAS_URL": kernel_url or default_kernel_url}


def _existing(section: Any, key: str, default: Any) -> Any:
    """A value already set in a traitlets config section (which otherwise answers with a lazy placeholder)."""
    return section[key] if key in section else default
