"""OpenDP runs in worker processes: a crash or a hang fails one query, refunds it, and the service goes on."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lomas_jupyter_server import engine
from lomas_jupyter_server.demo import penguins_metadata, setup_demo
from lomas_jupyter_server.errors import EngineFailure
from lomas_jupyter_server.metadata import parse_metadata
from lomas_jupyter_server.service import DPService
from lomas_jupyter_server.sql import compile_sql
from lomas_jupyter_server.store import SQLiteStore
from lomas_jupyter_server.workers import WorkerPool

META = parse_metadata(penguins_metadata())
SPEC = compile_sql("SELECT COUNT(*) FROM penguins", "penguins", META).to_json()


async def test_a_crashing_worker_does_not_take_the_pool_down() -> None:
    pool = WorkerPool(1, timeout=60)
    try:
        with pytest.raises(EngineFailure, match="crashed"):
            await pool.run(os.abort)  # what an OpenDP panic does to its process
        preview = await pool.run(engine.preview_task, SPEC, META.to_json(), 1.0, None)
        assert preview["epsilon"] <= 1.0
    finally:
        pool.close()


async def test_a_hung_worker_is_stopped_and_replaced() -> None:
    pool = WorkerPool(1, timeout=1.0)
    try:
        pool.warm_up()
        started = time.monotonic()
        with pytest.raises(EngineFailure, match="longer than 1 s"):
            await pool.run(time.sleep, 30)
        assert time.monotonic() - started < 10
        assert (await pool.run(engine.preview_task, SPEC, META.to_json(), 0.5, None))["epsilon"] <= 0.5
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
            await service.query(alice, body)
        assert str(tmp_path) not in info.value.message
        assert store.budget("alice", "penguins").epsilon_spent == spent  # refunded
        assert [row["kind"] for row in store.ledger("alice")][:2] == ["refund", "reserve"]
        path.write_bytes(good)
        again = await service.query(alice, body)  # and the next query works
        assert again["budget"]["releases"] == 2
    finally:
        service.pool.close()
        store.close()
