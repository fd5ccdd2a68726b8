"""The standalone service as an attacker meets it: a real `jupyter lomas` process, real tokens, real files.

Each test is one finding of the trust-boundary review, tried the way it was found."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from lomas_jupyter_server.api import ROUTES

from .servers import add_analyst, free_port, lomas_admin, running_server, tree_rss_mb

WIDE_CATEGORIES = [f"c{i}" for i in range(1000)]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("attack")
    storage = root / "store"  # under the server's root folder, as in the finding
    (root / "secret.txt").write_text("the server's own secret\n")
    lomas_admin(storage, "demo", "--user", "boss")
    # a dataset whose public key product is 10^9: three columns with 1,000 public categories each
    (root / "wide.csv").write_text("a,b,c\n" + "".join(f"c{i},c{i},c{i}\n" for i in range(5)))
    metadata = {"privacy_unit": 1, "max_rows": 100,
                "columns": {k: {"type": "string", "categories": WIDE_CATEGORIES} for k in "abc"}}
    (root / "wide.json").write_text(json.dumps(metadata))
    lomas_admin(storage, "dataset", "import", "wide", str(root / "wide.csv"), "--metadata", str(root / "wide.json"))
    tokens = {"boss": lomas_admin(storage, "token", "issue", "boss"),
              "alice": add_analyst(storage, "alice", {"penguins": 5, "wide": 5}),
              **{name: add_analyst(storage, name, {"penguins": 5}) for name in ("carol", "dave")}}
    env = {"JUPYTER_CONFIG_DIR": str(root / "config"), "JUPYTER_DATA_DIR": str(root / "data")}
    args = [f"--LomasApp.storage_dir={storage}", "--LomasApp.workers=1", f"--ServerApp.root_dir={root}",
            "--LomasServiceServerApp.max_connections=40"]
    with running_server("jupyter-lomas", args, root, env) as (url, pid):
        yield {"url": url, "pid": pid, "root": root, "storage": storage, "tokens": tokens,
               "log": root / "jupyter-lomas.log"}


def call(service: dict, method: str, path: str, user: str | None = "alice", **kwargs: object) -> requests.Response:
    headers = dict(kwargs.pop("headers", {}) or {})  # type: ignore[arg-type]
    if user is not None:
        headers["Authorization"] = f"token {service['tokens'][user]}"
    return requests.request(method, f"{service['url']}{path}", headers=headers, timeout=60, **kwargs)  # type: ignore[arg-type]


def test_raw_files_the_store_and_jupyter_routes_are_not_served(service: dict) -> None:
    parquet = next(Path(service["storage"]).glob("datasets/penguins/*.parquet")).relative_to(service["root"])
    paths = ["files/secret.txt", "files/store/lomas.sqlite3", f"files/{parquet}", "api", "api/status", "api/me",
             "api/spec.yaml", "api/contents", "api/kernels", "api/sessions", "api/terminals", "metrics", "login",
             "logout", "lab", "tree", "static/style/index.css", "custom/custom.css", "favicon.ico", "",
             "view/secret.txt", "nbconvert/html/secret.txt", "lomas/api", "lomas/api/../../files/secret.txt"]
    for user in ("alice", "boss", None):
        for path in paths:
            for method in ("GET", "POST"):
                response = call(service, method, path, user, data=b"password=x&_xsrf=y")
                assert response.status_code == 404, (user, method, path, response.status_code)
                assert response.json()["error"] == "not_found"
                assert b"secret" not in response.content and b"SQLite" not in response.content
                assert "set-cookie" not in {k.lower() for k in response.headers}


def test_the_server_registers_no_route_outside_the_allowlist(tmp_path: Path) -> None:
    """Every handler the standalone server registers, read from its router, against an explicit allowlist."""
    script = (
        "import json, os, sys\n"
        "from lomas_jupyter_server.app import LomasApp\n"
        "server = LomasApp.initialize_server(argv=sys.argv[1:])\n"
        "def walk(router):\n"
        "    for rule in router.rules:\n"
        "        if hasattr(rule.target, 'rules'):\n"
        "            yield from walk(rule.target)\n"
        "        else:\n"
        "            yield [rule.matcher.regex.pattern, rule.target.__module__ + '.' + rule.target.__qualname__]\n"
        "print(json.dumps(list(walk(server.web_app.default_router))))\n"
        "sys.stdout.flush()\n"
        "os._exit(0)\n"
    )
    argv = [sys.executable, "-c", script, "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={free_port()}",
            f"--LomasApp.storage_dir={tmp_path / 'store'}", "--LomasApp.workers=1", "--ServerApp.base_url=/dp/"]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "c"), "JUPYTER_DATA_DIR": str(tmp_path / "d"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "r")}
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=True)
    routes = json.loads(out.stdout.strip().splitlines()[-1])
    allowed = {(f"/dp/lomas/api/{route}$", f"{h.__module__}.{h.__qualname__}") for route, h in ROUTES}
    allowed.add((".*$", "lomas_jupyter_server.app.NoSuchEndpointHandler"))
    assert {tuple(r) for r in routes} <= allowed, [r for r in routes if tuple(r) not in allowed]
    assert len(routes) == len(ROUTES) + 1


def test_no_token_is_a_401_that_says_to_send_one(service: dict) -> None:
    for method, path in (("GET", "lomas/api/datasets"), ("POST", "lomas/api/query"), ("GET", "lomas/api/budget")):
        for headers in ({}, {"Authorization": "token lomas_wrong"}, {"Authorization": "Basic Ym9zczpib3Nz"}):
            response = call(service, method, path, None, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers)
            message = response.json()["message"]
            if "token" in headers.get("Authorization", ""):  # issue 24.5: a wrong token is named as such
                assert "not valid" in message and "unknown, revoked" in message and "lomas_wrong" not in message
            else:
                assert "Authorization: token" in message
            assert response.headers["WWW-Authenticate"].startswith("token")


def test_tokens_only_in_the_header_and_never_a_cookie(service: dict) -> None:
    token = service["tokens"]["alice"]
    assert call(service, "GET", f"lomas/api/whoami?token={token}", None).status_code == 401
    response = call(service, "GET", "lomas/api/whoami")
    assert response.status_code == 200 and "set-cookie" not in {k.lower() for k in response.headers}
    assert call(service, "GET", "lomas/api/whoami", None, headers={"Authorization": f"Bearer {token}"}).ok


def test_revoking_removing_and_demoting_take_effect_on_the_next_request(service: dict) -> None:
    session = requests.Session()  # keeps any cookie the server might set, as an attacker would
    carol = {"Authorization": f"token {service['tokens']['carol']}"}
    query = {"dataset": "penguins", "sql": "SELECT COUNT(*) FROM penguins", "epsilon": 0.1}
    assert session.get(service["url"] + "lomas/api/budget/penguins", headers=carol, timeout=30).ok
    assert session.post(service["url"] + "lomas/api/query", headers=carol, json=query, timeout=60).status_code == 201
    assert call(service, "DELETE", "lomas/api/admin/users/carol/tokens", "boss").json()["revoked"] == 1
    forged = {"_xsrf": "x", "username-127-0-0-1": "carol", "lomas": "carol"}
    for headers in (carol, {}):
        budget = session.get(service["url"] + "lomas/api/budget/penguins", headers={**headers, "X-XSRFToken": "x"},
                             cookies=forged, timeout=30)
        assert budget.status_code == 401
        paid = session.post(service["url"] + "lomas/api/query", headers={**headers, "X-XSRFToken": "x"},
                            cookies=forged, json={**query, "fresh": True}, timeout=60)
        assert paid.status_code == 401
    # lowering a role: dave becomes an admin, then an analyst again; the admin API follows at once
    assert call(service, "PATCH", "lomas/api/admin/users/dave", "boss", json={"role": "admin"}).ok
    assert call(service, "GET", "lomas/api/admin/users", "dave").status_code == 200
    assert call(service, "PATCH", "lomas/api/admin/users/dave", "boss", json={"role": "analyst"}).ok
    assert call(service, "GET", "lomas/api/admin/users", "dave").status_code == 403
    # removing a user ends their access; their ledger stays
    assert call(service, "DELETE", "lomas/api/admin/users/dave", "boss").json()["removed"] is True
    assert call(service, "GET", "lomas/api/whoami", "dave").status_code == 401
    users = {u["username"] for u in call(service, "GET", "lomas/api/admin/users", "boss").json()}
    assert "dave" not in users and "carol" in users


def test_the_api_never_locks_out_the_last_admin_and_the_cli_recovers(service: dict) -> None:
    for method, path, body in (("DELETE", "lomas/api/admin/users/boss/tokens", None),
                               ("PATCH", "lomas/api/admin/users/boss", {"role": "analyst"}),
                               ("DELETE", "lomas/api/admin/users/boss", None)):
        response = call(service, method, path, "boss", json=body)
        assert response.status_code == 409 and "no admin with a valid token" in response.json()["message"]
        assert call(service, "GET", "lomas/api/admin/users", "boss").ok  # nothing changed
    lomas_admin(service["storage"], "token", "revoke", "boss")  # the machine's admin may do anything...
    assert call(service, "GET", "lomas/api/whoami", "boss").status_code == 401
    service["tokens"]["boss"] = lomas_admin(service["storage"], "token", "issue", "boss")  # ...and recover
    assert call(service, "GET", "lomas/api/admin/users", "boss").ok


def warm_workers(service: dict) -> None:
    """Let every worker finish importing OpenDP first, so memory readings compare like with like."""
    body = {"dataset": "penguins", "sql": "SELECT COUNT(*) FROM penguins", "epsilon": 0.1}
    assert call(service, "POST", "lomas/api/preview", json=body).ok
    assert call(service, "POST", "lomas/api/dummy", json=body).ok


def test_a_huge_public_key_product_is_refused_before_any_work(service: dict) -> None:
    warm_workers(service)
    before = tree_rss_mb(service["pid"])
    sql = "SELECT a, b, c, COUNT(*) FROM wide GROUP BY a, b, c"
    for endpoint in ("preview", "dummy", "query"):
        response = call(service, "POST", f"lomas/api/{endpoint}", json={"dataset": "wide", "sql": sql, "epsilon": 1})
        assert response.status_code == 400, endpoint
        assert "1,001 x 1,001 x 1,001 = 1,003,003,001 groups" in response.json()["message"]
    assert tree_rss_mb(service["pid"]) - before < 100  # server and workers: flat
    assert call(service, "GET", "lomas/api/budget/wide").json()["epsilon_spent"] == 0
    ok = call(service, "POST", "lomas/api/preview", json={"dataset": "wide", "sql": "SELECT a, COUNT(*) FROM wide "
                                                          "GROUP BY a", "epsilon": 1})
    assert ok.status_code == 200  # 1,000 groups are fine


def test_long_or_chains_deep_nesting_and_deep_json_are_4xx(service: dict) -> None:
    def query(sql: str) -> requests.Response:
        return call(service, "POST", "lomas/api/preview", json={"dataset": "penguins", "sql": sql, "epsilon": 1})

    ors = " OR ".join(f"year = {2000 + i}" for i in range(150))
    assert query(f"SELECT COUNT(*) FROM penguins WHERE {ors}").status_code == 200  # a long chain is one level
    ors = " OR ".join(f"year = {2000 + i}" for i in range(246))
    refused = query(f"SELECT COUNT(*) FROM penguins WHERE {ors}")
    assert refused.status_code == 400 and "more than 200 conditions" in refused.json()["message"]
    nested = "SELECT COUNT(*) FROM penguins WHERE " + "NOT (" * 40 + "year = 2008" + ")" * 40
    assert query(nested).status_code == 400
    parens = "SELECT COUNT(*) FROM penguins WHERE " + "(" * 3000 + "year = 2008" + ")" * 3000
    assert query(parens).status_code == 400
    for body in ("[" * 5000 + "]" * 5000, '{"a":' * 5000 + "1" + "}" * 5000,
                 json.dumps({"dataset": "penguins", "sql": "SELECT COUNT(*) FROM penguins", "epsilon": 1,
                             "bounds": {"year": _nested_list(20)}})):
        response = call(service, "POST", "lomas/api/query", data=body)
        assert response.status_code == 400 and "nested" in response.json()["message"]


def _nested_list(depth: int) -> list:
    value: list = [1]
    for _ in range(depth):
        value = [value]
    return value


def test_an_unauthenticated_huge_body_is_refused_and_memory_stays_flat(service: dict) -> None:
    warm_workers(service)
    before = tree_rss_mb(service["pid"])
    chunk = b"x" * (1 << 20)

    def body(megabytes: int) -> Iterator[bytes]:
        for _ in range(megabytes):
            yield chunk

    for headers in ({"Content-Length": str(300 << 20)}, {}):  # declared, and chunked (size unknown up front)
        try:
            response = requests.post(service["url"] + "lomas/api/query", data=body(300), headers=headers, timeout=60)
            assert response.status_code in (400, 413)
        except requests.ConnectionError:
            pass  # the server closed the connection after refusing the body: as good
    assert tree_rss_mb(service["pid"]) - before < 100
    assert call(service, "GET", "lomas/api/whoami").ok  # and it still serves


def test_nothing_secret_reaches_the_server_log(service: dict) -> None:
    marker = "Zebra-7734"
    call(service, "POST", "lomas/api/query", json={"dataset": "penguins", "epsilon": 0.1,
                                                   "sql": f"SELECT COUNT(*) FROM penguins WHERE species = '{marker}'"})
    call(service, "POST", "lomas/api/query", json={"dataset": "penguins", "epsilon": 0.1, "sql": f"SELEC {marker}"})
    call(service, "GET", f"lomas/api/whoami?token={service['tokens']['alice']}", None)
    log = Path(service["log"]).read_text()
    assert "Traceback" not in log
    assert marker not in log
    for token in service["tokens"].values():
        assert token not in log
    assert "?token" not in log


def test_path_imports_are_off_by_default(service: dict) -> None:
    """Issue 17.5: a standalone service reads no file by path unless LomasApp.import_dirs names its folder;
    the store's own file is never read (its locks would be dropped)."""
    store_file = str(Path(service["storage"]) / "lomas.sqlite3")
    for endpoint, body in (("admin/datasets", {"name": "x", "metadata": {"columns": {}}, "path": store_file}),
                           ("admin/datasets/draft", {"path": store_file}),
                           ("admin/datasets/draft", {"path": str(Path(service["root"]) / "wide.csv")})):
        response = call(service, "POST", f"lomas/api/{endpoint}", user="boss", json=body)
        assert response.status_code == 400 and "import_dirs" in response.json()["message"], response.text
        assert str(service["root"]) not in response.text


