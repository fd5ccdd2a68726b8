"""configure_hub() on a plain traitlets Config: what a Hub admin pastes must merge with what they have."""

from __future__ import annotations

import pytest
from traitlets.config import Config

from lomas_jupyter_server.hub import ADMIN_SCOPE, configure_hub


def test_configure_hub_adds_the_service_roles_scopes_and_kernel_environment() -> None:
    c = Config()
    c.JupyterHub.services = [{"name": "other", "api_token": "x"}]
    c.JupyterHub.load_roles = [{"name": "user", "scopes": ["self", "access:services!service=other"]}]
    c.Spawner.environment = {"TZ": "UTC"}
    configure_hub(c, storage_dir="/srv/lomas", os_user="lomas", instructors=["prof"], instructor_groups=["teachers"])
    other, lomas = c.JupyterHub.services
    assert other["name"] == "other" and lomas["name"] == "lomas" and lomas["user"] == "lomas"
    assert lomas["command"][0].endswith("lomas-hub-service") and "--storage-dir=/srv/lomas" in lomas["command"]
    assert lomas["oauth_client_allowed_scopes"] == [ADMIN_SCOPE]
    assert lomas["timeout"] == 120  # issue 17.9: a start-up allowance for a busy machine (the Hub's own is 30 s)
    assert ADMIN_SCOPE in c.JupyterHub.custom_scopes
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    assert roles["user"]["scopes"] == ["self", "access:services!service=other", "access:services!service=lomas"]
    assert roles["lomas-instructor"]["users"] == ["prof"] and roles["lomas-instructor"]["groups"] == ["teachers"]
    assert ADMIN_SCOPE in roles["lomas-instructor"]["scopes"]
    assert roles["lomas-service"]["services"] == ["lomas"] and "read:users:groups" in roles["lomas-service"]["scopes"]
    assert set(c.Spawner.server_token_scopes) >= {"users:activity!user", "access:services!service=lomas", ADMIN_SCOPE}
    assert c.Spawner.environment == {"TZ": "UTC", "LOMAS_URL": "http://127.0.0.1:10101/services/lomas/"}


def test_an_external_service_has_a_token_and_no_command() -> None:
    c = Config()
    configure_hub(c, url="http://lomas:10101", external_api_token="secret", kernel_url="http://proxy-public/services/lomas/")
    (lomas,) = c.JupyterHub.services
    assert lomas["api_token"] == "secret" and "command" not in lomas and "user" not in lomas
    assert c.Spawner.environment["LOMAS_URL"] == "http://proxy-public/services/lomas/"
    with pytest.raises(ValueError, match="storage_dir"):
        configure_hub(Config())


def test_hub_groups_are_reused_only_for_groups_max_age() -> None:
    """The Hub lookup itself is exercised in test_hub.py; here only the reuse rule, with a stand-in lookup."""
    import asyncio

    from lomas_jupyter_server.hub import LomasHubIdentityProvider

    lookups: list[str] = []

    async def lookup(hub_user: dict) -> list[str]:
        lookups.append(hub_user["name"])
        return [f"group-{len(lookups)}"]

    fresh = LomasHubIdentityProvider()
    fresh._hub_groups = lookup  # type: ignore[method-assign]
    assert asyncio.run(fresh._fresh_groups({"name": "ann"})) == ["group-1"]
    assert asyncio.run(fresh._fresh_groups({"name": "ann"})) == ["group-2"]  # default: read on every request
    reused = LomasHubIdentityProvider(groups_max_age=3600)
    reused._hub_groups = lookup  # type: ignore[method-assign]
    assert asyncio.run(reused._fresh_groups({"name": "ann"})) == ["group-3"]
    assert asyncio.run(reused._fresh_groups({"name": "ann"})) == ["group-3"]
    assert asyncio.run(reused._fresh_groups({"name": "bob"})) == ["group-4"]
    assert lookups == ["ann", "ann", "ann", "bob"]


def test_the_example_hub_config_loads_and_adds_the_service(tmp_path) -> None:
    """Issue 24.12: the README's complete example jupyterhub_config.py is a real config (loaded here as the Hub
    loads it, with its folders redirected)."""
    from pathlib import Path

    from traitlets.config import PyFileConfigLoader

    source = (Path(__file__).resolve().parents[1] / "deploy" / "hub" / "jupyterhub_config.py").read_text()
    copy = tmp_path / "jupyterhub_config.py"
    copy.write_text(source.replace("/srv/jupyterhub", str(tmp_path / "hub")))
    c = PyFileConfigLoader(copy.name, str(tmp_path)).load_config()
    assert c.JupyterHub.authenticator_class == "dummy" and c.JupyterHub.spawner_class == "localprocess"
    (service,) = [s for s in c.JupyterHub.services if s["name"] == "lomas"]
    assert service["user"] == "lomas" and "--storage-dir=/srv/lomas" in service["command"]
    assert c.ConfigurableHTTPProxy.command[0].endswith("node_modules/.bin/configurable-http-proxy")


def test_the_hub_service_does_not_outlive_its_hub(tmp_path) -> None:
    """Issue 24.6: after a failed Hub start the service kept running for an hour. lomas-hub-service asks Linux
    for SIGTERM when its parent (the Hub) dies: here a stand-in Hub starts it and is killed."""
    import os
    import subprocess
    import sys
    import time

    service = ("from lomas_jupyter_server.app import _stop_with_the_hub\n_stop_with_the_hub()\n"
               "import time\nprint('up', flush=True)\ntime.sleep(600)\n")
    hub = ("import subprocess, sys, os\n"
           f"p = subprocess.Popen([sys.executable, '-c', {service!r}], stdout=subprocess.PIPE, text=True)\n"
           "assert p.stdout.readline().strip() == 'up'\nprint(p.pid, flush=True)\nos._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", hub], capture_output=True, text=True, check=True, timeout=120)
    pid = int(out.stdout.strip())
    for _ in range(600):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    raise AssertionError("the service outlived its Hub")
