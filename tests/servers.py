"""Start a Jupyter or lomas server as a real subprocess on 127.0.0.1, and stop it (by our own PID)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(command: str, args: list[str], root: Path, env: dict[str, str],
                   headers: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """Yields the server's base URL and PID once `lomas/api/whoami` answers."""
    port = free_port()
    argv = [str(BIN / command), "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
            "--ServerApp.open_browser=False", *args]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    log_path = root / f"{command}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, env={**os.environ, "JUPYTER_RUNTIME_DIR": str(root / "runtime"), **env},
                                stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + 240  # a busy machine: importing Jupyter and OpenDP can be slow
            while True:
                try:
                    requests.get(url + "lomas/api/whoami", headers=headers or {}, timeout=2)
                    break
                except requests.ConnectionError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(log_path.read_text()) from None
                    time.sleep(0.3)
            yield url, proc.pid
        finally:
            stop_tree(proc)


def stop_tree(proc: subprocess.Popen, grace: float = 120) -> None:
    """SIGTERM a server we started and wait for its clean shutdown (kernels included); on a busy machine that can
    take long, so only after `grace` seconds kill it and every process it started."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        proc.kill()
        proc.wait()


def lomas_admin(storage: Path, *args: str) -> str:
    """Run the real `lomas-admin` on a storage folder; returns what it printed."""
    out = subprocess.run([str(BIN / "lomas-admin"), "--storage-dir", str(storage), *args],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def add_analyst(storage: Path, username: str, grants: dict[str, float]) -> str:
    """An analyst with an epsilon grant per dataset; returns their new API token."""
    lomas_admin(storage, "user", "add", username)
    for dataset, epsilon in grants.items():
        lomas_admin(storage, "grant", username, dataset, "--epsilon", str(epsilon))
    return lomas_admin(storage, "token", "issue", username)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a server and all its worker processes."""
    import psutil

    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def slow_quantile_dataset(folder: Path, rows: int, seed: int) -> tuple[Path, Path]:
    """A parquet table (and its metadata file) on which grouped quantiles take a while: queries queue on one
    worker, so a test can kill a service with reservations in flight. Returns (data, metadata)."""
    import json

    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    source = folder / "big.parquet"
    pl.DataFrame({"g": np.array(["a", "b", "c"])[rng.integers(0, 3, rows)],
                  "x": rng.uniform(0, 100, rows)}).write_parquet(source)
    meta = {"privacy_unit": 1, "max_rows": rows, "columns": {"g": {"type": "string", "categories": ["a", "b", "c"]},
                                                             "x": {"type": "float", "bounds": [0.0, 100.0]}}}
    (folder / "big.json").write_text(json.dumps(meta))
    return source, folder / "big.json"


def quantile_query(i: int) -> dict:
    """The i-th slow query on `slow_quantile_dataset` (each a different one: no free replay)."""
    return {"dataset": "big", "epsilon": 1.0, "fresh": True,
            "sql": f"SELECT g, MEDIAN(x), PERCENTILE_CONT(0.{i + 1}) WITHIN GROUP (ORDER BY x) FROM big GROUP BY g"}
