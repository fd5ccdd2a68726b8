"""Big tables: the service on each backend against DuckDB's and Spark's plain, exact answer to the same question,
with the peak memory of the service and its workers; the in-place import of a folder of parts; and the time from
`jupyter lomas` to its first answer.

    .venv/bin/python benchmarks/big.py --rows 1000000000              # the README's figures (about 10 GB of disk)
    .venv/bin/python benchmarks/big.py --rows 20000 --parts 2 --repeats 2 --results ci-tiny-big   # CI

The table (DuckDB writes it once, in --parts parquet files under --data, and it is reused): a 5-value category
`cat`, a float `x` in [0, 100) with 1% nulls and an int `y` in [0, 1000]. One dataset per backend is imported in
place from that folder (the checks stream; no copy). Spark is a standalone master and worker on 127.0.0.1
(tests/spark.py), the same cluster for the service and for plain Spark. Each of the service's queries follows the
plain engine's answer to the same question, so both sides have run the same queries (a JVM's speed depends on
them); the first is reported apart (cold: a Spark driver starts), then --warmups untimed pairs, then the median of
--repeats timed pairs (more for a quick question, see --min-seconds).
Results: benchmarks/results/<stem>.md, .json and .png.
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
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import BIN, add_analyst, lomas_admin, running_server  # noqa: E402
from tests.spark import SparkCluster  # noqa: E402

QUESTIONS = {
    "COUNT(*)": ("SELECT COUNT(*) AS n FROM {t}", "SELECT COUNT(*) FROM read_parquet({files})"),
    "grouped COUNT + AVG": ("SELECT cat, COUNT(*) AS n, AVG(x) AS mean_x FROM {t} GROUP BY cat",
                            "SELECT cat, COUNT(*), AVG(LEAST(GREATEST(x, 0), 100)) FROM read_parquet({files}) GROUP BY cat"),
}
CATEGORIES = [f"c{i}" for i in range(5)]


def generate(folder: Path, rows: int, parts: int) -> list[str]:
    """The table, written by DuckDB part by part (reused when it is there)."""
    import duckdb

    folder.mkdir(parents=True, exist_ok=True)
    done = folder.with_suffix(".complete")  # beside the folder: an engine reading the folder reads every file
    files = [str(folder / f"part-{i:03d}.parquet") for i in range(parts)]
    if done.exists():
        return files
    con = duckdb.connect()
    con.execute("SELECT setseed(0.42)")
    per = -(-rows // parts)
    for i, path in enumerate(files):
        start, stop = i * per, min(rows, (i + 1) * per)
        con.execute(f"""COPY (SELECT ('c' || CAST(hash(r) % 5 AS VARCHAR)) AS cat,
                                    CASE WHEN random() < 0.01 THEN NULL ELSE random() * 100 END AS x,
                                    CAST(floor(random() * 1001) AS BIGINT) AS y
                             FROM range({start}, {stop}) t(r)) TO '{path}' (FORMAT parquet)""")
        print(f"... wrote part {i + 1} of {parts}", file=sys.stderr)
    done.write_text(str(rows))
    return files


def metadata(rows: int, backend: str) -> dict[str, Any]:
    return {"privacy_unit": 1, "max_rows": rows, "backend": backend, "columns": {
        "cat": {"type": "string", "categories": CATEGORIES, "nullable": False},
        "x": {"type": "float", "bounds": [0.0, 100.0], "nullable": True},
        "y": {"type": "int", "bounds": [0, 1000], "nullable": False}}}


class PeakMemory:
    """The peak resident memory (MB) of a process and its children: the sum of each process's own peak, which the
    kernel keeps (VmHWM; reset at the start by writing 5 to its clear_refs). Processes' peaks need not coincide,
    so this is an upper bound of their peak together. A light thread looks for new processes in the tree five
    times a second (one that exits keeps the last peak seen). Sampling every process's memory every few
    milliseconds instead, as this did until 2026-12-07, walked /proc so often that it slowed both sides' Spark
    COUNT(*) at 10^9 rows by about 30%."""

    def __init__(self, pid: int, only_children: bool = False) -> None:
        self.pid, self.only_children = pid, only_children
        self._peaks: dict[int, int] = {}  # pid: its peak so far, in kB
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def peak(self) -> float:
        return sum(self._peaks.values()) / 1024

    def _tree(self) -> list[int]:
        import psutil

        try:
            root = psutil.Process(self.pid)
            return [p.pid for p in root.children(recursive=True)] + ([] if self.only_children else [root.pid])
        except psutil.NoSuchProcess:
            return []

    def _read(self, reset: bool = False) -> None:
        for pid in self._tree():
            if reset:  # a process there before: its peak counts from now (one born since: its whole life)
                try:
                    Path(f"/proc/{pid}/clear_refs").write_text("5")
                except OSError:
                    continue
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self._peaks[pid] = int(line.split()[1])

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._read()

    def __enter__(self) -> PeakMemory:
        self._read(reset=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._read()


def timed_import(storage: Path, name: str, folder: Path, meta: Path) -> dict[str, float]:
    import subprocess

    started = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "lomas-admin"), "--storage-dir", str(storage), "dataset", "import", name,
                             str(folder), "--in-place", "--metadata", str(meta)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid) as memory:
        out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(err)
    return {"seconds": time.perf_counter() - started, "peak_mb": memory.peak,
            "progress_lines": sum(line.startswith("... checked part") for line in err.splitlines())}


def duckdb_runner(files: list[str]) -> Callable[[str], float]:
    """Times one plain DuckDB answer to a question."""
    import duckdb

    con = duckdb.connect()
    listed = "[" + ", ".join(f"'{f}'" for f in files) + "]"

    def run(question: str) -> float:
        started = time.perf_counter()
        con.execute(QUESTIONS[question][1].format(files=listed)).fetchall()
        return time.perf_counter() - started

    return run


def spark_runner(folder: Path, url: str, stack: ExitStack) -> Callable[[str], float]:
    """Times one plain Spark answer to a question, on a session kept open until the stack closes. It is not warmed
    here: it gets the same queries, in the same order, as the service's driver (see `service`)."""
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    spark = (SparkSession.builder.master(url).appName("plain").config("spark.driver.host", "127.0.0.1")
             .config("spark.driver.bindAddress", "127.0.0.1").config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false").config("spark.sql.shuffle.partitions", "2")
             # the cores the service's driver may take (tests/spark.py sets it): a like-for-like comparison
             .config("spark.cores.max", os.environ.get("LOMAS_SPARK_CORES_MAX", "2"))
             .getOrCreate())
    stack.callback(spark.stop)
    frame = spark.read.parquet(*[str(p) for p in sorted(folder.glob("*.parquet"))])
    runs = {"COUNT(*)": lambda: frame.agg(F.count(F.lit(1))).collect(),
            "grouped COUNT + AVG": lambda: frame.groupBy("cat").agg(F.count(F.lit(1)), F.avg("x")).collect()}

    def timed(question: str) -> float:
        started = time.perf_counter()
        runs[question]()
        return time.perf_counter() - started

    return timed


