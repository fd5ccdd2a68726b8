"""Engine speed, side by side in one run: plain polars, OpenDP alone, OpenDP the naive way, our service over HTTP,
and our service under load. Writes benchmarks/results/results.md and results.png.

    .venv/bin/python benchmarks/run.py                      # 1M and 10M rows, 60 s of load
    .venv/bin/python benchmarks/run.py --rows 1000000 --load-seconds 10   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import requests

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RESULTS = HERE / "results"
BIN = Path(sys.executable).parent
SQL = "SELECT cat, COUNT(*) AS n, AVG(x1) AS mean_x1 FROM synthetic{rows} GROUP BY cat"
EPSILON = 0.5
EXTRA_ARGS: list[str] = []  # extra `jupyter lomas` arguments (e.g. for debugging)
CATEGORIES = ["a", "b", "c", "d", "e"]


def dataset_name(rows: int) -> str:
    return f"synthetic{rows}"


def generate(rows: int) -> Path:
    """Deterministic synthetic table: a 5-value category, two floats, an int."""
    path = DATA / f"{dataset_name(rows)}.parquet"
    if path.exists():
        return path
    DATA.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(rows)
    print(f"generating {rows:,} rows ...", flush=True)
    pl.DataFrame(
        {
            "cat": pl.Series(np.array(CATEGORIES)[rng.integers(0, 5, rows)]),
            "x1": rng.normal(50, 10, rows).clip(0, 100),
            "x2": rng.uniform(0, 100, rows),
            "age": rng.integers(0, 100, rows),
        }
    ).write_parquet(path)
    return path


def metadata(rows: int) -> dict[str, Any]:
    return {
        "privacy_unit": 1,
        "max_rows": rows * 2,
        "columns": {
            "cat": {"type": "string", "nullable": False, "categories": CATEGORIES},
            "x1": {"type": "float", "bounds": [0.0, 100.0], "nullable": False},
            "x2": {"type": "float", "bounds": [0.0, 100.0], "nullable": False},
            "age": {"type": "int", "bounds": [0, 100], "nullable": False},
        },
    }


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm caches (file system, imports)
    times = []
    for _ in range(repeats):
        time.sleep(0.2)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Run the configurations in turn, `repeats` rounds, so machine noise hits all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            # let the previous configuration's thread pools go idle (rayon threads spin before they park), so
            # one process's idle spinning is not billed to the next configuration on a small machine
            time.sleep(0.2)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def plain_polars(path: Path) -> Callable[[], Any]:
    return lambda: pl.scan_parquet(path).group_by("cat").agg(pl.len(), pl.col("x1").mean()).collect()


def opendp_exec_only(path: Path, rows: int) -> Callable[[], Any]:
    """Our plan at a fixed (calibrated) scale: OpenDP's own execution cost."""
    from lomas_jupyter_server import engine
    from lomas_jupyter_server.engine.metadata import parse_metadata
    from lomas_jupyter_server.engine.sql import compile_sql

    meta = parse_metadata(metadata(rows))
    plan = engine.Plan(compile_sql(SQL.format(rows=rows), dataset_name(rows), meta), meta, engine.effective_bounds(meta, None))
    calibrated = plan.calibrate(EPSILON)
    # OpenDP's own collect (the floor): the service collects the same plan with common-subexpression
    # elimination off (engine.collect_release), so that every noise is its own draw
    return lambda: calibrated.measurement(pl.scan_parquet(path)).collect()


def opendp_naive(path: Path, rows: int) -> Callable[[], Any]:
    """What a simple server does per query: Context + resolve (binary search) + release."""
    import opendp.prelude as dp

    dp.enable_features("contrib")

    def run() -> Any:
        context = dp.Context.compositor(
            data=pl.scan_parquet(path),
            privacy_unit=dp.unit_of(contributions=1),
            privacy_loss=dp.loss_of(epsilon=EPSILON),
            split_evenly_over=1,
            margins=[
                dp.polars.Margin(by=[], max_length=rows * 2),
                dp.polars.Margin(by=["cat"], invariant="keys", max_length=rows * 2, max_groups=5),
            ],
        )
        query = context.query().group_by("cat").agg(
            dp.len(signed=True), pl.col("x1").fill_null(50.0).fill_nan(50.0).dp.mean((0.0, 100.0))
        )
        return query.release().collect()

    return run


