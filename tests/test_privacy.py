"""Privacy of what is released, tested as an attacker would: for two neighbouring tables, no released number and
no pair of numbers may be a deterministic give-away. Runs the release worker's own entry points
(`preview_task` prices, `release_task` runs), so the flags and fills are the ones a real release uses."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from lomas_jupyter_server import engine
from lomas_jupyter_server.engine.metadata import parse_metadata
from lomas_jupyter_server.engine.sql import compile_sql

META_DOC: dict[str, Any] = {
    "privacy_unit": 1,
    "max_rows": 1_000,
    "columns": {
        "g": {"type": "string", "categories": ["a", "b", "c", "d"], "nullable": False},
        "x1": {"type": "int", "bounds": [0, 10]},  # nullable (the default): COUNT(x1) is its own statistic
        "x2": {"type": "int", "bounds": [0, 10]},
        "f": {"type": "float", "bounds": [0.0, 1.0]},
    },
}
META = parse_metadata(META_DOC)
RELEASES = 300
GROUPED = ("SELECT g, COUNT(*) AS n, COUNT(x1) AS c1, COUNT(x2) AS c2, SUM(x1) AS s1, SUM(x2) AS s2, "
           "AVG(x1) AS a1, AVG(x2) AS a2, AVG(f) AS af, VARIANCE(x1) AS v1, STDDEV_POP(f) AS sf "
           "FROM t {where} GROUP BY g")
UNGROUPED = "SELECT COUNT(*) AS n, COUNT(x1) AS c1, SUM(x1) AS s1, SUM(x2) AS s2, AVG(x1) AS a1 FROM t {where}"
MECHANISMS = [(engine.LAPLACE, 0.0), (engine.GAUSSIAN, 1e-6)]


def _table(path: Path, extra_d: int = 0) -> Path:
    """Groups a, b and c have rows, d has `extra_d` (0: a public key with no rows)."""
    rows = [(g, i % 11, (i * 7) % 11, (i % 5) / 4) for g in "abc" for i in range(30)]
    rows += [("d", 3, 8, 0.5)] * extra_d
    pl.DataFrame(rows, schema={"g": pl.String, "x1": pl.Int64, "x2": pl.Int64, "f": pl.Float64},
                 orient="row").write_parquet(path)
    return path


def _calibrated(sql: str, mechanism: str, delta: float) -> tuple[engine.Plan, engine.Calibrated]:
    plan = engine.Plan(compile_sql(sql, "t", META), META, engine.effective_bounds(META, None))
    return plan, plan.calibrate_mechanism(mechanism, 0.5, delta)


def _raw_releases(sql: str, path: Path, mechanism: str, delta: float) -> tuple[list[list[Any]], float]:
    """RELEASES releases of the raw noisy statistics (before any clamping), one flat list of cells each, and a
    bound on the chance that two independent noises of the query are equal."""
    plan, calibrated = _calibrated(sql, mechanism, delta)
    lf = pl.scan_parquet(path)
    cells = []
    for _ in range(RELEASES):
        raw = calibrated.release(lf)
        if plan.spec.group_by:
            raw = raw.sort(list(plan.spec.group_by))
        statistics = raw.select(f"__s{j}" for j in range(len(plan.statistics)))  # in the plan's order
        cells.append([v for row in statistics.rows() for v in row])
    return cells, _noise_equal_probability(plan.describe(calibrated))


def _releases(sql: str, path: Path, mechanism: str, delta: float) -> list[list[Any]]:
    """RELEASES answers as a user gets them, from the release worker's entry point, one flat list each."""
    plan, calibrated = _calibrated(sql, mechanism, delta)
    price = {"epsilon": calibrated.epsilon, "delta": calibrated.delta, "delta_target": calibrated.delta_target,
             "plan": plan.describe(calibrated)}
    spec = plan.spec.to_json()
    out = []
    for _ in range(RELEASES):
        answer = engine.release_task(spec, META_DOC, None, str(path), price)
        out.append([row[name] for row in answer["rows"] for name in answer["columns"] if name != "g"])
    return out


def _max_equal(cells: list[list[Any]], i: int, j: int) -> int:
    return sum(r[i] == r[j] for r in cells)


def _chance_bound(p: float, n: int = RELEASES) -> float:
    """n p + 5.3 sigma (+1): above this, equality is not chance (about one false failure in 20 million)."""
    return n * p + 5.3 * math.sqrt(n * p * (1 - p)) + 1


def _noise_equal_probability(described: dict[str, Any]) -> float:
    """An upper bound on P(two independent draws of the query's noises are equal): the largest probability mass
    of the least noisy integer noise (1 / (2 b) for a discrete Laplace of scale b, 1 / (sigma sqrt(2 pi)) for a
    discrete Gaussian); float noises are never equal by chance."""
    scales = [s["scale"] / (s["fixed_point_step"] or 1.0) for s in described["statistics"]]
    smallest = min(scales)
    return min(1.0, 1 / (2 * smallest) if described["mechanism"] == engine.LAPLACE
               else 1 / (smallest * math.sqrt(2 * math.pi)))


@pytest.mark.parametrize(("mechanism", "delta"), MECHANISMS)
@pytest.mark.parametrize("where", ["", "WHERE x1 > 100"])
def test_statistics_of_an_empty_group_are_independent(tmp_path: Path, mechanism: str, delta: float,
                                                      where: str) -> None:
    """The audit's attack: group d has no rows (or, with the WHERE, no group has any), so every statistic of
    its row is pure noise. No two of them may be equal more often than independent draws allow; before the
    fix, SUM(x1) == SUM(x2) and COUNT(*) == COUNT(x1) in every release."""
    cells, p = _raw_releases(GROUPED.format(where=where), _table(tmp_path / "t.parquet"), mechanism, delta)
    per_group = len(cells[0]) // 4  # statistics per group: four groups, in key order
    assert per_group * 4 == len(cells[0])
    empty_groups = range(4) if where else [3]
    for g in empty_groups:
        start = g * per_group
        for i, j in itertools.combinations(range(start, start + per_group), 2):
            assert _max_equal(cells, i, j) <= _chance_bound(p), (g, i - start, j - start)


