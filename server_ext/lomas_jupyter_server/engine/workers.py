"""Worker processes for OpenDP: an OpenDP panic aborts its process, and it must not be ours.

Each worker is a long-lived `spawn`ed process (never fork a process that runs an event loop and holds sockets)
that imports the engine once and then says it is ready. A worker runs one task at a time over its own pipe, so
a crash, a hang or a memory blow-up costs only that task and that worker, which is replaced; other queries
carry on.

Limits are enforced from outside the worker, where no GIL-holding C call can dodge them: the parent measures
each busy worker's resident memory and kills it when it goes over, and stops a task that runs past its time.
The time limit starts when a ready worker receives the task, never while a fresh worker is still starting.

A task tells the parent, before it reads any row, that it is about to (`note_data_access`). A failure after
that point can depend on the data (a time-out on a predicate that matches many rows, say), so the caller must
charge for it; the error says so (`LomasError.data_accessed`).
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..errors import EngineFailure, LomasError

log = logging.getLogger(__name__)

START_TIMEOUT = 300.0  # seconds a fresh worker may take to import OpenDP on a very busy machine
WATCH_INTERVAL = 0.02  # seconds between the parent's memory readings of busy workers
TASKS_MODULE = "lomas_jupyter_server.engine.tasks"  # what workers run; imported by name in the worker only
_task_conn: Connection | None = None  # inside a worker: the pipe of the task that is running
# a task is a module-level function, or its name as "module:function": a name lets the service ask for a task
# without importing what it needs (OpenDP, the engines), which only the worker imports
Task = Callable[..., Any] | str


def note_data_access() -> None:
    """Inside a worker: tell the parent that the running task starts reading private data now.
    Outside a worker (tests, benchmarks) it does nothing."""
    if _task_conn is not None:
        _task_conn.send(("data_access", None))


def die_with_parent(sig: int, parent_pid: int | None = None) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (a `kill -9` of the service leaves no
    orphan worker; a dead Hub leaves no service), and exit now if the parent died before the signal was set
    (it would then never fire): the parent is no longer `parent_pid`, or, unknown, the process went to init."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    orphaned = os.getppid() != parent_pid if parent_pid is not None else os.getppid() == 1
    if orphaned:
        os._exit(0)


def _setup_worker_log(log_path: str | None) -> None:
    """Worker tracebacks may hold paths or values: they go to the worker log, never the server's output."""
    root = logging.getLogger()
    root.handlers.clear()
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s pid=%(process)d %(levelname)s %(message)s"))
    else:
        handler = logging.NullHandler()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _serve(conn: Connection, log_path: str | None, parent_pid: int, preload: tuple[str, ...] = ()) -> None:
    global _task_conn
    die_with_parent(signal.SIGKILL, parent_pid)  # the first thing a spawned worker runs
    _setup_worker_log(log_path)
    for module in preload:  # e.g. the engine's tasks: OpenDP and polars imported once, before the first task
        importlib.import_module(module)

    conn.send(("ready", os.getpid()))
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:
            return
        _task_conn = conn
        try:
            conn.send(("ok", _task_function(fn)(*args)))
        except LomasError as err:
            conn.send(("error", (type(err).__name__, err.message)))
        except Exception:
            log.exception("lomas: engine failure in %s", getattr(fn, "__name__", fn))
            conn.send(("error", ("EngineFailure", "the query failed inside the DP engine")))
        finally:
            _task_conn = None


def _task_function(task: Task) -> Callable[..., Any]:
    if callable(task):
        return task
    module, _, function = task.partition(":")
    return getattr(importlib.import_module(module), function)


_MAIN_SWAP = threading.Lock()


def _start_without_main(process: Any) -> None:
    """Start a spawned process that does not re-run the parent's main script first. `spawn` re-imports the
    parent's `__main__` in the child (for `jupyter lomas`, a script importing the whole Jupyter server: seconds
    and tens of MB per worker, for nothing a task uses). A `__main__` with neither a file nor a spec, while
    start() reads it, gives the child nothing to re-import; the task functions are imported by name."""
    with _MAIN_SWAP:
        real_main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            process.start()
        finally:
            sys.modules["__main__"] = real_main


