"""`configure_hub`: the lomas service in a JupyterHub config (a managed service, roles, scopes, kernel
environment). Plain dictionaries in `c`: nothing of the service is imported."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any
from urllib.parse import urlparse

ADMIN_SCOPE = "custom:lomas:admin"
SERVICE_NAME = "lomas"


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