def service(storage: Path, root: Path, backends: list[str], spark_url: str | None, repeats: int, warmups: int,
            min_seconds: float, plain: dict[str, Callable[[str], float]]) -> dict[str, Any]:
    """Each backend's answers through the service, each beside the plain engine's answer to the same question
    (`plain`, by backend). Both sides get the same history, query by query: a cold query each, then `warmups`
    alternations, then `repeats` timed ones, or more (up to 4x) until the service's add up to `min_seconds` (one
    pair of a quick question is mostly noise). A JVM gets faster with every query it runs (Spark's executors were
    still speeding up after ten COUNT(*)s at 10^9 rows), so an executor that had run more queries, or other ones,
    would win by its JIT, not by what it computes; and a machine whose speed drifts during the run (this VM's
    does, by up to 3x between runs) slows both sides of a pair alike."""
    root.mkdir(parents=True, exist_ok=True)
    token = add_analyst(storage, "bench", {f"big_{b}": 1e6 for b in backends} | {"penguins": 1e6})
    env = {"JUPYTER_CONFIG_DIR": str(root / "config"), "JUPYTER_DATA_DIR": str(root / "data")}
    args = [f"--LomasApp.storage_dir={storage}", "--LomasApp.workers=1", "--LomasApp.pricing_workers=1",
            "--LomasApp.timing_padding=off", "--LomasApp.query_timeout=3600"]
    if spark_url:
        args.append(f"--LomasApp.spark_remote={spark_url}")
    session = requests.Session()
    session.headers["Authorization"] = f"token {token}"
    out: dict[str, Any] = {"backends": {}}
    launched = time.perf_counter()
    with ExitStack() as stack:
        url, pid = stack.enter_context(running_server("jupyter-lomas", args, root, env))
        first = session.post(url + "lomas/api/query", timeout=600, json={
            "dataset": "penguins", "sql": "SELECT COUNT(*) FROM penguins", "epsilon": 0.1, "fresh": True})
        assert first.status_code == 201, first.text
        out["cold_start_seconds"] = time.perf_counter() - launched

        def ask(name: str, sql: str) -> float:
            started = time.perf_counter()
            answer = session.post(url + "lomas/api/query", timeout=3600, json={
                "dataset": name, "sql": sql.format(t=name), "epsilon": 1.0, "fresh": True})
            if answer.status_code != 201:
                raise RuntimeError(answer.json().get("message", answer.text)[:200])
            return time.perf_counter() - started

        for backend in backends:
            name = f"big_{backend}"
            result: dict[str, Any] = {}
            with PeakMemory(pid) as memory, PeakMemory(pid, only_children=True) as workers:
                for question, (sql, _) in QUESTIONS.items():
                    times, plain_times = [], []
                    timed = slice(1 + warmups, None)
                    try:  # the plain engine's answer just before each of ours; a quick question gets more pairs
                        while len(times) < 1 + warmups + repeats or (
                                len(times) < 1 + warmups + 4 * repeats and sum(times[timed]) < min_seconds):
                            plain_times.append(plain[backend](question))
                            times.append(ask(name, sql))
                    except RuntimeError as err:
                        result[question] = {"error": str(err)}
                        continue
                    result[question] = {"cold": times[0], "plain_cold": plain_times[0], "pairs": len(times[timed]),
                                        "warm": statistics.median(times[timed]),
                                        "plain": statistics.median(plain_times[timed])}
            result["peak_mb"], result["workers_peak_mb"] = memory.peak, workers.peak
            out["backends"][backend] = result
            print(f"... {backend}: {result}", file=sys.stderr)
    return out