class _Worker:
    def __init__(self, ctx: Any, log_path: str | None, preload: tuple[str, ...] = ()) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, log_path, os.getpid(), preload), daemon=True)
        _start_without_main(self.process)
        child.close()
        self.ready = False
        self.busy_since: float | None = None  # set while a task runs: the memory watch looks at busy workers
        self.killed_for_memory = False

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def wait_ready(self, timeout: float) -> bool:
        if self.ready:
            return True
        if self.conn.poll(timeout):
            try:
                kind, _ = self.conn.recv()
            except (EOFError, OSError):
                return False
            self.ready = kind == "ready"
        return self.ready

    def allocated_bytes(self) -> int:
        """The memory the worker allocated (its anonymous resident pages). Pages of files it maps, such as a
        parquet scan's, belong to the page cache: counting them would kill a worker for reading its data."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return 0
        return 0

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


def _rebuild_error(kind: str, message: str) -> LomasError:
    from .. import errors

    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, LomasError)):
        cls = EngineFailure
    return cls(message)


class WorkerPool:
    """`await pool.run(task, *args)` runs a task (a module-level function or its "module:function" name) in a
    worker and returns its result."""

    def __init__(self, workers: int, timeout: float, memory_limit_mb: int = 0, log_path: str | None = None,
                 start_timeout: float = START_TIMEOUT, preload: tuple[str, ...] = (TASKS_MODULE,)) -> None:
        self.workers = max(1, workers)
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.memory_limit = memory_limit_mb * 1024 * 1024
        self.log_path = log_path
        self.preload = preload  # modules each worker imports before its first task (by name: no import cycle)
        self._ctx = multiprocessing.get_context("spawn")
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        # threads only wait on pipes; the event loop never blocks on a query
        self._waiters = ThreadPoolExecutor(max_workers=64, thread_name_prefix="lomas-wait")
        if self.memory_limit > 0 and os.path.isdir("/proc"):
            threading.Thread(target=self._watch_memory, name="lomas-memory-watch", daemon=True).start()

    def _new_worker(self) -> _Worker:
        worker = _Worker(self._ctx, self.log_path, self.preload)
        self._all.add(worker)
        return worker

    def _watch_memory(self) -> None:
        """From the parent: a worker over its limit is killed, whatever it is doing."""
        while not self._closed.wait(WATCH_INTERVAL):
            with self._lock:
                busy = [w for w in self._all if w.busy_since is not None]
            for worker in busy:
                if worker.allocated_bytes() > self.memory_limit:
                    worker.killed_for_memory = True
                    worker.process.kill()

    def _acquire(self) -> _Worker:
        with self._lock:
            if self._closed.is_set():
                raise EngineFailure("the DP engine is shutting down")
            if self._idle.empty() and len(self._all) < self.workers:
                return self._new_worker()
        worker = self._idle.get()
        if not worker.process.is_alive():  # died while idle: a fresh one instead
            self._replace(worker)
            return self._acquire()
        return worker

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._all.discard(worker)
            if self._closed.is_set():
                return
            fresh = self._new_worker()
        self._idle.put(fresh)

    def _run_sync(self, fn: Task, args: tuple[Any, ...], timeout: float | None = None) -> Any:
        timeout = self.timeout if timeout is None else min(timeout, self.timeout)
        for _ in range(3):  # a worker that died while starting is replaced; its task never began
            worker = self._acquire()
            if worker.wait_ready(self.start_timeout):
                break
            self._replace(worker)
        else:
            raise EngineFailure("a DP engine worker could not start; try again")
        data_accessed = False
        try:
            worker.busy_since = time.monotonic()
            worker.conn.send((fn, args))
            deadline = worker.busy_since + timeout
            while True:
                if not worker.conn.poll(max(deadline - time.monotonic(), 0)):
                    self._replace(worker)
                    raise _failure(f"the query took longer than {timeout:g} s and was stopped", data_accessed)
                status, payload = worker.conn.recv()
                if status == "data_access":
                    data_accessed = True
                    continue
                break
        except (EOFError, OSError):
            worker.process.join(timeout=5)
            over_memory = worker.killed_for_memory
            self._replace(worker)
            if over_memory:
                raise _failure("the query needed more memory than a worker may use", data_accessed) from None
            raise _failure("the query engine crashed while running this query", data_accessed) from None
        finally:
            worker.busy_since = None
        self._idle.put(worker)
        if status == "ok":
            return payload
        error = _rebuild_error(*payload)
        error.data_accessed = data_accessed
        raise error

    async def run(self, fn: Task, *args: Any, timeout: float | None = None) -> Any:
        """`timeout` (seconds) may shorten the pool's own limit for this task (free requests get less)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._waiters, self._run_sync, fn, args, timeout)

    def pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._all if w.pid is not None]

    def warm_up(self) -> None:
        """Start every worker now rather than on the first queries."""
        with self._lock:
            while len(self._all) < self.workers:
                self._idle.put(self._new_worker())

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            workers, self._all = list(self._all), set()
        for worker in workers:
            worker.kill()
        self._waiters.shutdown(wait=False, cancel_futures=True)


def _failure(message: str, data_accessed: bool) -> EngineFailure:
    error = EngineFailure(message)
    error.data_accessed = data_accessed
    return error
