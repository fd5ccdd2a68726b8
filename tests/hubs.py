"""A real JupyterHub on 127.0.0.1 for the tests and the class benchmark: configurable-http-proxy from npm, the
dummy authenticator, single-user servers and the lomas service each as their own OS user.

Run as root (the Hub switches to each user's uid). The OS users are created if missing and removed afterwards
only if this harness created them.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from .servers import BIN, free_port

ROOT = Path(__file__).resolve().parent.parent
PROXY = ROOT / "deploy" / "hub" / "node_modules" / ".bin" / "configurable-http-proxy"
PASSWORD = "class-password"
SERVICE_USER = "ljservice"


def hub_unavailable() -> str | None:
    """Why a real Hub cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "the Hub tests run the service and each student as their own OS user, which needs root"
    if not shutil.which("useradd"):
        return "useradd is missing"
    if not PROXY.exists():
        return "configurable-http-proxy is missing: run `npm ci --prefix deploy/hub` (scripts/test.sh does)"
    return None


def ensure_os_user(name: str, created: list[str]) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
        created.append(name)


@contextmanager
def interpreter_reachable_by_all() -> Iterator[None]:
    """Other OS users must be able to run this venv's interpreter: add search permission (x, not read) to any
    folder above it that lacks it (pyenv under a 0700 /root, say), and take it back afterwards."""
    import sys

    changed: list[tuple[Path, int]] = []
    for folder in Path(os.path.realpath(sys.executable)).parents:
        mode = folder.stat().st_mode
        if not mode & 0o001:
            folder.chmod(mode | 0o001)
            changed.append((folder, mode))
    try:
        yield
    finally:
        for folder, mode in changed:
            folder.chmod(mode)


CONFIG = """
import os, sys
from lomas_jupyter_server.hub import configure_hub

c = get_config()  # noqa: F821
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.ConfigurableHTTPProxy.command = [{proxy!r}]
c.JupyterHub.db_url = "sqlite:///" + {state!r} + "/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = {state!r} + "/cookie_secret"
c.JupyterHub.pid_file = {state!r} + "/jupyterhub.pid"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "localprocess"   # each student's server runs as that student's OS user
c.Spawner.cmd = [{singleuser!r}]
c.Spawner.start_timeout = 300
c.Spawner.http_timeout = 300
c.Spawner.environment = {{"JUPYTER_PREFER_ENV_PATH": "1"}}
c.JupyterHub.load_groups = {{{group!r}: {{"users": []}}}}
# the harness itself: a Hub API client that manages users, groups and tokens
c.JupyterHub.services = [{{"name": "harness", "api_token": {harness_token!r}}}]
c.JupyterHub.load_roles = [{{"name": "harness", "services": ["harness"],
    "scopes": ["admin:users", "admin:groups", "admin:servers", "tokens", "read:users", "access:servers"]}}]
configure_hub(c, storage_dir={storage!r}, url="http://127.0.0.1:{service_port}", os_user={service_user!r},
              instructors=[{instructor!r}], args=["--workers=2", *{service_args!r}])
"""


@dataclass
class Hub:
    url: str  # the proxy: what browsers and kernels reach
    storage: Path  # the lomas service's folder, owned by its OS user
    service_url: str
    harness_token: str
    proc: subprocess.Popen
    log: Path
    tokens: dict[str, str] = field(default_factory=dict)

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"token {self.harness_token}"}
        return requests.request(method, f"{self.url}hub/api/{path}", headers=headers, timeout=60, **kwargs)

    def token(self, user: str) -> str:
        """A Hub API token of `user` with all of the user's scopes (as a student would create on the token page)."""
        if user not in self.tokens:
            self.api("POST", "users", json={"usernames": [user]})  # 409 if it exists: fine
            r = self.api("POST", f"users/{user}/tokens", json={"note": "tests"})
            assert r.status_code == 201, r.text
            self.tokens[user] = r.json()["token"]
        return self.tokens[user]

    def service(self, method: str, path: str, user: str, **kwargs) -> requests.Response:
        """Call the lomas API through the proxy as `user`."""
        headers = {"Authorization": f"token {self.token(user)}"}
        return requests.request(method, f"{self.url}services/lomas/lomas/api/{path}", headers=headers, timeout=120,
                                **kwargs)

    def set_group(self, group: str, add: list[str] = (), remove: list[str] = ()) -> None:
        for user in [*add, *remove]:
            self.token(user)
        if add:
            assert self.api("POST", f"groups/{group}/users", json={"users": list(add)}).ok
        if remove:
            assert self.api("DELETE", f"groups/{group}/users", json={"users": list(remove)}).ok

    def start_server(self, user: str) -> str:
        """Spawn `user`'s single-user server; returns its URL (through the proxy)."""
        self.token(user)
        r = self.api("POST", f"users/{user}/server")
        assert r.status_code in (201, 202, 400), r.text  # 400: already running
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            model = self.api("GET", f"users/{user}").json()
            if model["servers"].get("", {}).get("ready"):
                return f"{self.url}user/{user}/"
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.5)
        raise RuntimeError(f"{user}'s server did not start:\n" + self.log.read_text()[-3000:])


def _descendants(proc: subprocess.Popen, seen: dict[int, float]) -> None:
    """Remember every process the Hub started (the proxy, the service, users' servers), with its start time, so
    they can be stopped by PID even after the Hub itself is gone (a failed start reparents them)."""
    import psutil

    try:
        for child in psutil.Process(proc.pid).children(recursive=True):
            seen[child.pid] = child.create_time()
    except psutil.Error:
        pass


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, path: str, status: int,
                   seen: dict[int, float] | None = None) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if seen is not None:
            _descendants(proc, seen)
        if proc.poll() is not None:
            raise RuntimeError("the Hub stopped:\n" + log.read_text()[-4000:])
        try:
            if requests.get(url + path, timeout=5).status_code == status:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the Hub did not come up:\n" + log.read_text()[-4000:])


