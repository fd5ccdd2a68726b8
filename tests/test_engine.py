"""The engine: the charge is OpenDP's privacy map, and the 95% intervals cover the truth about 95% of the time."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from lomas_jupyter_server import engine
from lomas_jupyter_server.demo import penguins_metadata
from lomas_jupyter_server.metadata import parse_metadata
from lomas_jupyter_server.sql import compile_sql

PENGUINS = parse_metadata(penguins_metadata())

QUERIES = [
    "SELECT COUNT(*) FROM penguins",
    "SELECT species, COUNT(*) AS n, AVG(bill_length_mm) AS m FROM penguins GROUP BY species",
    "SELECT island, year, SUM(body_mass_g), COUNT(sex) FROM penguins WHERE sex = 'female' GROUP BY island, year",
    "SELECT MEDIAN(flipper_length_mm), PERCENTILE_CONT(0.25) WITHIN GROUP (ORDER BY bill_depth_mm) FROM penguins",
]


@pytest.mark.parametrize("sql", QUERIES)
@pytest.mark.parametrize("epsilon", [0.1, 1.0, 3.7])
def test_charge_is_the_privacy_map_and_never_above_target(sql: str, epsilon: float) -> None:
    plan = engine.Plan(compile_sql(sql, "penguins", PENGUINS), PENGUINS, engine.effective_bounds(PENGUINS, None))
    measurement, scale, charged = plan.calibrate(epsilon)
    assert charged == measurement.map(PENGUINS.privacy_unit)
    assert charged <= epsilon
    assert charged == pytest.approx(epsilon, rel=1e-9)  # and not wastefully below it
    # the same scale rebuilt gives the same charge (what the release worker relies on)
    assert plan.cost(plan.measurement(scale)) == charged
    # a hair less noise would cost more than the target: the calibration is tight
    assert plan.cost(plan.measurement(scale * (1 - 1e-6))) > epsilon


def test_privacy_unit_scales_the_charge() -> None:
    doc = penguins_metadata() | {"privacy_unit": 3}
    meta = parse_metadata(doc)
    plan = engine.Plan(compile_sql("SELECT COUNT(*) FROM penguins", "penguins", meta), meta, {})
    measurement = plan.measurement(10.0)
    assert plan.cost(measurement) == pytest.approx(3 * measurement.map(1))


def test_bounds_may_narrow_but_not_widen() -> None:
    assert engine.effective_bounds(PENGUINS, {"bill_length_mm": [35, 50]})["bill_length_mm"] == (35.0, 50.0)
    with pytest.raises(Exception, match="may only narrow"):
        engine.effective_bounds(PENGUINS, {"bill_length_mm": [0, 100]})
    with pytest.raises(Exception, match="no public bounds"):
        engine.effective_bounds(PENGUINS, {"species": [0, 1]})


def test_preview_needs_no_data_path() -> None:
    """preview_task gets metadata only: it has no way to reach the data."""
    spec = compile_sql("SELECT species, AVG(bill_length_mm) FROM penguins GROUP BY species", "penguins", PENGUINS)
    preview = engine.preview_task(spec.to_json(), PENGUINS.to_json(), 0.5, None)
    assert preview["epsilon"] <= 0.5
    (agg,) = preview["aggregates"]
    assert agg["kind"] == "avg" and agg["scale"]["count"] > 0 and "Laplace" in agg["mechanism"]


# --- statistical coverage ----------------------------------------------------------------------------------

KNOWN_META = parse_metadata(
    {
        "privacy_unit": 1,
        "max_rows": 10_000,
        "columns": {
            "g": {"type": "string", "categories": ["a", "b"], "nullable": False},
            "x": {"type": "float", "bounds": [0.0, 10.0], "nullable": False},
        },
    }
)


def _discrete_laplace_coverage(scale: float, accuracy: float) -> float:
    """P(|Z| <= accuracy) for Z discrete Laplace with P(Z=k) proportional to exp(-|k|/scale)."""
    q = math.exp(-1.0 / scale)
    k = math.floor(accuracy)
    return 1 - 2 * q ** (k + 1) / (1 + q)


def test_intervals_cover_the_truth_about_95_percent(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n_a, n_b = 700, 300
    frame = pl.DataFrame({"g": ["a"] * n_a + ["b"] * n_b, "x": rng.uniform(0, 10, n_a + n_b)})
    path = tmp_path / "known.parquet"
    frame.write_parquet(path)
    truth = {r["g"]: r for r in frame.group_by("g").agg(pl.len().alias("n"), pl.col("x").sum().alias("s"),
                                                          pl.col("x").mean().alias("m")).to_dicts()}
    spec = compile_sql("SELECT g, COUNT(*) AS n, SUM(x) AS s, AVG(x) AS m FROM t GROUP BY g", "t", KNOWN_META)
    plan = engine.Plan(spec, KNOWN_META, engine.effective_bounds(KNOWN_META, None))
    measurement, _, _ = plan.calibrate(0.3)
    described = plan.describe(measurement)
    releases = 1000
    hits = {"n": 0, "s": 0, "m": 0}
    for _ in range(releases):
        out = plan.postprocess(measurement(pl.scan_parquet(path)).collect(), described)
        row, interval = out["rows"][0], out["intervals"][0]  # group "a"
        assert row["g"] == "a"
        for name in hits:
            low, high = interval[name]
            hits[name] += low <= truth["a"][name] <= high

    def sigma(p: float) -> float:
        return math.sqrt(p * (1 - p) / releases)

    count_info = described[0]
    p_count = _discrete_laplace_coverage(count_info["scale"], count_info["accuracy"])
    assert 0.95 <= p_count < 0.97
    # 5 sigma: a false failure about once in 3 million runs
    assert abs(hits["n"] / releases - p_count) < 5 * sigma(p_count), hits
    assert abs(hits["s"] / releases - 0.95) < 5 * sigma(0.95), hits
    # the mean's interval is a union bound over two noises: at least 95%, typically more
    assert hits["m"] / releases >= 0.95 - 5 * sigma(0.95), hits


@pytest.mark.parametrize("sql", QUERIES[:3])
def test_closed_form_matches_opendps_own_search(sql: str) -> None:
    """Our closed-form scale is the one OpenDP's binary search finds (what Context.query().resolve() does)."""
    import opendp.prelude as dp

    plan = engine.Plan(compile_sql(sql, "penguins", PENGUINS), PENGUINS, engine.effective_bounds(PENGUINS, None))
    _, scale, charged = plan.calibrate(0.7)
    searched = dp.binary_search_param(plan.measurement, d_in=PENGUINS.privacy_unit, d_out=0.7, T=float)
    assert scale == pytest.approx(searched, rel=1e-6)
    assert charged <= 0.7 and plan.cost(plan.measurement(searched)) <= 0.7