class Service:
    """`jupyter lomas` in its own process, with the synthetic datasets imported and a token."""

    def __init__(self, root: Path, sizes: list[int]) -> None:
        self.storage = root / "storage"
        admin = [str(BIN / "lomas-admin"), "--storage-dir", str(self.storage)]
        env = {**os.environ}
        subprocess.run([*admin, "user", "add", "bench"], check=False, capture_output=True)
        for rows in sizes:
            if not (self.storage / "datasets" / dataset_name(rows)).exists():
                print(f"importing {rows:,} rows into the service ...", flush=True)
                subprocess.run([*admin, "dataset", "import", dataset_name(rows), str(generate(rows)), "--metadata",
                                str(self._metadata_file(root, rows))], check=True, capture_output=True)
            subprocess.run([*admin, "grant", "bench", dataset_name(rows), "--epsilon", "1000000"], check=True,
                           capture_output=True)
        self.token = subprocess.run([*admin, "token", "issue", "bench"], check=True, capture_output=True,
                                    text=True).stdout.strip()
        with __import__("socket").socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = [str(BIN / "jupyter-lomas"), "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                f"--LomasApp.storage_dir={self.storage}", "--ServerApp.open_browser=False",
                "--LomasApp.max_epsilon_per_query=10", *EXTRA_ARGS]
        if os.geteuid() == 0:
            args.append("--allow-root")
        env["JUPYTER_RUNTIME_DIR"] = str(root / "runtime")
        self.log = open(root / "service.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}/lomas/api/"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"token {self.token}"
        for _ in range(200):
            try:
                if self.session.get(self.url + "whoami", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)

    @staticmethod
    def _metadata_file(root: Path, rows: int) -> Path:
        path = root / f"{dataset_name(rows)}.json"
        path.write_text(json.dumps(metadata(rows)))
        return path

    def post(self, path: str, body: dict[str, Any], session: requests.Session | None = None) -> requests.Response:
        response = (session or self.session).post(self.url + path, json=body, timeout=600)
        return response

    def memory_mb(self) -> tuple[float, float]:
        """(resident memory now of the service and all its workers, the largest peak of any one worker)."""
        children = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        now, peak = 0, 0
        for pid in [self.proc.pid, *map(int, children)]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            fields = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith("Vm")}
            now += int(fields.get("VmRSS", 0))
            if pid != self.proc.pid:
                peak = max(peak, int(fields.get("VmHWM", 0)))
        return now / 1024, peak / 1024

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def body(rows: int, **extra: Any) -> dict[str, Any]:
    return {"dataset": dataset_name(rows), "sql": SQL.format(rows=rows), "epsilon": EPSILON, **extra}


