"""Charged-query throughput and latency for one service on SQLite, one on PostgreSQL, and 2 or 3 replicas on one
PostgreSQL; and the store's own latency per charged query (every store call a charged query makes, timed in
process on each database).

    .venv/bin/python benchmarks/replicas.py                       # the figures quoted in the README
    .venv/bin/python benchmarks/replicas.py --queries 12 --clients 2 --store-repeats 20 --configs sqlite:1,postgresql:2

PostgreSQL is a throwaway cluster of Debian's server (tests/postgres.py) with its default, durable settings.
Results: benchmarks/results/<stem>.md, .json and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lomas_jupyter_server.demo import setup_demo  # noqa: E402
from lomas_jupyter_server.store import ReleaseDraft, SQLStore  # noqa: E402
from tests.postgres import PostgresCluster  # noqa: E402
from tests.servers import running_server  # noqa: E402

SQL = "SELECT COUNT(*) FROM penguins"
EPSILON = 0.01


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def store_latency(db_url: str, storage: Path, repeats: int) -> dict[str, float]:
    """Every store call of one charged query (replay lookup, grant, reserve, commit with its release, budget)."""
    store = SQLStore(db_url)
    setup_demo(store, storage, "bench", epsilon=1e9, role="analyst")
    record = store.get_dataset("penguins")
    assert record is not None
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        store.get_dataset("penguins")
        store.find_release("bench", "penguins", record.version, f"q{i}", {"epsilon": EPSILON})
        store.get_grant("bench", "penguins")
        rid = store.reserve("bench", "penguins", EPSILON, 0.0, owner=None)
        store.commit_release(rid, ReleaseDraft("bench", "penguins", record.version, SQL, f"q{i}", {}, EPSILON, 0.0,
                                               {"rows": [{"n": 344}]}))
        store.budget("bench", "penguins")
        times.append((time.perf_counter() - started) * 1000)
    store.close()
    return {"p50_ms": percentile(times, 0.5), "p99_ms": percentile(times, 0.99), "repeats": repeats}


def service_load(db_url: str, storage: Path, root: Path, replicas: int, clients: int, queries: int) -> dict[str, Any]:
    store = SQLStore(db_url)
    setup_demo(store, storage, "bench", epsilon=1e9, role="analyst")
    token = store.issue_token("bench", "benchmark", "bench")
    store.close()
    env = {"JUPYTER_CONFIG_DIR": str(root / "config"), "JUPYTER_DATA_DIR": str(root / "data")}
    args = [f"--LomasApp.storage_dir={storage}", f"--LomasApp.db_url={db_url}", "--LomasApp.workers=1",
            "--LomasApp.pricing_workers=1", "--LomasApp.timing_padding=off"]
    with ExitStack() as stack:
        urls = []
        for i in range(replicas):
            folder = root / f"replica{i}"
            folder.mkdir(parents=True, exist_ok=True)
            urls.append(stack.enter_context(running_server("jupyter-lomas", args, folder, env))[0])
        sessions = [requests.Session() for _ in range(clients)]
        for session in sessions:
            session.headers["Authorization"] = f"token {token}"
        body = {"dataset": "penguins", "sql": SQL, "epsilon": EPSILON, "fresh": True}

        def one(i: int) -> float:
            started = time.perf_counter()
            response = sessions[i % clients].post(urls[i % replicas] + "lomas/api/query", json=body, timeout=600)
            assert response.status_code == 201, response.text
            return (time.perf_counter() - started) * 1000

        for i in range(2 * replicas):  # warm every replica's workers (the first query builds the plan)
            one(i)
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            latencies = list(pool.map(one, range(queries)))
        wall = time.perf_counter() - started
    return {"replicas": replicas, "clients": clients, "queries": queries, "per_second": queries / wall,
            "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=300, help="charged queries per configuration")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--store-repeats", type=int, default=500, help="charged queries timed on the store alone")
    parser.add_argument("--configs", default="sqlite:1,postgresql:1,postgresql:2,postgresql:3",
                        help="database:replicas, comma-separated")
    parser.add_argument("--results", default="replicas", help="file stem in benchmarks/results")
    args = parser.parse_args()
    configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs.split(",")]
    cluster = PostgresCluster(durable=True).start()
    out: dict[str, Any] = {"store": {}, "service": []}
    try:
        with tempfile.TemporaryDirectory(prefix="lomas-bench-") as tmp:
            root = Path(tmp)
            for database in ("sqlite", "postgresql"):
                url = str(root / "latency.sqlite3") if database == "sqlite" else cluster.new_database()
                out["store"][database] = store_latency(url, root / f"latency-{database}", args.store_repeats)
                print(f"store, {database}: {out['store'][database]}", flush=True)
            for n, (database, replicas) in enumerate(configs):
                folder = root / f"config{n}"
                url = str(folder / "storage" / "lomas.sqlite3") if database == "sqlite" else cluster.new_database()
                result = service_load(url, folder / "storage", folder, replicas, args.clients, args.queries)
                out["service"].append({"database": database, **result})
                print(f"service, {database} x{replicas}: {result}", flush=True)
    finally:
        cluster.stop()
    write(out, ROOT / "benchmarks" / "results" / args.results)


def write(out: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    lines = ["# Replicas and the shared store", "", "## The store's latency per charged query", "",
             "| database | p50 ms | p99 ms | queries |", "|---|---|---|---|"]
    for database, s in out["store"].items():
        lines.append(f"| {database} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['repeats']} |")
    lines += ["", "## Charged queries through the service", "",
              "| database | replicas | clients | queries | per second | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|"]
    for s in out["service"]:
        lines.append(f"| {s['database']} | {s['replicas']} | {s['clients']} | {s['queries']} | {s['per_second']:.1f} "
                     f"| {s['p50_ms']:.0f} | {s['p99_ms']:.0f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(out, stem.with_suffix(".png"))


def plot(out: dict[str, Any], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{s['database']}\nx{s['replicas']}" for s in out["service"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.bar(labels, [s["per_second"] for s in out["service"]], color="#4c72b0")
    left.set_title("charged queries per second")
    x = range(len(labels))
    right.bar([i - 0.2 for i in x], [s["p50_ms"] for s in out["service"]], width=0.4, label="p50")
    right.bar([i + 0.2 for i in x], [s["p99_ms"] for s in out["service"]], width=0.4, label="p99")
    right.set_xticks(list(x), labels)
    right.set_title("latency (ms)")
    right.legend()
    queries = statistics.mean(s["queries"] for s in out["service"])
    fig.suptitle(f"{out['service'][0]['clients']} clients, {queries:.0f} charged queries per configuration; the "
                 "machine's 2 cores are shared by every replica and worker", fontsize=9)
    fig.tight_layout()
    fig.savefig(target, dpi=110)


if __name__ == "__main__":
    main()
