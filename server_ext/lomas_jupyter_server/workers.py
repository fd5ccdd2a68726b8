"""Worker processes for OpenDP: an OpenDP panic aborts its process, and it must not be ours.

Each worker is a long-lived `spawn`ed process (never fork a process that runs an event loop and holds sockets)
that imported the engine once. A worker runs one task at a time over its own pipe, so a crash, a hang or a
memory blow-up costs only that task and that worker, which is replaced; other queries carry on.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from .errors import EngineFailure, LomasError

log = logging.getLogger(__name__)

MEMORY_EXIT_CODE = 75  # a worker that exits with this code went over its memory limit


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_watchdog(limit: int) -> None:
    """Inside the worker: leave (with a code the parent recognises) before the machine starts swapping."""
    while True:
        if _rss_bytes() > limit:
            os._exit(MEMORY_EXIT_CODE)
        time.sleep(0.05)


def _serve(conn: Connection, memory_limit: int) -> None:
    from . import engine  # noqa: F401  (imports OpenDP and polars once, before the first task)

    if memory_limit > 0 and os.path.exists("/proc/self/statm"):
        threading.Thread(target=_memory_watchdog, args=(memory_limit,), daemon=True).start()
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", fn(*args)))
        except LomasError as err:
            conn.send(("error", (type(err).__name__, err.message)))
        except Exception:
            # details stay in this worker's log: they may hold paths or data
            log.exception("lomas: engine failure")
            conn.send(("error", ("EngineFailure", "the query failed inside the DP engine; nothing was charged")))


class _Worker:
    def __init__(self, ctx: Any, memory_limit: int) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, memory_limit), daemon=True)
        self.process.start()
        child.close()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


def _rebuild_error(kind: str, message: str) -> LomasError:
    from . import errors

    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, LomasError)):
        cls = EngineFailure
    return cls(message)


class WorkerPool:
    """`await pool.run(fn, *args)` runs a module-level function in a worker and returns its result."""

    def __init__(self, workers: int, timeout: float, memory_limit_mb: int = 0) -> None:
        self.workers = max(1, workers)
        self.timeout = timeout
        self.memory_limit = memory_limit_mb * 1024 * 1024
        self._ctx = multiprocessing.get_context("spawn")
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        # threads only wait on pipes; the event loop never blocks on a query
        self._waiters = ThreadPoolExecutor(max_workers=64, thread_name_prefix="lomas-wait")

    def _acquire(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise EngineFailure("the DP engine is shutting down")
            if self._idle.empty() and len(self._all) < self.workers:
                worker = _Worker(self._ctx, self.memory_limit)
                self._all.add(worker)
                return worker
        worker = self._idle.get()
        if not worker.process.is_alive():  # died while idle (e.g. its memory watchdog): a fresh one instead
            self._replace(worker)
            return self._acquire()
        return worker

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._all.discard(worker)
            if self._closed:
                return
            fresh = _Worker(self._ctx, self.memory_limit)
            self._all.add(fresh)
        self._idle.put(fresh)

    def _run_sync(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        worker = self._acquire()
        try:
            worker.conn.send((fn, args))
            if not worker.conn.poll(self.timeout):
                self._replace(worker)
                raise EngineFailure(
                    f"the query took longer than {self.timeout:g} s and was stopped; nothing was charged"
                )
            status, payload = worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(timeout=5)
            code = worker.process.exitcode
            self._replace(worker)
            if code == MEMORY_EXIT_CODE:
                raise EngineFailure("the query needed more memory than a worker may use; nothing was charged") from None
            raise EngineFailure("the query engine crashed while running this query; nothing was charged") from None
        self._idle.put(worker)
        if status == "ok":
            return payload
        raise _rebuild_error(*payload)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._waiters, self._run_sync, fn, args)

    def pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._all if w.pid is not None]

    def warm_up(self) -> None:
        """Start every worker now rather than on the first queries."""
        with self._lock:
            while len(self._all) < self.workers:
                worker = _Worker(self._ctx, self.memory_limit)
                self._all.add(worker)
                self._idle.put(worker)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all = list(self._all), set()
        for worker in workers:
            worker.kill()
        self._waiters.shutdown(wait=False, cancel_futures=True)