def load_test(service: Service, rows: int, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` threads send fresh (charged) queries for `seconds`; one more thread reads the budget."""
    grant = 200.0
    subprocess.run([str(BIN / "lomas-admin"), "--storage-dir", str(service.storage), "grant", "bench",
                    dataset_name(rows), "--epsilon", str(grant + service_spent(service, rows))], check=True,
                   capture_output=True)
    before = service_spent(service, rows)
    latencies: list[float] = []
    budget_latencies: list[float] = []
    charged: list[float] = []
    refused = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"token {service.token}"
        payload = {**body(rows, fresh=True), "epsilon": 0.05 + 0.001 * (i % 7)}
        while time.monotonic() < stop:
            start = time.perf_counter()
            response = service.post("query", payload, session)
            elapsed = time.perf_counter() - start
            with lock:
                if response.status_code == 201:
                    latencies.append(elapsed)
                    charged.append(response.json()["cost"]["epsilon"])
                else:
                    refused[0] += 1

    def budget_reader() -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"token {service.token}"
        while time.monotonic() < stop:
            start = time.perf_counter()
            session.get(service.url + f"budget/{dataset_name(rows)}", timeout=60)
            budget_latencies.append(time.perf_counter() - start)
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    threads.append(threading.Thread(target=budget_reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spent = service_spent(service, rows) - before
    q = np.quantile
    return {
        "queries": len(latencies),
        "refused": refused[0],
        "throughput": len(latencies) / seconds,
        "p50": float(q(latencies, 0.5)),
        "p95": float(q(latencies, 0.95)),
        "p99": float(q(latencies, 0.99)),
        "budget_p99": float(q(budget_latencies, 0.99)),
        "budget_reads": len(budget_latencies),
        "spent": spent,
        "charged_sum": float(sum(charged)),
        "grant": grant,
        "overspent": spent > grant + 1e-9 or abs(spent - sum(charged)) > 1e-6,
    }


def service_spent(service: Service, rows: int) -> float:
    return service.session.get(service.url + f"budget/{dataset_name(rows)}", timeout=60).json()["epsilon_spent"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--naive-repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--load-seconds", type=float, default=60.0, help="0 skips the load test")
    parser.add_argument("--results", default="results", help="file stem in benchmarks/results/")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    root = DATA / "service"
    root.mkdir(parents=True, exist_ok=True)
    table: dict[int, dict[str, float]] = {}
    for rows in args.rows:
        path = generate(rows)
        print(f"[{rows:,}] in-process configurations ...", flush=True)
        table[rows] = {
            "3 OpenDP naive (Context+resolve+release)": median_time(opendp_naive(path, rows), args.naive_repeats),
        }
    service = Service(root, args.rows)
    rss: dict[int, tuple[float, float]] = {}
    load: dict[str, Any] = {}
    try:
        for rows in args.rows:
            print(f"[{rows:,}] service over HTTP ...", flush=True)
            path = generate(rows)
            table[rows] |= interleaved_medians(
                {
                    "1 plain polars": plain_polars(path),
                    "2 OpenDP exec only (fixed scale)": opendp_exec_only(path, rows),
                    "4a service: warm query (HTTP)":
                        lambda rows=rows: service.post("query", body(rows, fresh=True)).raise_for_status(),
                },
                args.repeats,
            )
            table[rows]["4b service: preview (HTTP)"] = median_time(
                lambda rows=rows: service.post("preview", body(rows)).raise_for_status(), max(args.repeats, 20))
            table[rows]["4c service: replay (HTTP)"] = median_time(
                lambda rows=rows: service.post("query", body(rows)).raise_for_status(), max(args.repeats, 20))
            rss[rows] = service.memory_mb()
        smallest = min(args.rows)
        if args.load_seconds > 0:
            print(f"[{smallest:,}] load: {args.clients} clients for {args.load_seconds:g} s ...", flush=True)
            load = load_test(service, smallest, args.clients, args.load_seconds)
    finally:
        service.close()
    write_results(table, rss, load, args)


def write_results(table: dict[int, dict[str, float]], rss: dict[int, tuple[float, float]], load: dict[str, Any],
                  args: argparse.Namespace) -> None:
    configs = sorted(next(iter(table.values())))
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {os.cpu_count()} cores. Query: `{SQL.format(rows='N')}` at epsilon {EPSILON}. "
        f"Medians of {args.repeats} interleaved rounds of configurations 1, 2 and 4a (naive: {args.naive_repeats}; "
        "preview and replay: 20). "
        "Reproduce: `.venv/bin/python benchmarks/run.py`.",
        "",
        "| configuration | " + " | ".join(f"{rows:,} rows" for rows in table) + " |",
        "| --- | " + " | ".join("---" for _ in table) + " |",
    ]
    for config in configs:
        lines.append(f"| {config} | " + " | ".join(f"{table[rows][config] * 1000:,.1f} ms" for rows in table) + " |")
    lines += ["", "## Targets", "", "| target | value | met |", "| --- | --- | --- |"]
    for rows in table:
        ratio = table[rows]["4a service: warm query (HTTP)"] / table[rows]["2 OpenDP exec only (fixed scale)"]
        limit = 1.5 if rows <= 1_000_000 else 1.25
        lines.append(f"| warm query / OpenDP exec at {rows:,} rows <= {limit} | {ratio:.2f}x | {'yes' if ratio <= limit else 'no'} |")
        speedup = table[rows]["3 OpenDP naive (Context+resolve+release)"] / table[rows]["4a service: warm query (HTTP)"]
        if rows <= 1_000_000:
            lines.append(f"| naive / warm query at {rows:,} rows >= 10 | {speedup:.1f}x | {'yes' if speedup >= 10 else 'no'} |")
        else:
            lines.append(f"| naive / warm query at {rows:,} rows (no target) | {speedup:.1f}x | - |")
        preview, replay = table[rows]["4b service: preview (HTTP)"], table[rows]["4c service: replay (HTTP)"]
        lines.append(f"| preview p50 < 20 ms ({rows:,} rows) | {preview * 1000:.1f} ms | {'yes' if preview < 0.02 else 'no'} |")
        lines.append(f"| replay p50 < 10 ms ({rows:,} rows) | {replay * 1000:.1f} ms | {'yes' if replay < 0.01 else 'no'} |")
    if load:
        lines.append(f"| budget read p99 under load < 50 ms | {load['budget_p99'] * 1000:.1f} ms | "
                     f"{'yes' if load['budget_p99'] < 0.05 else 'no'} |")
        lines.append(f"| no overspend under load | spent {load['spent']:.4f} = sum of charges {load['charged_sum']:.4f}, "
                     f"grant {load['grant']:g} | {'yes' if not load['overspent'] else 'NO'} |")
        lines += ["", f"## Load ({args.clients} clients, {args.load_seconds:g} s, {min(table):,} rows, fresh queries)", "",
                  f"- {load['queries']} queries answered, {load['refused']} refused, "
                  f"throughput {load['throughput']:.1f} queries/s",
                  f"- latency p50 {load['p50'] * 1000:.0f} ms, p95 {load['p95'] * 1000:.0f} ms, "
                  f"p99 {load['p99'] * 1000:.0f} ms",
                  f"- budget reads during the load: {load['budget_reads']}, p99 {load['budget_p99'] * 1000:.1f} ms"]
    lines += ["", "## Memory", "",
              "Resident memory of the service and all its workers after the queries above, and the peak of the "
              "busiest worker so far (the service keeps running, so a peak covers all smaller sizes before it).", ""]
    lines += [f"- {rows:,} rows: {now:,.0f} MB now, worker peak {peak:,.0f} MB" for rows, (now, peak) in rss.items()]
    (RESULTS / f"{args.results}.md").write_text("\n".join(lines) + "\n")
    plot(table, RESULTS / f"{args.results}.png")
    print("\n".join(lines))


def plot(table: dict[int, dict[str, float]], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted(next(iter(table.values())))
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(table)
    for i, rows in enumerate(table):
        values = [table[rows][c] * 1000 for c in configs]
        ax.bar([x + i * width for x in range(len(configs))], values, width, label=f"{rows:,} rows")
    ax.set_xticks([x + width * (len(table) - 1) / 2 for x in range(len(configs))])
    ax.set_xticklabels([c.split(" ", 1)[1] for c in configs], rotation=25, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median time per query (ms, log scale)")
    ax.set_title("lomas-jupyter: one grouped count + mean query")
    ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=110)


if __name__ == "__main__":
    main()
