"""OpenDP runs in worker processes: a crash, a hang or a memory blow-up fails one query, refunds it, replaces
that worker, and leaves the other queries alone."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from lomas_jupyter_server import engine
from lomas_jupyter_server.demo import penguins_metadata, setup_demo
from lomas_jupyter_server.errors import EngineFailure, QueryRejected
from lomas_jupyter_server.metadata import parse_metadata
from lomas_jupyter_server.service import DPService
from lomas_jupyter_server.sql import compile_sql
from lomas_jupyter_server.store import SQLiteStore
from lomas_jupyter_server.workers import WorkerPool

META = parse_metadata(penguins_metadata())
SPEC = compile_sql("SELECT COUNT(*) FROM penguins", "penguins", META).to_json()


def hog(megabytes: int) -> int:
    """Touch `megabytes` of memory, then linger so the watchdog sees it."""
    block = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(2)
    return len(block)


def refuse() -> None:
    raise QueryRejected("refused on purpose")


async def test_a_crashing_worker_fails_only_its_own_task() -> None:
    pool = WorkerPool(2, timeout=60)
    try:
        pool.warm_up()
        slow = asyncio.ensure_future(pool.run(time.sleep, 1.0))
        with pytest.raises(EngineFailure, match="crashed"):
            await pool.run(os.abort)  # what an OpenDP panic does to its process
        assert await slow is None  # the other worker's task was not touched
        preview = await pool.run(engine.preview_task, SPEC, META.to_json(), 1.0, None)
        assert preview["epsilon"] <= 1.0
    finally:
        pool.close()


async def test_a_worker_killed_mid_query_is_replaced() -> None:
    pool = WorkerPool(1, timeout=60)
    try:
        pool.warm_up()
        (pid,) = pool.pids()
        task = asyncio.ensure_future(pool.run(time.sleep, 20))
        await asyncio.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EngineFailure, match="crashed"):
            await task
        assert pool.pids() != [pid]
        assert (await pool.run(engine.preview_task, SPEC, META.to_json(), 0.5, None))["epsilon"] <= 0.5
    finally:
        pool.close()


async def test_a_hung_worker_is_stopped_and_replaced() -> None:
    pool = WorkerPool(1, timeout=1.0)
    try:
        pool.warm_up()
        await pool.run(time.sleep, 0)  # wait until the worker has imported the engine
        started = time.monotonic()
        with pytest.raises(EngineFailure, match="longer than 1 s"):
            await pool.run(time.sleep, 30)
        assert time.monotonic() - started < 10
        assert (await pool.run(engine.preview_task, SPEC, META.to_json(), 0.5, None))["epsilon"] <= 0.5
    finally:
        pool.close()


async def test_memory_limit_stops_the_query() -> None:
    pool = WorkerPool(1, timeout=60, memory_limit_mb=600)
    try:
        assert await pool.run(hog, 10) == 10 * 1024 * 1024
        with pytest.raises(EngineFailure, match="more memory"):
            await pool.run(hog, 1200)
        assert await pool.run(hog, 10) == 10 * 1024 * 1024
    finally:
        pool.close()


async def test_domain_errors_cross_the_process_boundary_as_themselves() -> None:
    pool = WorkerPool(1, timeout=60)
    try:
        with pytest.raises(QueryRejected, match="refused on purpose"):
            await pool.run(refuse)
    finally:
        pool.close()


async def test_engine_failure_during_release_refunds(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.sqlite3")
    setup_demo(store, tmp_path, "alice", epsilon=5.0, role="analyst")
    service = DPService(store, tmp_path, WorkerPool(1, timeout=60))
    alice = store.get_user("alice")
    body = {"dataset": "penguins", "sql": "SELECT COUNT(*) FROM penguins", "epsilon": 1.0}
    try:
        ok = await service.query(alice, body)
        spent = store.budget("alice", "penguins").epsilon_spent
        assert spent == ok["cost"]["epsilon"]
        path = Path(store.get_dataset("penguins").parquet_path)
        good = path.read_bytes()
        path.write_bytes(b"this is not parquet any more")  # the storage fails under the service
        with pytest.raises(EngineFailure) as info:
            await service.query(alice, {**body, "fresh": True})
        assert str(tmp_path) not in info.value.message
        assert store.budget("alice", "penguins").epsilon_spent == spent  # refunded
        assert [row["kind"] for row in store.ledger("alice")][:2] == ["refund", "reserve"]
        path.write_bytes(good)
        again = await service.query(alice, {**body, "fresh": True})  # and the next query works
        assert again["budget"]["releases"] == 2
    finally:
        service.pool.close()
        store.close()


async def test_a_worker_killed_during_a_release_refunds_and_the_next_query_succeeds(tmp_path: Path) -> None:
    import numpy as np
    import polars as pl

    from lomas_jupyter_server.datasets import import_dataset

    rows = 3_000_000  # big enough that a release takes a while, so we can kill its worker in the middle
    rng = np.random.default_rng(0)
    source = tmp_path / "big.parquet"
    pl.DataFrame({"g": np.array(["a", "b"])[rng.integers(0, 2, rows)], "x": rng.uniform(0, 1, rows)}).write_parquet(source)
    store = SQLiteStore(tmp_path / "s.sqlite3")
    meta = {"privacy_unit": 1, "max_rows": rows, "columns": {"g": {"type": "string", "categories": ["a", "b"]},
                                                             "x": {"type": "float", "bounds": [0.0, 1.0]}}}
    import_dataset(store, tmp_path, "big", source, meta)
    store.create_user("alice", "analyst", "test")
    store.set_grant("alice", "big", 5.0, 0.0, "test")
    pool = WorkerPool(1, timeout=120)
    service = DPService(store, tmp_path, pool, pricing_pool=WorkerPool(1, timeout=120))
    alice = store.get_user("alice")
    body = {"dataset": "big", "sql": "SELECT g, AVG(x), COUNT(*) FROM big GROUP BY g", "epsilon": 1.0}
    try:
        await service.preview(alice, body)  # price it first, so the query below goes straight to its release
        pool.warm_up()
        (pid,) = pool.pids()
        query = asyncio.ensure_future(service.query(alice, body))
        while pool._idle.qsize():  # the release has taken the worker
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EngineFailure, match="crashed"):
            await query
        budget = store.budget("alice", "big")
        assert budget.epsilon_spent == 0.0 and budget.releases == 0
        assert [row["kind"] for row in store.ledger("alice")] == ["refund", "reserve"]
        answer = await service.query(alice, body)
        assert answer["budget"]["releases"] == 1 and answer["cost"]["epsilon"] <= 1.0
    finally:
        pool.close()
        service.pricing_pool.close()
        store.close()