async def test_the_http_server_caps_connections_and_drops_slow_ones() -> None:
    """Issue 17.6: 20,000 idle half-sent requests exhausted the service's file descriptors. The standalone
    server (CappedHTTPServer, wired in LomasServiceServerApp.init_httpserver) closes a connection over its cap
    on arrival, and one that is too slow with its headers or its body after the timeouts."""
    import asyncio

    from tornado import web
    from tornado.testing import bind_unused_port

    from lomas_jupyter_server.app import CappedHTTPServer

    class Hello(web.RequestHandler):
        def get(self) -> None:
            self.write("hello")

    sock, port = bind_unused_port("127.0.0.1")
    server = CappedHTTPServer(web.Application([(r"/", Hello)]), idle_connection_timeout=1.0, body_timeout=1.0,
                              max_connections=3)
    server.add_sockets([sock])

    async def closed_by_server(reader: asyncio.StreamReader) -> bool:
        return await asyncio.wait_for(reader.read(), timeout=120) == b""

    try:
        slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for _, writer in slow:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        await asyncio.gather(*(w.drain() for _, w in slow))
        while len(server._connections) < 3:  # accepted (no timing: until the server has them)
            await asyncio.sleep(0.05)
        over_reader, _ = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_by_server(over_reader)  # over the cap: closed at once, before any timeout
        assert len(server._connections) == 3
        for reader, _ in slow:  # the header timeout drops the half-sent requests
            assert await closed_by_server(reader)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly ten b")  # body never ends
        await writer.drain()
        assert await closed_by_server(reader)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # and honest clients are served
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), timeout=120)).endswith(b"hello")
    finally:
        server.stop()


def test_the_standalone_service_is_configured_with_caps_and_timeouts(service: dict) -> None:
    """The live service drops what the old one kept: 60 half-sent requests (over the fixture's cap of 40) are all
    closed, by the cap or the header timeout, and the service still serves. (Before: no timeout, so they were
    held open.) The cap's exact semantics are tested in-process above."""
    import socket

    held = []
    for _ in range(60):
        s = socket.create_connection(("127.0.0.1", int(str(service["url"]).rsplit(":", 1)[1].strip("/"))))
        s.sendall(b"GET /lomas/api/whoami HTTP/1.1\r\nHost: x\r\n")
        held.append(s)
    import select

    open_ones, deadline = set(held), 90.0  # the cap closes 20 at once, the header timeout (10 s) the others
    while open_ones and deadline > 0:
        readable, _, _ = select.select(list(open_ones), [], [], 1.0)
        deadline -= 1.0
        for s in readable:
            try:
                data = s.recv(1)
            except OSError:
                data = b""
            if data == b"":
                open_ones.discard(s)
    assert not open_ones, f"{len(open_ones)} half-sent requests still held open"
    for s in held:
        s.close()
    assert call(service, "GET", "lomas/api/whoami").status_code == 200
