"""A pool of worker processes for OpenDP: an OpenDP panic aborts its process, and it must not be ours.

Workers are started with `spawn` (never fork a process that runs an event loop and holds sockets) and import
the engine once, so each query pays only for its own work.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .errors import EngineFailure, LomasError

log = logging.getLogger(__name__)


def _warm() -> None:
    from . import engine  # noqa: F401  (imports OpenDP and polars once per worker)


class WorkerPool:
    def __init__(self, workers: int, timeout: float) -> None:
        self.workers = max(1, workers)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    max_workers=self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_warm,
                )
            return self._executor

    def _discard(self, executor: ProcessPoolExecutor) -> None:
        """Throw away a broken or stuck pool; the next call starts a fresh one."""
        with self._lock:
            if self._executor is executor:
                self._executor = None
        for process in list(getattr(executor, "_processes", {}).values()):
            if process.is_alive():
                process.kill()
        executor.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        executor = self._pool()
        try:
            future = executor.submit(fn, *args)
        except BrokenProcessPool:
            self._discard(executor)
            executor = self._pool()
            future = executor.submit(fn, *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except BrokenProcessPool:
            self._discard(executor)
            raise EngineFailure("the query engine crashed while running this query; nothing was charged") from None
        except asyncio.TimeoutError:
            self._discard(executor)
            raise EngineFailure(
                f"the query took longer than {self.timeout:g} s and was stopped; nothing was charged"
            ) from None
        except LomasError:
            raise
        except Exception:
            # details stay in the server log: they may hold paths or data
            log.exception("lomas: engine failure")
            raise EngineFailure("the query failed inside the DP engine; nothing was charged") from None

    def warm_up(self) -> None:
        """Start the workers now rather than on the first query."""
        executor = self._pool()
        for future in [executor.submit(_warm) for _ in range(self.workers)]:
            future.result()

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