def plain_columns(out: dict[str, Any]) -> None:
    """The plain engines' warm times, from the pairs: DuckDB's beside the embedded backend (else OpenDP's plan),
    Spark's beside the Spark backend."""
    for column, sources in (("duckdb", ("embedded", "polars")), ("spark_plain", ("spark",))):
        for backend in sources:
            result = out["backends"].get(backend, {})
            if all("plain" in result.get(q, {}) for q in QUESTIONS):
                out[column] = {q: result[q]["plain"] for q in QUESTIONS}
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10**9)
    parser.add_argument("--parts", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed warm queries per question and backend")
    parser.add_argument("--min-seconds", type=float, default=20.0,
                        help="more timed pairs (up to 4x --repeats) until the service's add up to this")
    parser.add_argument("--warmups", type=int, default=3,
                        help="untimed queries per question and backend, after the cold one, on both sides")
    parser.add_argument("--backends", default="polars,embedded,spark",
                        help="comma-separated, run in this order: polars (OpenDP's plan: it is killed at about "
                        "200M rows on a 24 GB machine, so leave it out above that), embedded, spark (last: its "
                        "driver stays in the worker)")
    parser.add_argument("--data", type=Path, default=None, help="where the table is written (and reused)")
    parser.add_argument("--results", default="big", help="file stem in benchmarks/results")
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        folder = args.data or root / "table"
        files = generate(folder / f"rows-{args.rows}", args.rows, args.parts)
        table = Path(files[0]).parent
        storage = root / "storage"
        out: dict[str, Any] = {"rows": args.rows, "parts": args.parts, "warmups": args.warmups,
                               "repeats": args.repeats, "imports": {}}
        for backend in backends:
            meta = root / f"meta-{backend}.json"
            meta.write_text(json.dumps(metadata(args.rows, backend)))
            out["imports"][backend] = timed_import(storage, f"big_{backend}", table, meta)
        # the small demo table, for the time from launch to the first answer
        from lomas_jupyter_server.demo import penguins_csv, penguins_metadata

        (root / "penguins.json").write_text(json.dumps(penguins_metadata()))
        lomas_admin(storage, "dataset", "import", "penguins", str(penguins_csv()), "--metadata",
                    str(root / "penguins.json"))
        plain: dict[str, Callable[[str], float]] = {}
        if {"polars", "embedded"} & set(backends):
            plain["polars"] = plain["embedded"] = duckdb_runner(files)
        spark_url = None
        if "spark" in backends:
            cluster = SparkCluster(root / "spark").start()
            stack.callback(cluster.stop)
            spark_url = cluster.url
            plain["spark"] = spark_runner(table, spark_url, stack)
        out |= service(storage, root / "service", backends, spark_url, args.repeats, args.warmups,
                       args.min_seconds, plain)
        plain_columns(out)
    write(out, ROOT / "benchmarks" / "results" / args.results)
    print((ROOT / "benchmarks" / "results" / f"{args.results}.md").read_text())


def write(out: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    lines = [f"# {out['rows']:,} rows in {out['parts']} parquet parts", "",
             f"From `jupyter lomas` to its first answer: {out['cold_start_seconds']:.2f} s.", "",
             "## Warm query time (s), median", "",
             "| question | DuckDB, plain | Spark, plain | " + " | ".join(f"lomas: {b}" for b in out["backends"])
             + " |", "|---" * (3 + len(out["backends"])) + "|"]
    for question in QUESTIONS:
        cells = [f"{out[plain][question]:.3f}" if plain in out else "-" for plain in ("duckdb", "spark_plain")]
        for result in out["backends"].values():
            r = result[question]
            cells.append(r["error"] if "error" in r else f"{r['warm']:.3f} (cold {r['cold']:.2f})")
        lines.append(f"| {question} | " + " | ".join(cells) + " |")
    lines += ["", "## Ratios to the plain engine (warm)", "",
              f"Each lomas query followed the plain engine's answer to the same question, so both had run the same "
              f"queries (a cold one, {out['warmups']} untimed pairs, then at least {out['repeats']} "
              "timed pairs: a quick question gets more); the ratio is of the timed pairs' medians (in brackets: "
              "the plain engine's median, in seconds).",
              "",
              "| question | lomas embedded / DuckDB | lomas spark / plain Spark |", "|---|---|---|"]
    for question in QUESTIONS:
        cells = []
        for backend in ("embedded", "spark"):
            r = out["backends"].get(backend, {}).get(question, {})
            cells.append(f"{r['warm'] / r['plain']:.2f}x ({r['plain']:.3f})" if "warm" in r else "-")
        lines.append(f"| {question} | " + " | ".join(cells) + " |")
    lines += ["", "## Peak memory (MB) while each backend answered", "",
              "| backend | service + workers | workers |", "|---|---|---|"]
    for backend, result in out["backends"].items():
        lines.append(f"| {backend} | {result['peak_mb']:.0f} | {result['workers_peak_mb']:.0f} |")
    lines += ["", "## In-place import (checks streamed part by part)", "",
              "| dataset | seconds | peak MB | progress lines |", "|---|---|---|---|"]
    for backend, result in out["imports"].items():
        lines.append(f"| big_{backend} | {result['seconds']:.1f} | {result['peak_mb']:.0f} | "
                     f"{result['progress_lines']} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(out, stem.with_suffix(".png"))


def plot(out: dict[str, Any], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(QUESTIONS), figsize=(9, 3.6))
    for ax, question in zip(axes, QUESTIONS):
        plains = [(label, out[key][question]) for label, key in (("DuckDB", "duckdb"), ("Spark", "spark_plain"))
                  if key in out]
        labels, values = [label for label, _ in plains], [value for _, value in plains]
        for backend, result in out["backends"].items():
            if "warm" in result[question]:
                labels.append(f"lomas\n{backend}")
                values.append(result[question]["warm"])
        ax.bar(labels, values, color=["#999999"] * len(plains) + ["#4c72b0"] * (len(values) - len(plains)))
        ax.set_title(question)
        ax.set_ylabel("seconds (warm, median)")
    fig.suptitle(f"{out['rows']:,} rows; grey: the engine's plain exact answer, blue: a DP answer from lomas",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(target, dpi=110)


if __name__ == "__main__":
    main()
