"""OpenDP runs in worker processes: a crash, a hang or a memory blow-up fails one query, refunds it, replaces
that worker, and leaves the other queries alone."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from pathlib import Path

import pytest

from lomas_jupyter_server import engine
from lomas_jupyter_server.demo import penguins_metadata, setup_demo
from lomas_jupyter_server.engine.metadata import parse_metadata
from lomas_jupyter_server.engine.sql import compile_sql
from lomas_jupyter_server.engine.workers import WorkerPool, note_data_access
from lomas_jupyter_server.errors import ChargedFailure, EngineFailure, QueryRejected
from lomas_jupyter_server.service import DPService, TimingPadding
from lomas_jupyter_server.store import SQLStore

META = parse_metadata(penguins_metadata())
SPEC = compile_sql("SELECT COUNT(*) FROM penguins", "penguins", META).to_json()


def hog(megabytes: int) -> int:
    """Touch `megabytes` of memory, then linger so the watchdog sees it."""
    block = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(2)
    return len(block)


def map_and_read(path: str) -> int:
    """Read a file through a memory map, every page, then linger so the watchdog sees it; returns how much of
    the file was resident in this process (its RssFile)."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        total = sum(mapped[i] for i in range(0, len(mapped), 4096))
        with open("/proc/self/status") as status:
            resident_file = next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssFile:"))
        time.sleep(2)
    assert total == 0
    return resident_file


def jupyter_server_loaded() -> bool:
    import sys

    return "jupyter_server.serverapp" in sys.modules


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
        preview = await pool.run(engine.preview_task, SPEC, META.to_json(), 1.0, 0.0, None)
        assert preview["epsilon"] <= 1.0
    finally:
        pool.close()


async def test_a_worker_killed_mid_query_is_replaced() -> None:
    pool = WorkerPool(1, timeout=60)
    try:
        await pool.run(time.sleep, 0)  # started and ready: the kill below hits a running task
        (pid,) = pool.pids()
        task = asyncio.ensure_future(pool.run(time.sleep, 20))
        await asyncio.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EngineFailure, match="crashed"):
            await task
        assert pool.pids() != [pid]
        assert (await pool.run(engine.preview_task, SPEC, META.to_json(), 0.5, 0.0, None))["epsilon"] <= 0.5
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
        assert (await pool.run(engine.preview_task, SPEC, META.to_json(), 0.5, 0.0, None))["epsilon"] <= 0.5
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


