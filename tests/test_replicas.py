"""Three `jupyter lomas` replicas on one PostgreSQL behave as one service: budgets and class caps hold under 60
concurrent charged queries spread over the replicas, a token revoked through one is refused by the others, a
release made on one replays free on another, and a replica killed with `kill -9` mid-query has its reservations
settled exactly once by the others."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import requests

from lomas_jupyter_server.demo import setup_demo
from lomas_jupyter_server.store import SQLStore

from .servers import lomas_admin, quantile_query, running_server, slow_quantile_dataset

pytestmark = pytest.mark.slow
COUNT_SQL = "SELECT COUNT(*) FROM penguins"


@pytest.fixture(scope="module")
def replicas(postgres: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("replicas")
    url = postgres.new_database()
    storage = root / "storage"  # the parquet copies: one folder the replicas share (a bucket, in production)
    store = SQLStore(url)
    setup_demo(store, storage, "boss", epsilon=1000.0, role="admin")
    tokens = {"boss": store.issue_token("boss", "test", "test")}
    store.close()
    env = {"JUPYTER_CONFIG_DIR": str(root / "config"), "JUPYTER_DATA_DIR": str(root / "data")}
    args = [f"--LomasApp.storage_dir={storage}", f"--LomasApp.db_url={url}", "--LomasApp.workers=1",
            "--LomasApp.pricing_workers=1", "--LomasApp.timing_padding=off"]
    with ExitStack() as stack:
        servers = []
        for i in range(3):
            folder = root / f"replica{i}"
            folder.mkdir()
            servers.append(stack.enter_context(running_server("jupyter-lomas", args, folder, env)))
        yield {"urls": [u for u, _ in servers], "pids": [p for _, p in servers], "db_url": url, "storage": storage,
               "tokens": tokens, "root": root, "args": args, "env": env}


def _call(base: str, token: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    response = requests.request(method, base + "lomas/api/" + path, json=body, timeout=600,
                                headers={"Authorization": f"token {token}"})
    return response.status_code, response.json()


def _analyst(replicas: dict[str, Any], name: str, epsilon: float) -> str:
    """Created through replica 0, given a token there (the others only see the shared store)."""
    boss, base = replicas["tokens"]["boss"], replicas["urls"][0]
    status, body = _call(base, boss, "POST", "admin/users", {"username": name})
    assert status == 201, body
    assert _call(base, boss, "PUT", "admin/grants",
                 {"username": name, "dataset": "penguins", "epsilon": epsilon})[0] in (200, 201)
    status, body = _call(base, boss, "POST", f"admin/users/{name}/tokens", {})
    assert status in (200, 201), body
    return body["token"]


def _price(replicas: dict[str, Any], token: str) -> float:
    status, body = _call(replicas["urls"][1], token, "POST", "preview",
                         {"dataset": "penguins", "sql": COUNT_SQL, "epsilon": 1.0})
    assert status == 200, body
    return body["cost"]["epsilon"]


def _race(replicas: dict[str, Any], tokens: list[str], count: int) -> Counter:
    """`count` charged queries at once, round-robin over the replicas and the tokens."""
    urls = replicas["urls"]
    body = {"dataset": "penguins", "sql": COUNT_SQL, "epsilon": 1.0, "fresh": True}
    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(lambda i: _call(urls[i % len(urls)], tokens[i % len(tokens)], "POST", "query", body),
                                range(count)))
    outcomes = Counter((status, answer.get("error", "released")) for status, answer in answers)
    return outcomes


def test_sixty_concurrent_queries_on_three_replicas_spend_exactly_the_budget(replicas: dict[str, Any]) -> None:
    token = _analyst(replicas, "alice", 1000.0)
    cost = _price(replicas, token)
    boss = replicas["tokens"]["boss"]
    _call(replicas["urls"][2], boss, "PUT", "admin/grants",
          {"username": "alice", "dataset": "penguins", "epsilon": 10 * cost})  # room for exactly 10
    outcomes = _race(replicas, [token], 60)
    assert outcomes == {(201, "released"): 10, (403, "insufficient_budget"): 50}, outcomes
    store = SQLStore(replicas["db_url"])
    try:
        budget = store.budget("alice", "penguins")
        ledger = store.ledger("alice", 10_000)
    finally:
        store.close()
    commits = [r for r in ledger if r["kind"] == "commit"]
    assert len(commits) == 10 and budget.pending == 0 and budget.releases == 10
    assert budget.epsilon_spent == pytest.approx(sum(r["epsilon"] for r in commits))
    assert budget.epsilon_spent <= budget.epsilon_total


def test_a_class_cap_holds_across_replicas(replicas: dict[str, Any]) -> None:
    boss, urls = replicas["tokens"]["boss"], replicas["urls"]
    students = [f"student{i}" for i in range(6)]
    tokens = [_analyst(replicas, name, 0.0) for name in students]
    cost = _price(replicas, _analyst(replicas, "pricer", 1.0))
    assert _call(urls[0], boss, "POST", "admin/courses", {"name": "stats", "hub_group": "stats-students"})[0] == 201
    status, body = _call(urls[1], boss, "PUT", "admin/courses/stats/datasets",
                         {"dataset": "penguins", "epsilon_per_student": 5 * cost, "epsilon_cap": 10 * cost})
    assert status in (200, 201), body
    for name in students:
        assert _call(urls[2], boss, "POST", "admin/courses/stats/members", {"username": name})[0] in (200, 201)
    outcomes = _race(replicas, tokens, 60)  # 6 students x 5 queries of room each, but a class cap of 10 queries
    assert outcomes == {(201, "released"): 10, (403, "insufficient_budget"): 50}, outcomes
    status, spending = _call(urls[0], boss, "GET", "admin/courses/stats/spending/penguins")
    assert status == 200 and spending["epsilon_spent"] == pytest.approx(10 * cost)
    assert spending["epsilon_spent"] <= spending["epsilon_cap"]
    assert sum(s["epsilon_spent"] for s in spending["per_student"].values()) == pytest.approx(10 * cost)


def test_a_token_revoked_through_one_replica_is_refused_by_the_others(replicas: dict[str, Any]) -> None:
    token = _analyst(replicas, "bob", 1.0)
    urls, boss = replicas["urls"], replicas["tokens"]["boss"]
    assert all(_call(u, token, "GET", "whoami")[1]["username"] == "bob" for u in urls)
    assert _call(urls[0], boss, "DELETE", "admin/users/bob/tokens")[0] == 200
    for base in urls[1:]:
        status, body = _call(base, token, "GET", "whoami")
        assert status == 401 and body["error"] == "unauthorized"


def test_a_release_made_on_one_replica_replays_free_on_another(replicas: dict[str, Any]) -> None:
    token = _analyst(replicas, "carol", 5.0)
    urls = replicas["urls"]
    body = {"dataset": "penguins", "sql": "SELECT species, COUNT(*) FROM penguins GROUP BY species", "epsilon": 1.0}
    status, first = _call(urls[0], token, "POST", "query", body)
    assert status == 201 and first["replay"] is False
    status, again = _call(urls[2], token, "POST", "query", body)
    assert status == 201 and again["replay"] is True and again["cost"] == {"epsilon": 0.0, "delta": 0.0}
    assert again["release_id"] == first["release_id"] and again["rows"] == first["rows"]
    assert again["budget"]["epsilon_spent"] == first["budget"]["epsilon_spent"]


def test_kill_9_of_a_replica_mid_query_is_settled_once_by_another(replicas: dict[str, Any], tmp_path: Path) -> None:
    # 1M rows: grouped quantiles take a while, so queries queue on the replica's one worker
    source, meta = slow_quantile_dataset(tmp_path, 1_000_000, seed=2)
    lomas_admin(replicas["storage"], "--db-url", replicas["db_url"], "dataset", "import", "big", str(source),
                "--metadata", str(meta))
    token = _analyst(replicas, "dora", 1.0)
    boss, urls = replicas["tokens"]["boss"], replicas["urls"]
    _call(urls[0], boss, "PUT", "admin/grants", {"username": "dora", "dataset": "big", "epsilon": 50.0})
    victim, victim_pid = urls[0], replicas["pids"][0]

    def query(i: int) -> None:
        try:
            _call(victim, token, "POST", "query", quantile_query(i))
        except (requests.ConnectionError, ValueError):
            pass  # the replica dies under it

    threads = [threading.Thread(target=query, args=(i,), daemon=True) for i in range(6)]
    for thread in threads:
        thread.start()
    pending = 0
    while pending < 3:  # seen through another replica: the store is shared
        pending = _call(urls[1], token, "GET", "budget/big")[1]["pending"]
        time.sleep(0.05)
    os.kill(victim_pid, signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=120)
    deadline = time.monotonic() + 300  # replicas 1 and 2 notice at their next heartbeat
    while (budget := _call(urls[2], token, "GET", "budget/big")[1])["pending"]:
        assert time.monotonic() < deadline, budget
        time.sleep(0.2)

    store = SQLStore(replicas["db_url"])
    try:
        ledger = store.ledger("dora", 1000)
        settles = [a for a in store.audit(10_000) if a.action == "settle_abandoned"]
        running = {i.pid for i in store.running_instances()}
    finally:
        store.close()
    reserved = {r["reservation_id"] for r in ledger if r["kind"] == "reserve"}
    settled = [r for r in ledger if r["kind"] != "reserve"]
    assert reserved == {r["reservation_id"] for r in settled} and len(settled) == len(reserved)  # each once
    refunds = [r for r in settled if r["kind"] == "refund"]
    assert len(refunds) >= 3 and all("stopped before the release left it" in r["note"] for r in refunds)
    assert len(settles) == 1  # one replica settled the dead one's reservations, the other found nothing to do
    assert victim_pid not in running and set(replicas["pids"][1:]) <= running
    committed = sum(r["epsilon"] for r in settled if r["kind"] == "commit")
    assert budget["epsilon_spent"] == pytest.approx(committed, abs=1e-12)
    # the survivors still serve
    assert _call(urls[1], token, "POST", "query", {"dataset": "penguins", "sql": COUNT_SQL, "epsilon": 0.5})[0] == 201
