"""The benchmark scripts, run once on tiny sizes so they cannot rot (their figures come from full runs by hand:
see the README's Benchmarks section). Nothing here is timed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_trust_boundary_benchmark_runs_every_experiment(tmp_path: Path) -> None:
    out = tmp_path / "trust-boundary.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trust_boundary.py"), "--rows", "20000", "--seconds",
                    "1", "--pairs", "2", "--clients", "1", "--out", str(out)], check=True, capture_output=True,
                   text=True, timeout=900)
    text = out.read_text()
    for experiment in ("100% vs 10% of rows", "all vs none, with SUM and AVG", "one row vs none",
                       "Free requests against someone else's query", "10^9-group query refused (400)"):
        assert experiment in text, text
    # the attacker's free requests were answered (a grant was needed and given), not refused
    assert "preview 200" in text and "dummy 200" in text


def test_the_engine_benchmark_runs_every_configuration() -> None:
    """benchmarks/run.py had rotted (it unpacked what calibrate used to return) without anyone noticing."""
    results = ROOT / "benchmarks" / "results"
    try:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--rows", "20000", "--repeats", "2",
                        "--naive-repeats", "1", "--clients", "2", "--load-seconds", "2", "--results", "ci-tiny"],
                       check=True, capture_output=True, text=True, timeout=900)
        text = (results / "ci-tiny.md").read_text()
        for configuration in ("1 plain polars", "2 OpenDP exec only", "3 OpenDP naive", "4a service: warm query",
                              "4b service: preview", "4c service: replay"):
            assert configuration in text, text
        assert (results / "ci-tiny.png").stat().st_size > 0
    finally:
        for leftover in (results / "ci-tiny.md", results / "ci-tiny.png"):
            leftover.unlink(missing_ok=True)


def test_the_replicas_benchmark_runs_every_configuration() -> None:
    results = ROOT / "benchmarks" / "results"
    try:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "replicas.py"), "--queries", "6", "--clients", "2",
                        "--store-repeats", "5", "--configs", "sqlite:1,postgresql:2", "--results", "ci-tiny-replicas"],
                       check=True, capture_output=True, text=True, timeout=900)
        text = (results / "ci-tiny-replicas.md").read_text()
        assert "| sqlite | 1 | 2 | 6 |" in text and "| postgresql | 2 | 2 | 6 |" in text, text
        assert "The store's latency per charged query" in text and "| postgresql |" in text
        assert (results / "ci-tiny-replicas.png").stat().st_size > 0
    finally:
        for suffix in (".md", ".png", ".json"):
            (results / f"ci-tiny-replicas{suffix}").unlink(missing_ok=True)


def test_the_big_table_benchmark_runs_every_backend_and_the_plain_engines() -> None:
    """benchmarks/big.py on a tiny table: each backend answers through the service, DuckDB and Spark (a standalone
    cluster) answer plainly, the import streams with progress, and the cold start is measured."""
    with _tiny_run("big.py", "ci-tiny-big", "--rows", "20000", "--parts", "2", "--repeats", "1",
                   timeout=1200) as results:
        out = json.loads((results / "ci-tiny-big.json").read_text())
        assert set(out["backends"]) == {"polars", "embedded", "spark"}
        for backend, result in out["backends"].items():
            for question in ("COUNT(*)", "grouped COUNT + AVG"):
                assert result[question]["warm"] > 0, (backend, result)
        assert all(i["progress_lines"] == 2 for i in out["imports"].values())
        assert out["cold_start_seconds"] > 0 and set(out["duckdb"]) == set(out["spark_plain"])
        assert "lomas embedded / DuckDB" in (results / "ci-tiny-big.md").read_text()
        assert (results / "ci-tiny-big.png").stat().st_size > 0


@contextmanager
def _tiny_run(script: str, stem: str, *args: str, timeout: float = 900) -> Iterator[Path]:
    """Run a benchmark script with its results under `stem`; yields the results folder, and removes them after."""
    results = ROOT / "benchmarks" / "results"
    try:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--results", stem],
                       check=True, capture_output=True, text=True, timeout=timeout)
        yield results
    finally:
        for leftover in results.glob(f"{stem}.*"):
            leftover.unlink()


def test_the_accuracy_benchmark_runs() -> None:
    with _tiny_run("accuracy.py", "ci-tiny-accuracy", "--releases", "3") as results:
        text = (results / "ci-tiny-accuracy.md").read_text()
        for kind in ("| COUNT(*) |", "| SUM(float col) |", "| AVG(col), n=342 |"):
            assert kind in text, text
        assert (results / "ci-tiny-accuracy.png").stat().st_size > 0


def test_the_class_benchmark_runs_through_a_real_hub() -> None:
    import os

    from .hubs import hub_unavailable

    if hub_unavailable() is not None:
        if os.environ.get("CI") == "true":
            raise AssertionError(hub_unavailable())
        import pytest

        pytest.skip(hub_unavailable() or "")
    with _tiny_run("hub_class.py", "ci-tiny-hub-class", "--students", "3", timeout=1200) as results:
        text = (results / "ci-tiny-hub-class.md").read_text()
        assert "within" in text and "students over their grant: 0" in text, text