async def test_pages_of_a_mapped_file_do_not_count_against_the_memory_limit(tmp_path: Path) -> None:
    """Issue 20: a memory-mapped scan of a file larger than the limit is not killed for reading it."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(900 * 1024 * 1024)  # sparse zeros: reading it fills the page cache, not the disk
    pool = WorkerPool(1, timeout=120, memory_limit_mb=600)
    try:
        assert await pool.run(map_and_read, str(big)) > 600 * 1024 * 1024  # resident, and over the limit
        with pytest.raises(EngineFailure, match="more memory"):
            await pool.run(hog, 1200)  # what the worker allocates still counts
    finally:
        pool.close()


async def test_domain_errors_cross_the_process_boundary_as_themselves() -> None:
    pool = WorkerPool(1, timeout=60)
    try:
        with pytest.raises(QueryRejected, match="refused on purpose"):
            await pool.run(refuse)
    finally:
        pool.close()


def _service_with_demo(tmp_path: Path, timeout: float = 60) -> tuple[DPService, SQLStore]:
    store = SQLStore(tmp_path / "s.sqlite3")
    setup_demo(store, tmp_path, "alice", epsilon=5.0, role="analyst")
    return DPService(store, tmp_path, WorkerPool(1, timeout=timeout), pricing_pool=WorkerPool(1, timeout=60)), store


async def test_a_failure_before_the_data_is_read_is_refunded(tmp_path: Path) -> None:
    service, store = _service_with_demo(tmp_path, timeout=3)
    alice = store.get_user("alice")
    body = {"dataset": "penguins", "sql": "SELECT COUNT(*) FROM penguins", "epsilon": 1.0}
    try:
        await service.queries.preview(alice, body)
        service.pool.warm_up()
        (pid,) = service.pool.pids()
        await service.pool.run(time.sleep, 0)  # started and idle
        os.kill(pid, signal.SIGSTOP)  # it will never even look at the task
        with pytest.raises(EngineFailure, match="longer than 3 s.*nothing was charged"):
            await service.queries.query(alice, body)
        budget = store.budget("alice", "penguins")
        assert budget.epsilon_spent == 0.0 and budget.pending == 0
        refund, reserve = store.ledger("alice")[:2]
        assert (refund["kind"], reserve["kind"]) == ("refund", "reserve")
        assert "before reading the data" in refund["note"]
        assert (await service.queries.query(alice, body))["budget"]["releases"] == 1  # the stopped worker was replaced
    finally:
        service.pool.close()
        service.pricing_pool.close()
        store.close()


async def test_a_failure_after_the_data_was_read_is_charged(tmp_path: Path) -> None:
    """A time-out while reading can depend on the data (how many rows a WHERE matches): it is paid for.
    The dataset file is replaced by a named pipe with no writer, so reading it never ends, on any machine."""
    service, store = _service_with_demo(tmp_path, timeout=3)
    alice = store.get_user("alice")
    body = {"dataset": "penguins", "sql": "SELECT COUNT(*) FROM penguins WHERE year > 2007", "epsilon": 1.0}
    try:
        path = Path(store.get_dataset("penguins").parquet_path)
        good = path.read_bytes()
        path.unlink()
        os.mkfifo(path)
        with pytest.raises(ChargedFailure) as info:
            await service.queries.query(alice, body)
        message = info.value.message
        assert "longer than 3 s" in message and "was charged" in message and str(tmp_path) not in message
        charged = info.value.details["charged"]["epsilon"]
        budget = store.budget("alice", "penguins")
        assert 0 < charged <= 1.0 and budget.epsilon_spent == charged and budget.pending == 0
        commit = store.ledger("alice")[0]
        assert commit["kind"] == "commit" and "after reading the data" in commit["note"]
        path.unlink()
        path.write_bytes(good)
        answer = await service.queries.query(alice, {**body, "fresh": True})  # and the next query works
        assert answer["budget"]["epsilon_spent"] == pytest.approx(charged + answer["cost"]["epsilon"])
    finally:
        service.pool.close()
        service.pricing_pool.close()
        store.close()


def read_then_crash() -> None:
    note_data_access()
    os.abort()


async def test_failures_say_whether_the_data_was_read() -> None:
    pool = WorkerPool(1, timeout=60)
    try:
        with pytest.raises(EngineFailure) as before:
            await pool.run(os.abort)
        assert before.value.data_accessed is False
        with pytest.raises(EngineFailure) as after:
            await pool.run(read_then_crash)
        assert after.value.data_accessed is True
        with pytest.raises(QueryRejected) as rejected:
            await pool.run(refuse)
        assert rejected.value.data_accessed is False
    finally:
        pool.close()


async def test_a_fresh_workers_start_does_not_count_against_the_time_limit() -> None:
    """A fresh worker imports OpenDP (seconds on a busy machine); a task's clock starts only once it is ready.
    Each fresh worker is held stopped (SIGSTOP) for three times the limit before it may start."""
    pool = WorkerPool(1, timeout=0.5)

    async def run_on_a_slow_starting_worker() -> None:
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGSTOP)
        task = asyncio.ensure_future(pool.run(time.sleep, 0))
        await asyncio.sleep(1.5)
        assert not task.done()  # waiting for the worker, not timed out
        os.kill(pid, signal.SIGCONT)
        assert await task is None

    try:
        pool.warm_up()
        await run_on_a_slow_starting_worker()
        with pytest.raises(EngineFailure, match="longer than 0.5 s"):
            await pool.run(time.sleep, 30)  # the worker is replaced by a fresh one
        await run_on_a_slow_starting_worker()
    finally:
        pool.close()


def product_holding_the_gil(n: int) -> int:
    """One C call that holds the GIL while it allocates: no thread inside the worker could stop it."""
    return len(list(itertools.product(range(n), range(n), range(10))))


async def test_the_parent_enforces_memory_limits_a_worker_cannot_dodge() -> None:
    pool = WorkerPool(1, timeout=120, memory_limit_mb=400)
    try:
        assert await pool.run(product_holding_the_gil, 100) == 100_000
        with pytest.raises(EngineFailure, match="more memory"):
            await pool.run(product_holding_the_gil, 2000)  # 40M tuples: several GB
        assert await pool.run(product_holding_the_gil, 100) == 100_000
    finally:
        pool.close()


async def test_stall_padding_holds_back_answers_computed_from_the_data(tmp_path: Path) -> None:
    service, store = _service_with_demo(tmp_path)
    service.queries.padding = TimingPadding("stall", 1.5)
    alice = store.get_user("alice")
    body = {"dataset": "penguins", "sql": "SELECT COUNT(*) FROM penguins", "epsilon": 0.5}
    try:
        await service.queries.preview(alice, body)
        started = time.monotonic()
        await service.queries.query(alice, body)
        assert time.monotonic() - started >= 1.5  # a lower bound: true on any machine
    finally:
        service.pool.close()
        service.pricing_pool.close()
        store.close()


async def test_free_requests_need_a_grant_and_their_work_is_bounded_at_any_epsilon(tmp_path: Path) -> None:
    """Issue 17.3: free requests stalled the service. A user without a grant gets a 403 for a preview or a dummy
    query (nothing runs); an AVG's interval search at a tiny epsilon (minutes before: it grew like 1/epsilon)
    and a fixed-point SUM with delta on a 10^9-row bound (never returned: OpenDP's accuracy search) both finish
    within the free-request limit."""
    from lomas_jupyter_server.demo import penguins_csv
    from lomas_jupyter_server.errors import Forbidden
    from lomas_jupyter_server.service.importing import import_dataset

    store = SQLStore(tmp_path / "s.sqlite3")
    setup_demo(store, tmp_path, "alice", epsilon=5.0, role="analyst")
    loose = penguins_metadata() | {"max_rows": 10**9}
    import_dataset(store, tmp_path, "loose", penguins_csv(), loose)
    store.set_grant("alice", "loose", 1.0, 1e-5, "test")
    store.create_user("mallory", "analyst", "test")
    service = DPService(store, tmp_path, WorkerPool(1, timeout=60), pricing_pool=WorkerPool(1, timeout=60),
                        free_timeout=20)
    alice, mallory = store.get_user("alice"), store.get_user("mallory")
    avg = {"dataset": "penguins", "sql": "SELECT species, AVG(body_mass_g) AS m FROM penguins GROUP BY species",
           "epsilon": 2e-5}
    try:
        for call in (service.queries.preview, service.queries.dummy_query):
            with pytest.raises(Forbidden, match="no budget on dataset 'penguins'"):
                await call(mallory, avg)
        dummy = await service.queries.dummy_query(alice, avg)
        assert dummy["dummy"] is True and len(dummy["rows"]) == 3
        low, high = dummy["intervals"][0]["m"]
        assert low <= dummy["rows"][0]["m"] <= high
        fixed = await service.queries.preview(alice, {"dataset": "loose", "sql": "SELECT SUM(bill_length_mm) FROM loose",
                                              "epsilon": 1.0, "delta": 1e-6})
        (statistic,) = fixed["plan"]["statistics"]
        assert statistic["fixed_point_step"] and statistic["accuracy"] > 0
        assert store.budget("alice", "penguins").epsilon_spent == 0  # free
    finally:
        service.pool.close()
        service.pricing_pool.close()
        store.close()


def test_a_worker_whose_service_died_while_it_started_exits_at_once(tmp_path: Path) -> None:
    """Issue 17.9: a worker spawned just before its service was killed set its parent-death signal too late
    (after Python had re-imported the service) and lived on for a minute. It now checks its parent right after
    setting the signal and exits before anything else: it never even opens its log."""
    import subprocess
    import sys

    log = tmp_path / "workers.log"
    code = ("import os, sys\n"
            "from lomas_jupyter_server.engine.workers import WorkerPool\n"
            f"pool = WorkerPool(2, 10, log_path={str(log)!r})\n"
            "pool.warm_up()\n"
            "print(' '.join(str(p) for p in pool.pids()), flush=True)\n"
            "os._exit(0)\n")  # the service dies while its workers are still starting
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2
    for pid in pids:
        for _ in range(600):  # until the orphan is gone (it exits on its own; no other process reaps it here)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"worker {pid} outlived its service")
    assert not log.exists()


def test_a_worker_does_not_re_import_the_main_script(tmp_path: Path) -> None:
    """Issue 20: `jupyter lomas` is a script that imports the whole Jupyter server; a spawned worker used to
    re-run it before its first task (seconds and tens of MB each). It imports only what its tasks need."""
    import subprocess
    import sys

    script = tmp_path / "like_jupyter_lomas.py"
    script.write_text(
        "import asyncio\n"
        "import jupyter_server.serverapp  # what the service's main script imports\n"
        "from lomas_jupyter_server.engine.workers import WorkerPool\n"
        "from tests.test_workers import jupyter_server_loaded\n"
        "if __name__ == '__main__':\n"
        "    pool = WorkerPool(1, timeout=120, preload=())\n"
        "    print('worker has jupyter_server:', asyncio.run(pool.run(jupyter_server_loaded)))\n"
        "    print('service has jupyter_server:', jupyter_server_loaded())\n"
        "    pool.close()\n")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    assert "worker has jupyter_server: False" in done.stdout and "service has jupyter_server: True" in done.stdout
