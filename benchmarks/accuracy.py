"""Accuracy per unit of epsilon: our engine versus OpenDP's Context API (a careful user's baseline) and versus
our previous engine's mechanisms, on the same data. Writes benchmarks/results/accuracy.md and accuracy.png.

    .venv/bin/python benchmarks/accuracy.py                 # 300 releases per cell, about 4 minutes
    .venv/bin/python benchmarks/accuracy.py --releases 100  # quicker, noisier

RMSE is against the SQL answer (nulls ignored; values clipped to the public bounds, which is what every method
here estimates). "before" re-creates the previous engine's formulas: SUM filled nulls with the lower bound when
0 lay outside the bounds, AVG shifted by the lower bound, every aggregate was its own noisy part, quantiles
filled nulls with the middle candidate, and only Laplace noise was used.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import opendp.prelude as dp
import polars as pl

from lomas_jupyter_server import engine
from lomas_jupyter_server.demo import penguins_csv, penguins_metadata
from lomas_jupyter_server.engine.metadata import DatasetMetadata, parse_metadata
from lomas_jupyter_server.engine.sql import compile_sql

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA = HERE / "data"
EPSILONS = [0.3, 1.0, 3.0]
DELTA = 1e-6

dp.enable_features("contrib")


@dataclass
class Table:
    name: str
    metadata: DatasetMetadata
    path: Path
    frame: pl.DataFrame


def penguins() -> Table:
    meta = parse_metadata(penguins_metadata())
    schema = engine.polars_schema(meta)
    frame = pl.read_csv(penguins_csv(), null_values="NA").select(
        [pl.col(name).cast(dtype) for name, dtype in schema.items()])
    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / "accuracy-penguins.parquet"
    frame.write_parquet(path)
    return Table("penguins", meta, path, frame)


def large() -> Table:
    """20,000 rows, a float with 10% nulls and values past its bounds: AVG at large n."""
    rng = np.random.default_rng(20)
    n = 20_000
    x = rng.normal(50, 20, n)
    frame = pl.DataFrame({"x": [None if rng.random() < 0.1 else float(v) for v in x]}, schema={"x": pl.Float64})
    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / "accuracy-large.parquet"
    frame.write_parquet(path)
    meta = parse_metadata({"privacy_unit": 1, "max_rows": 100_000,
                           "columns": {"x": {"type": "float", "bounds": [0.0, 100.0]}}})
    return Table("large", meta, path, frame)


def clipped(table: Table, column: str) -> pl.Expr:
    lo, hi = table.metadata.column(column).bounds  # type: ignore[union-attr]
    return pl.col(column).clip(lo, hi)


# --- the three ways to answer ------------------------------------------------------------------------------


def ours(table: Table, sql: str, epsilon: float, delta: float) -> Callable[[], dict[str, Any]]:
    plan = engine.Plan(compile_sql(sql, table.name, table.metadata), table.metadata,
                       engine.effective_bounds(table.metadata, None))
    calibrated = plan.calibrate(epsilon, delta)
    described, tables = plan.describe(calibrated), plan.interval_tables(calibrated)
    lf = pl.scan_parquet(table.path)

    def release() -> dict[str, Any]:
        out = plan.postprocess(calibrated.release(lf), described, tables)
        return {"rows": out["rows"], "intervals": out["intervals"], "mechanism": calibrated.mechanism}

    return release


def opendp_context(table: Table, exprs: list[pl.Expr], epsilon: float, pre: Callable[[Any], Any] | None = None
                   ) -> Callable[[], dict[str, Any]]:
    """A careful Context API user: one query per statistic, the budget split evenly, resolved once (the same
    measurement Context would run each time)."""
    ctx = dp.Context.compositor(
        data=pl.scan_parquet(table.path),
        privacy_unit=dp.unit_of(contributions=table.metadata.privacy_unit),
        privacy_loss=dp.loss_of(epsilon=epsilon),
        split_evenly_over=len(exprs),
        margins=[dp.polars.Margin(by=[], max_length=table.metadata.max_rows)],
    )
    measurements = []
    for expr in exprs:
        query = ctx.query()
        if pre is not None:
            query = pre(query)
        measurements.append(query.select(expr).resolve())
    lf = pl.scan_parquet(table.path)

    def release() -> dict[str, Any]:
        row: dict[str, Any] = {}
        for m in measurements:
            row |= m(lf).collect().to_dicts()[0]
        return {"rows": [row]}

    return release


def before(table: Table, exprs: list[pl.Expr], epsilon: float) -> Callable[[], dict[str, Any]]:
    """The previous engine: all parts in one plan, Laplace, the scale that spends exactly epsilon."""
    domain = engine.input_domain(compile_sql(f"SELECT COUNT(*) FROM {table.name}", table.name, table.metadata),
                                 table.metadata)
    plan = pl.LazyFrame(schema=engine.polars_schema(table.metadata)).select(exprs)

    def build(scale: float) -> Any:
        return dp.polars.make_private_lazyframe(domain, dp.symmetric_distance(), dp.max_divergence(), plan,
                                                global_scale=scale)

    scale = dp.binary_search_param(build, d_in=table.metadata.privacy_unit, d_out=epsilon, T=float)
    measurement = build(scale)
    lf = pl.scan_parquet(table.path)
    return lambda: {"rows": measurement(lf).collect().to_dicts()}


# --- the aggregate kinds -----------------------------------------------------------------------------------


@dataclass
class Kind:
    label: str
    table: Table
    sql: str
    output: str  # the output column measured
    truth: float | dict[Any, float]  # a number, or per group
    context: Callable[[float], Callable[[], dict[str, Any]]] | None
    previous: Callable[[float], Callable[[], dict[str, Any]]] | None
    context_value: Callable[[dict[str, Any]], float] | None = None
    before_value: Callable[[dict[str, Any]], float] | None = None
    delta: float = 0.0
    group: str | None = None


def kinds(p: Table, big: Table) -> list[Kind]:
    mass, flipper = "body_mass_g", "flipper_length_mm"
    truth = p.frame.select(
        pl.len().alias("n"), pl.col(mass).count().alias("c"), clipped(p, mass).sum().alias("s"),
        clipped(p, mass).mean().alias("m"), pl.col(flipper).drop_nulls().median().alias("med"),
        clipped(p, "bill_length_mm").sum().alias("bill"),
    ).to_dicts()[0]
    big_mean = big.frame.select(clipped(big, "x").mean()).item()
    candidates = engine.quantile_candidates(p.metadata.column(flipper), engine.effective_bounds(p.metadata, None))  # type: ignore[arg-type]
    m = pl.col(mass)
    not_null = lambda q: q.filter(pl.col(mass).is_not_null())  # noqa: E731
    groups = ["species", "island", "sex"]
    grouped_truth = {
        (r["species"], r["island"], r["sex"]): r["m"]
        for r in p.frame.group_by(groups).agg(clipped(p, mass).mean().alias("m"), pl.col(mass).count().alias("c"))
        .filter(pl.col("c") >= 20).to_dicts()
    }
    species_truth = {(r["species"],): r["m"] for r in p.frame.group_by("species").agg(clipped(p, mass).mean()
                                                                                      .alias("m")).to_dicts()}
    measured = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", mass]
    # COUNT(x), SUM(x), AVG(x): a Context user needs a count and a sum; the previous engine released four parts
    three = f"SELECT COUNT({mass}) AS c, SUM({mass}) AS s, AVG({mass}) AS a FROM penguins"

    def three_context(e: float) -> Callable[[], dict[str, Any]]:
        return opendp_context(p, [m.dp.count(signed=True).alias("c"),
                                  m.clip(2500, 6500).fill_null(0).dp.sum((0, 6500)).alias("s")], e)

    def three_before(e: float) -> Callable[[], dict[str, Any]]:
        return before(p, [m.dp.count(signed=True).alias("c"), m.fill_null(2500).dp.sum((2500, 6500)).alias("s"),
                          (m - 2500).fill_null(0).dp.sum((0, 4000)).alias("as"), m.dp.count(signed=True).alias("ac")],
                      e)

    return [
        Kind("COUNT(*)", p, "SELECT COUNT(*) AS v FROM penguins", "v", truth["n"],
             lambda e: opendp_context(p, [dp.len(signed=True).alias("v")], e),
             lambda e: before(p, [dp.len(signed=True).alias("v")], e)),
        Kind("COUNT(col)", p, f"SELECT COUNT({mass}) AS v FROM penguins", "v", truth["c"],
             lambda e: opendp_context(p, [m.dp.count(signed=True).alias("v")], e),
             lambda e: before(p, [m.dp.count(signed=True).alias("v")], e)),
        Kind("SUM(col), nulls, 0 outside bounds", p, f"SELECT SUM({mass}) AS v FROM penguins", "v", truth["s"],
             lambda e: opendp_context(p, [m.clip(2500, 6500).fill_null(0).dp.sum((0, 6500)).alias("v")], e),
             lambda e: before(p, [m.fill_null(2500).dp.sum((2500, 6500)).alias("v")], e)),
        Kind("SUM(float col)", p, "SELECT SUM(bill_length_mm) AS v FROM penguins", "v", truth["bill"],
             lambda e: opendp_context(p, [pl.col("bill_length_mm").clip(30.0, 60.0).fill_null(0.0)
                                          .dp.sum((0.0, 60.0)).alias("v")], e),
             lambda e: before(p, [pl.col("bill_length_mm").fill_null(30.0).dp.sum((30.0, 60.0)).alias("v")], e)),
        Kind("AVG(col), n=342", p, f"SELECT AVG({mass}) AS v FROM penguins", "v", truth["m"],
             lambda e: opendp_context(p, [m.dp.mean((2500, 6500)).alias("v")], e, pre=not_null),
             lambda e: before(p, [(m - 2500).fill_null(0).dp.sum((0, 4000)).alias("s"),
                                  m.dp.count(signed=True).alias("c")], e),
             before_value=lambda r: 2500 + r["s"] / max(r["c"], 1)),
        Kind("AVG(col), n=18,000", big, "SELECT AVG(x) AS v FROM large", "v", big_mean,
             lambda e: opendp_context(big, [pl.col("x").dp.mean((0.0, 100.0)).alias("v")], e,
                                      pre=lambda q: q.filter(pl.col("x").is_not_null())),
             lambda e: before(big, [(pl.col("x") - 0.0).fill_null(0.0).dp.sum((0.0, 100.0)).alias("s"),
                                    pl.col("x").dp.count(signed=True).alias("c")], e),
             before_value=lambda r: r["s"] / max(r["c"], 1)),
        Kind("SUM in COUNT+SUM+AVG", p, three, "s", truth["s"], three_context, three_before,
             context_value=lambda r: r["s"]),
        Kind("AVG in COUNT+SUM+AVG", p, three, "a", truth["m"], three_context, three_before,
             context_value=lambda r: min(max(r["s"] / max(r["c"], 1), 2500), 6500),
             before_value=lambda r: 2500 + r["as"] / max(r["ac"], 1)),
        Kind("MEDIAN(col)", p, f"SELECT MEDIAN({flipper}) AS v FROM penguins", "v", truth["med"],
             lambda e: opendp_context(p, [pl.col(flipper).drop_nulls().dp.quantile(0.5, candidates).alias("v")], e),
             lambda e: before(p, [pl.col(flipper).fill_null(candidates[len(candidates) // 2])
                                  .dp.quantile(0.5, candidates).alias("v")], e)),
        Kind(f"AVG of 13 statistics, delta={DELTA:g}", p,
             "SELECT species, island, sex, COUNT(*) AS n, "
             + ", ".join(f"AVG({c}) AS a_{c}, MEDIAN({c}) AS m_{c}" for c in measured)
             + " FROM penguins GROUP BY species, island, sex", f"a_{mass}", grouped_truth, None, None, delta=DELTA,
             group="species,island,sex"),
        Kind(f"AVG of 21 statistics, delta={DELTA:g}", p,
             "SELECT species, COUNT(*) AS n, "
             + ", ".join(f"AVG({c}) AS a_{c}, MEDIAN({c}) AS m_{c}, PERCENTILE_CONT(0.25) WITHIN GROUP (ORDER BY {c})"
                         f" AS q1_{c}, PERCENTILE_CONT(0.75) WITHIN GROUP (ORDER BY {c}) AS q3_{c}" for c in measured)
             + " FROM penguins GROUP BY species", f"a_{mass}", species_truth, None, None, delta=DELTA,
             group="species"),
    ]


def _value(row: dict[str, Any], kind: Kind, fn: Callable[[dict[str, Any]], float] | None) -> float:
    return float(fn(row) if fn else row[kind.output])


def measure(kind: Kind, epsilon: float, releases: int) -> dict[str, Any]:
    result: dict[str, Any] = {"kind": kind.label, "epsilon": epsilon}
    run = ours(kind.table, kind.sql, epsilon, kind.delta)
    errors, covered, mechanism = [], 0, ""
    for _ in range(releases):
        out = run()
        mechanism = out["mechanism"]
        for row, interval in zip(out["rows"], out["intervals"]):
            key = tuple(row[g] for g in kind.group.split(",")) if kind.group else None
            truth = kind.truth.get(key) if isinstance(kind.truth, dict) else kind.truth
            if truth is None:
                continue
            errors.append(row[kind.output] - truth)
            bounds = interval.get(kind.output)
            covered += bool(bounds) and bounds[0] <= truth <= bounds[1]
    result["ours"] = math.sqrt(np.mean(np.square(errors)))
    result["coverage"] = covered / len(errors) if "MEDIAN" not in kind.label else None
    result["mechanism"] = mechanism
    if kind.group:  # the same query, pure DP: what the previous engine's Laplace-only choice gives
        run = ours(kind.table, kind.sql, epsilon, 0.0)
        errs = []
        for _ in range(releases):
            for row in run()["rows"]:
                truth = kind.truth.get(tuple(row[g] for g in kind.group.split(",")))  # type: ignore[union-attr]
                if truth is not None:
                    errs.append(row[kind.output] - truth)
        result["before"] = math.sqrt(np.mean(np.square(errs)))
    for name, factory, fn in (("context", kind.context, kind.context_value),
                              ("before", kind.previous, kind.before_value)):
        if factory is None:
            continue
        run_other = factory(epsilon)
        errs = [_value(run_other()["rows"][0], kind, fn) - kind.truth for _ in range(releases)]  # type: ignore[operator]
        result[name] = math.sqrt(np.mean(np.square(errs)))
    return result


def write(results: list[dict[str, Any]], releases: int, seconds: float, stem: str = "accuracy") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Accuracy: RMSE per aggregate kind and epsilon",
        "",
        f"`benchmarks/accuracy.py --releases {releases}` ({seconds:.0f} s). RMSE against the SQL answer over "
        f"{releases} releases per cell (about ±{100 / math.sqrt(2 * releases):.0f}% sampling error). "
        "Context = OpenDP's Context API used carefully (budget split evenly over the statistics it needs); "
        "before = our previous engine's mechanisms (for the rows with δ: the same query with Laplace only, as "
        "before). Coverage = share of our 95% intervals that held the truth. Grouped rows: AVG(body_mass_g) in "
        "groups of at least 20 penguins.",
        "",
        "| kind | ε | ours | OpenDP Context | before | ours / Context | ours / before | coverage | mechanism |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:,.4g}"

    for r in results:
        ctx, prev = r.get("context"), r.get("before")
        lines.append(
            f"| {r['kind']} | {r['epsilon']:g} | {fmt(r['ours'])} | {fmt(ctx)} | {fmt(prev)} | "
            f"{fmt(r['ours'] / ctx) if ctx else 'n/a'} | {fmt(r['ours'] / prev) if prev else 'n/a'} | "
            f"{'n/a' if r['coverage'] is None else format(r['coverage'], '.3f')} | {r['mechanism']} |"
        )
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return
    labels = list(dict.fromkeys(r["kind"] for r in results))
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(labels) / cols), cols, figsize=(16, 3.4 * math.ceil(len(labels) / cols)))
    for ax, label in zip(axes.flat, labels):
        rows = [r for r in results if r["kind"] == label]
        eps = [r["epsilon"] for r in rows]
        for key, style, color in (("ours", "o-", "C0"), ("context", "s--", "C1"), ("before", "^:", "C2")):
            if all(r.get(key) is not None for r in rows):
                ax.plot(eps, [r[key] for r in rows], style, color=color,
                        label={"context": "OpenDP Context"}.get(key, key))
        ax.set_xscale("log")
        ax.set_xticks(EPSILONS, [f"{e:g}" for e in EPSILONS])
        ax.minorticks_off()
        if all(r[k] > 0 for r in rows for k in ("ours", "context", "before") if r.get(k) is not None):
            ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("ε")
        ax.set_ylabel("RMSE")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=110)
    print(f"wrote {RESULTS / stem}.md and {stem}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--releases", type=int, default=300)
    parser.add_argument("--results", default="accuracy", help="file stem in benchmarks/results")
    args = parser.parse_args()
    started = time.monotonic()
    results = []
    all_kinds = kinds(penguins(), large())
    for i, kind in enumerate(all_kinds, 1):
        for epsilon in EPSILONS:
            print(f"[{i}/{len(all_kinds)}] {kind.label} at ε={epsilon:g} ...", file=sys.stderr, flush=True)
            results.append(measure(kind, epsilon, args.releases))
    write(results, args.releases, time.monotonic() - started, args.results)


if __name__ == "__main__":
    main()