@pytest.mark.parametrize(("mechanism", "delta"), MECHANISMS)
def test_ungrouped_statistics_on_no_rows_are_independent(tmp_path: Path, mechanism: str, delta: float) -> None:
    cells, p = _raw_releases(UNGROUPED.format(where="WHERE x1 > 100"), _table(tmp_path / "t.parquet"), mechanism,
                             delta)
    for i, j in itertools.combinations(range(len(cells[0])), 2):
        assert _max_equal(cells, i, j) <= _chance_bound(p), (i, j)


def _relations(cells: list[list[Any]]) -> dict[tuple[str, int, int], float]:
    """How often each simple deterministic relation holds: a cell equal to its most common value, two cells
    equal, two cells at their most common difference."""
    n = len(cells)
    out: dict[tuple[str, int, int], float] = {}
    width = len(cells[0])
    for i in range(width):
        values = [round(r[i], 9) for r in cells]
        out["constant", i, i] = max(values.count(v) for v in set(values)) / n
    for i, j in itertools.combinations(range(width), 2):
        out["equal", i, j] = sum(r[i] == r[j] for r in cells) / n
        gaps = [round(r[i] - r[j], 9) for r in cells]
        out["offset", i, j] = max(gaps.count(v) for v in set(gaps)) / n
    return out


@pytest.mark.parametrize(("mechanism", "delta"), MECHANISMS)
def test_neighbouring_tables_show_no_deterministic_difference(tmp_path: Path, mechanism: str, delta: float) -> None:
    """Tables that differ in one row (of group d). For every cell and every pair of cells, a relation that
    always holds on one table and never on the other would tell them apart; ε = 0.5 bounds how far the two
    frequencies of any event may drift (a factor e^ε, plus sampling error), and none may be certain."""
    sql = GROUPED.format(where="")
    without = _releases(sql, _table(tmp_path / "without.parquet"), mechanism, delta)
    with_one = _releases(sql, _table(tmp_path / "with.parquet", extra_d=1), mechanism, delta)
    rel_without, rel_with = _relations(without), _relations(with_one)
    factor = math.exp(0.5)
    for key, p in rel_without.items():
        q = rel_with[key]
        assert max(p, q) < 0.9, (key, p, q)  # no relation is near-certain on either table
        # DP: each frequency is within e^ε of the other's (plus delta), up to sampling error of 300 draws
        slack = 5.3 * math.sqrt(max(p, q, 1 / RELEASES) / RELEASES) + delta
        assert p <= factor * q + slack and q <= factor * p + slack, (key, p, q)


@pytest.mark.parametrize(("mechanism", "delta"), MECHANISMS)
def test_quantiles_of_an_empty_group_are_independent(tmp_path: Path, mechanism: str, delta: float) -> None:
    """Quantiles run as their own part, collected by OpenDP: in a group with no rows every candidate scores
    the same, so each median is a uniform draw over the candidates, and two of them agree 1 time in k."""
    sql = "SELECT g, COUNT(*) AS n, MEDIAN(x1) AS m1, MEDIAN(x2) AS m2, COUNT(x1) AS c1 FROM t GROUP BY g"
    plan, _ = _calibrated(sql, mechanism, delta)
    assert [kind for kind, _ in plan.parts] == [engine.PLAIN, engine.QUANTILES]
    cells, p_noise = _raw_releases(sql, _table(tmp_path / "t.parquet"), mechanism, delta)
    candidates = len(engine.quantile_candidates(META.column("x1"), plan.bounds))
    per_group = len(cells[0]) // 4  # four groups, in key order
    assert per_group == len(plan.statistics)
    names = [f"__s{j}" for j in range(per_group)]
    start = 3 * per_group
    for i, j in itertools.combinations(range(per_group), 2):
        quantiles = {plan.statistics[k].kind for k in (i, j)} == {"quantile"}
        p = 1 / candidates if quantiles else p_noise
        assert _max_equal(cells, start + i, start + j) <= _chance_bound(p), (names[i], names[j])


@pytest.mark.parametrize(("mechanism", "delta"), MECHANISMS)
def test_a_case_band_with_no_rows_releases_independent_noise(tmp_path: Path, mechanism: str, delta: float) -> None:
    """Issue 21's new statistics in a group that no row reaches (a CASE band whose condition never holds):
    distinct counts and sums of derived values must be independent draws too, not one shared noise."""
    sql = ("SELECT CASE WHEN x1 > 100 THEN 'never' WHEN g = 'a' THEN 'A' ELSE 'rest' END AS band, COUNT(*) AS n, "
           "COUNT(DISTINCT x1) AS d1, COUNT(DISTINCT x2) AS d2, SUM(x1 * 2) AS s1, SUM(x2 * 2) AS s2 "
           "FROM t GROUP BY band")
    cells, p = _raw_releases(sql, _table(tmp_path / "t.parquet"), mechanism, delta)
    per_group = len(cells[0]) // 3
    empty = sorted(["never", "A", "rest"]).index("never")  # rows come sorted by the band's label
    start = empty * per_group
    for i, j in itertools.combinations(range(start, start + per_group), 2):
        assert _max_equal(cells, i, j) <= _chance_bound(p), (i - start, j - start)
