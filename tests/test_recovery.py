"""`kill -9` of the service with queries in flight, then a restart: every reservation is settled, the budget
equals the sum of committed charges, the ledger says why, and the dead service's workers are gone."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from lomas_jupyter_server.store import SQLStore

from .servers import add_analyst, lomas_admin, quantile_query, running_server, slow_quantile_dataset


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_kill_9_with_queries_in_flight_then_restart(tmp_path: Path) -> None:
    # 2M rows: grouped quantiles take a while, so queries queue on the one worker
    source, meta = slow_quantile_dataset(tmp_path, 2_000_000, seed=1)
    storage = tmp_path / "store"
    lomas_admin(storage, "dataset", "import", "big", str(source), "--metadata", str(meta))
    token = add_analyst(storage, "alice", {"big": 50})
    headers = {"Authorization": f"token {token}"}
    env = {"JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    args = [f"--LomasApp.storage_dir={storage}", "--LomasApp.workers=1"]

    with running_server("jupyter-lomas", args, tmp_path, env) as (url, pid):
        def query(i: int) -> None:
            try:
                requests.post(url + "lomas/api/query", json=quantile_query(i), headers=headers, timeout=600)
            except requests.ConnectionError:
                pass  # the service dies under it

        threads = [threading.Thread(target=query, args=(i,), daemon=True) for i in range(8)]
        for thread in threads:
            thread.start()
        pending = 0
        while pending < 4:  # wait until several reservations are held by queries still running
            budget = requests.get(url + "lomas/api/budget/big", headers=headers, timeout=30).json()
            pending = budget["pending"]
            assert budget["epsilon_spent"] >= budget["epsilon_pending"]
            time.sleep(0.05)
        workers = [p.pid for p in psutil.Process(pid).children(recursive=True)]
        os.kill(pid, signal.SIGKILL)
        for thread in threads:
            thread.join(timeout=120)

    # the dead service's workers went with it (PR_SET_PDEATHSIG): no orphans keep running
    deadline = time.monotonic() + 60
    while any(_running(w) for w in workers):
        assert time.monotonic() < deadline, "orphaned workers"
        time.sleep(0.2)

    store = SQLStore(storage / "lomas.sqlite3")
    assert store.budget("alice", "big").pending >= 4  # left unsettled by the dead service
    store.close()

    with running_server("jupyter-lomas", args, tmp_path, env) as (url, _pid):
        budget = requests.get(url + "lomas/api/budget/big", headers=headers, timeout=30).json()
        assert budget["pending"] == 0 and budget["epsilon_pending"] == 0

    store = SQLStore(storage / "lomas.sqlite3")
    ledger = store.ledger("alice", limit=1000)
    store.close()
    reserved = {r["reservation_id"] for r in ledger if r["kind"] == "reserve"}
    settled = {r["reservation_id"]: r for r in ledger if r["kind"] != "reserve"}
    assert reserved == set(settled)  # every reservation settled, exactly once (a unique index guarantees once)
    refunds = [r for r in settled.values() if r["kind"] == "refund"]
    assert len(refunds) >= 4
    assert all("stopped before the release left it" in r["note"] for r in refunds)
    committed = sum(r["epsilon"] for r in settled.values() if r["kind"] == "commit")
    assert budget["epsilon_spent"] == pytest.approx(committed, abs=1e-12)
