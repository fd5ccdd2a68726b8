"""Trust-boundary figures for a standalone `jupyter lomas`: event-loop lag under heavy queries, how fast hostile
requests are refused, whether memory stays flat, whether a query's response time tells anything about its WHERE,
and whether one user's free requests stall another's queries.

    .venv/bin/python benchmarks/trust_boundary.py [--rows 3000000] [--seconds 30] [--pairs 30]

Writes benchmarks/results/trust-boundary.md (or --out). Loop lag is measured as the round trip of `GET whoami`
(answered on the event loop without a worker) every 50 ms while clients keep the query workers busy. The timing
experiments interleave the two queries of each pair in random order and compare their response times with a
two-sided Mann-Whitney test: |z| < 2 means no detectable difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.servers import add_analyst, lomas_admin, running_server, tree_rss_mb  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=30, help="pairs of queries per timing experiment")
    parser.add_argument("--epsilon", type=float, default=1e-12, help="epsilon of each timing query")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "trust-boundary.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lomas-tb-"))
    rng = np.random.default_rng(0)
    source = work / "big.parquet"
    # k: even numbers only, so `k = <odd>` matches nothing and `k = <one row's k>` (made unique) one row
    k = 2 * rng.integers(1, 500_000, args.rows)
    k[0] = 1_000_000
    k[1:][k[1:] == 1_000_000] = 2
    pl.DataFrame({"g": np.array(["a", "b", "c", "d"])[rng.integers(0, 4, args.rows)],
                  "x": rng.uniform(0, 100, args.rows), "k": k}).write_parquet(source)
    big_meta = {"privacy_unit": 1, "max_rows": args.rows,
                "columns": {"g": {"type": "string", "categories": ["a", "b", "c", "d"]},
                            "x": {"type": "float", "bounds": [0.0, 100.0]},
                            "k": {"type": "int", "bounds": [0, 1_000_000]}}}
    # three columns with 1,000 public categories each: a 10^9-group key product
    wide_meta = {"privacy_unit": 1, "max_rows": 10,
                 "columns": {k: {"type": "string", "categories": [f"c{i}" for i in range(1000)]}
                             for k in ("k1", "k2", "k3")}}
    pl.DataFrame({"k1": ["c1"], "k2": ["c2"], "k3": ["c3"]}).write_parquet(work / "w.parquet")
    (work / "big.json").write_text(json.dumps(big_meta))
    (work / "wide.json").write_text(json.dumps(wide_meta))
    storage = work / "store"
    lomas_admin(storage, "dataset", "import", "big", str(source), "--metadata", str(work / "big.json"))
    lomas_admin(storage, "dataset", "import", "wide", str(work / "w.parquet"), "--metadata", str(work / "wide.json"))
    token = add_analyst(storage, "alice", {"big": 100000})
    headers = {"Authorization": f"token {token}"}
    mallory = {"Authorization": f"token {add_analyst(storage, 'mallory', {'big': 1})}"}
    env = {"JUPYTER_CONFIG_DIR": str(work / "config"), "JUPYTER_DATA_DIR": str(work / "data")}
    lines = [f"# Trust-boundary figures ({args.rows:,} rows, {os.cpu_count()} cores)", ""]
    with running_server("jupyter-lomas", [f"--LomasApp.storage_dir={storage}"], work, env) as (url, pid):
        requests.get(url + "lomas/api/whoami", headers=headers, timeout=30)
        idle_rss = tree_rss_mb(pid)
        # 1. a 10^9-group query, refused from public metadata
        times = []
        for _ in range(20):
            start = time.perf_counter()
            r = requests.post(url + "lomas/api/preview", headers=headers, timeout=60,
                              json={"dataset": "wide", "sql": "SELECT k1, k2, k3, COUNT(*) FROM wide GROUP BY k1, k2, k3",
                                    "epsilon": 1})
            times.append(time.perf_counter() - start)
            assert r.status_code == 400, r.text
        lines.append(f"- 10^9-group query refused (400): median {1000 * statistics.median(times):.1f} ms, "
                     f"max {1000 * max(times):.1f} ms over 20; tree RSS {idle_rss:.0f} -> {tree_rss_mb(pid):.0f} MB")
        # 2. an unauthenticated 300 MB body
        before = tree_rss_mb(pid)
        start = time.perf_counter()
        try:
            status = requests.post(url + "lomas/api/query", data=(b"x" * 2**20 for _ in range(300)),
                                   headers={"Content-Length": str(300 * 2**20)}, timeout=120).status_code
        except requests.ConnectionError:
            status = "connection closed"
        lines.append(f"- unauthenticated 300 MB POST: {status} after {time.perf_counter() - start:.2f} s; "
                     f"tree RSS {before:.0f} -> {tree_rss_mb(pid):.0f} MB")
        # 3. loop lag while clients keep the workers busy with heavy queries
        stop = threading.Event()
        answered: list[float] = []

        def heavy(i: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                body = {"dataset": "big", "epsilon": 1.0, "fresh": True,
                        "sql": "SELECT g, MEDIAN(x), PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY x), AVG(x) FROM big "
                               "GROUP BY g"}
                start = time.perf_counter()
                requests.post(url + "lomas/api/query", headers=headers, json=body, timeout=600)
                answered.append(time.perf_counter() - start)

        idle_lag = []
        for _ in range(100):
            start = time.perf_counter()
            requests.get(url + "lomas/api/whoami", headers=headers, timeout=30)
            idle_lag.append(time.perf_counter() - start)
            time.sleep(0.02)
        clients = [threading.Thread(target=heavy, args=(i,), daemon=True) for i in range(args.clients)]
        for c in clients:
            c.start()
        busy_lag, peak = [], 0.0
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            start = time.perf_counter()
            requests.get(url + "lomas/api/whoami", headers=headers, timeout=30)
            busy_lag.append(time.perf_counter() - start)
            peak = max(peak, tree_rss_mb(pid))
            time.sleep(0.05)
        stop.set()
        for c in clients:
            c.join(timeout=600)
        lines.append(f"- `GET whoami` round trip idle: p50 {1000 * statistics.median(idle_lag):.1f} ms, "
                     f"p99 {1000 * percentile(idle_lag, 0.99):.1f} ms")
        lines.append(f"- `GET whoami` round trip while {args.clients} clients run grouped quantile queries for "
                     f"{args.seconds:g} s ({len(answered)} answered, median {statistics.median(answered):.2f} s each): "
                     f"p50 {1000 * statistics.median(busy_lag):.1f} ms, p99 {1000 * percentile(busy_lag, 0.99):.1f} ms, "
                     f"max {1000 * max(busy_lag):.1f} ms over {len(busy_lag)} probes; peak tree RSS {peak:.0f} MB")
        lines += timing_experiments(url, headers, args.pairs, args.epsilon)
        lines += stall_experiment(url, headers, mallory)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def mann_whitney_z(a: list[float], b: list[float]) -> float:
    """The two-sided Mann-Whitney U statistic as a z-score (normal approximation, ties averaged)."""
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(a, b, alternative="two-sided").statistic
    n, m = len(a), len(b)
    return float((u - n * m / 2) / np.sqrt(n * m * (n + m + 1) / 12))


TIMING = [
    ("100% vs 10% of rows", "SELECT g, COUNT(*) FROM big WHERE k >= 0 GROUP BY g",
     "SELECT g, COUNT(*) FROM big WHERE k >= 900000 GROUP BY g"),
    ("all vs none, with SUM and AVG", "SELECT g, COUNT(*), SUM(x), AVG(x) FROM big WHERE k >= 0 GROUP BY g",
     "SELECT g, COUNT(*), SUM(x), AVG(x) FROM big WHERE k >= 1000001 GROUP BY g"),
    ("one row vs none", "SELECT COUNT(*), AVG(x) FROM big WHERE k = 1000000",
     "SELECT COUNT(*), AVG(x) FROM big WHERE k = 999999"),
    ("100% vs 10%, ungrouped", "SELECT COUNT(*) FROM big WHERE k >= 0",
     "SELECT COUNT(*) FROM big WHERE k >= 900000"),
]


def timing_experiments(url: str, headers: dict[str, str], pairs: int, epsilon: float) -> list[str]:
    """Each pair at a negligible epsilon: does the response time tell the two WHEREs apart?"""
    rng = np.random.default_rng(1)
    lines = ["", f"## Timing: does a query's response time depend on its WHERE? ({pairs} interleaved pairs each, "
             f"epsilon {epsilon:g})", "", "| experiment | median A (ms) | median B (ms) | Mann-Whitney z |", "|---|---|---|---|"]

    def timed(sql: str) -> float:
        start = time.perf_counter()
        r = requests.post(url + "lomas/api/query", headers=headers, timeout=600,
                          json={"dataset": "big", "sql": sql, "epsilon": epsilon, "fresh": True})
        assert r.status_code == 201, r.text
        return time.perf_counter() - start

    for name, first, second in TIMING:
        timed(first), timed(second)  # warm: plans built, scans open
        a, b = [], []
        for _ in range(pairs):
            order = [(first, a), (second, b)]
            rng.shuffle(order)
            for sql, into in order:
                into.append(timed(sql))
        z = mann_whitney_z(a, b)
        lines.append(f"| {name} | {1000 * statistics.median(a):.0f} | {1000 * statistics.median(b):.0f} | "
                     f"{z:+.2f}{'' if abs(z) < 2 else ' (different)'} |")
    return lines


def stall_experiment(url: str, headers: dict[str, str], attacker: dict[str, str]) -> list[str]:
    """One user's free requests (previews at a tiny epsilon, dummy queries with many quantiles) against
    another user's small query: how long does the small query take, alone and during the attack?"""
    asked = iter(range(10**6))

    def latency() -> float:  # a new epsilon each time: priced afresh, so it needs the pricing worker too
        body = {"dataset": "big", "sql": "SELECT COUNT(*) FROM big WHERE k >= 0", "fresh": True,
                "epsilon": 0.01 + 1e-6 * next(asked)}
        start = time.perf_counter()
        r = requests.post(url + "lomas/api/query", headers=headers, json=body, timeout=900)
        assert r.status_code == 201, r.text
        return time.perf_counter() - start

    alone = [latency() for _ in range(5)]
    free = [("preview", {"dataset": "big", "sql": "SELECT g, COUNT(x), SUM(x) FROM big GROUP BY g", "epsilon": 2e-5}),
            ("dummy", {"dataset": "big", "epsilon": 2e-5, "sql": "SELECT g, AVG(x), " + ", ".join(
                f"PERCENTILE_CONT({q / 100:g}) WITHIN GROUP (ORDER BY x)" for q in range(5, 100, 5)) +
                " FROM big GROUP BY g"})]
    statuses: list[str] = []
    stop = threading.Event()

    def attack(path: str, body: dict) -> None:
        while not stop.is_set():
            r = requests.post(url + f"lomas/api/{path}", headers=attacker, json=body, timeout=900)
            statuses.append(f"{path} {r.status_code}")

    threads = [threading.Thread(target=attack, args=pb, daemon=True) for pb in free for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    during = [latency() for _ in range(5)]
    stop.set()
    for t in threads:
        t.join(timeout=900)
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    return ["", "## Free requests against someone else's query", "",
            f"- another user's `COUNT(*)` alone: median {1000 * statistics.median(alone):.0f} ms; while one user "
            f"keeps two previews (COUNT and SUM) and two dummy queries (AVG and 19 percentiles) at epsilon 2e-5 "
            "running: median "
            f"{1000 * statistics.median(during):.0f} ms, max {1000 * max(during):.0f} ms (attacker's answers: "
            f"{counts})"]


if __name__ == "__main__":
    main()