@contextmanager
def running_hub(users: list[str], instructor: str, group: str, service_args: tuple[str, ...] = ()) -> Iterator[Hub]:
    """A Hub with the lomas service (as `ljservice`), one course group, and `users` as OS users."""
    created: list[str] = []
    state = Path(tempfile.mkdtemp(prefix="lomas-hub-"))
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, state, ignore_errors=True)
        cleanup.callback(lambda: [subprocess.run(["userdel", "--remove", n], capture_output=True) for n in created])
        for name in [SERVICE_USER, instructor, *users]:
            ensure_os_user(name, created)
        cleanup.enter_context(interpreter_reachable_by_all())
        state.chmod(0o700)  # the Hub's own: its config holds the harness's admin token, its cookie secret
        # the service's folder lives apart: others may only pass through to it, and it is closed to them
        service_root = Path(tempfile.mkdtemp(prefix="lomas-hub-service-"))
        cleanup.callback(shutil.rmtree, service_root, ignore_errors=True)
        service_root.chmod(0o711)
        storage = service_root / "service"
        storage.mkdir(mode=0o700)
        service_user = pwd.getpwnam(SERVICE_USER)
        os.chown(storage, service_user.pw_uid, service_user.pw_gid)
        port, service_port = free_port(), free_port()
        harness_token = uuid.uuid4().hex
        (state / "jupyterhub_config.py").write_text(CONFIG.format(
            port=port, hub_port=free_port(), proxy_api_port=free_port(), proxy=str(PROXY), state=str(state),
            singleuser=str(BIN / "jupyterhub-singleuser"), group=group,
            harness_token=harness_token, storage=str(storage), service_port=service_port,
            service_user=SERVICE_USER, instructor=instructor, service_args=list(service_args)))
        log = state / "hub.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOMAS_", "JUPYTERHUB_", "JPY_"))}
        env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
        with open(log, "w") as out:
            proc = subprocess.Popen([str(BIN / "jupyterhub"), "-f", str(state / "jupyterhub_config.py")],
                                    cwd=state, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        started: dict[int, float] = {}
        cleanup.callback(_stop, proc, started)
        hub = Hub(f"http://127.0.0.1:{port}/", storage, f"http://127.0.0.1:{service_port}/services/lomas/",
                  harness_token, proc, log)
        # the proxy answers before the Hub has added its routes: wait for the Hub's API and the service's 401
        _wait_until_up(hub.url, proc, log, "hub/api/", 200, started)
        _wait_until_up(hub.url, proc, log, "services/lomas/lomas/api/whoami", 401, started)
        yield hub


def _stop(proc: subprocess.Popen, started: dict[int, float]) -> None:
    """SIGTERM: the Hub stops the servers it spawned, the service and the proxy, then exits. Whatever it
    started and left running (a Hub that failed to start leaves its proxy and service behind) is stopped by
    PID, checked against its start time so that a reused PID is never touched."""
    import psutil

    _descendants(proc, started)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    left = []
    for pid, created in started.items():
        try:
            child = psutil.Process(pid)
            if child.create_time() == created:
                left.append(child)
        except psutil.Error:
            continue
    for child in left:
        child.terminate()
    _, alive = psutil.wait_procs(left, timeout=30)
    for child in alive:
        child.kill()


async def _execute(server_url: str, token: str, codes: list[str], timeout: float) -> list[str]:
    """Run cells one by one in a new kernel of a single-user server (REST + websocket); returns each cell's
    text output (stdout, results as text/plain, errors as their last line)."""
    http = AsyncHTTPClient()
    headers = {"Authorization": f"token {token}"}
    path = f"test-{uuid.uuid4().hex[:8]}.ipynb"
    r = await http.fetch(f"{server_url}api/sessions", method="POST", headers=headers, request_timeout=timeout,
                         body=json.dumps({"path": path, "name": path, "type": "notebook",
                                          "kernel": {"name": "python3"}}))
    kernel_id = json.loads(r.body)["kernel"]["id"]
    ws = await websocket_connect(HTTPRequest(f"{server_url.replace('http', 'ws', 1)}api/kernels/{kernel_id}/channels",
                                             headers=headers, request_timeout=timeout))
    outputs = []
    try:
        for code in codes:
            msg_id = uuid.uuid4().hex
            ws.write_message(json.dumps({
                "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex,
                           "msg_type": "execute_request", "version": "5.3"},
                "parent_header": {}, "metadata": {}, "channel": "shell",
                "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                            "allow_stdin": False}}))
            out: list[str] = []
            while True:
                raw = await asyncio.wait_for(ws.read_message(), timeout)
                if raw is None:
                    raise RuntimeError("the kernel's websocket closed")
                msg = json.loads(raw)
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind = msg["msg_type"]
                if kind == "stream":
                    out.append(msg["content"]["text"])
                elif kind == "error":
                    out.append(f"ERROR {msg['content']['ename']}: {msg['content']['evalue']}")
                elif kind in ("execute_result", "display_data"):
                    out.append(msg["content"]["data"].get("text/plain", ""))
                elif kind == "status" and msg["content"]["execution_state"] == "idle":
                    break
            outputs.append("\n".join(out))
    finally:
        ws.close()
        await http.fetch(f"{server_url}api/sessions", method="GET", headers=headers)
        await http.fetch(f"{server_url}api/kernels/{kernel_id}", method="DELETE", headers=headers)
    return outputs


def run_cells(server_url: str, token: str, codes: list[str], timeout: float = 300) -> list[str]:
    return asyncio.run(_execute(server_url, token, codes, timeout))
