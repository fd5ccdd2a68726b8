"""Issue 21.4: GROUP BY a column without public categories. Which of its values occur is private, so a group is
released only where its noisy count clears a threshold, which costs delta; without delta the query is refused.
The charge is OpenDP's privacy map of the thresholded plan, and a key that only one row holds is (almost) never
released: its presence would tell a neighbouring table from the other."""

from __future__ import annotations

import base64
import io
import math

import polars as pl
import pytest

from lomas_jupyter.client import Release
from lomas_jupyter.display import preview_text, release_text
from lomas_jupyter_server.demo import penguins_csv, penguins_metadata
from lomas_jupyter_server.engine.exact import compile_stage
from lomas_jupyter_server.engine.metadata import effective_bounds, parse_metadata
from lomas_jupyter_server.engine.plan import Plan
from lomas_jupyter_server.engine.sql import compile_sql
from lomas_jupyter_server.errors import QueryRejected

META = parse_metadata({
    "privacy_unit": 1,
    "max_rows": 10_000,
    "columns": {
        "country": {"type": "string", "nullable": False},  # no categories: its values are private
        "zone": {"type": "int", "bounds": [0, 9], "nullable": False},  # an int without categories, likewise
        "sex": {"type": "string", "categories": ["F", "M"], "nullable": False},
        "income": {"type": "float", "bounds": [0.0, 100.0], "nullable": False},
    },
})
SIZES = {"US": 1500, "MX": 900, "DE": 600}  # 100+ rows in each (country, zone) of F rows


def table(extra: dict[str, int] | None = None) -> pl.DataFrame:
    """Each country's rows, incomes cycling over 0..99; `extra` adds rows (a neighbouring table)."""
    countries = [c for c, n in (SIZES | (extra or {})).items() for _ in range(n)]
    base = sum(SIZES.values())
    return pl.DataFrame({
        "country": countries,
        "zone": [i % 3 for i in range(len(countries))],
        "sex": ["F" if i % 2 or i >= base else "M" for i in range(len(countries))],  # the extra rows are F
        "income": [float(i % 100) for i in range(len(countries))],
    })


def plan_of(sql: str) -> Plan:
    return Plan(compile_sql(sql, "t", META), META, effective_bounds(META, None))


def test_without_delta_the_query_is_refused_saying_what_to_pass() -> None:
    plan = plan_of("SELECT country, COUNT(*) FROM t GROUP BY country")
    with pytest.raises(QueryRejected, match=r"no public category list.*pass a delta > 0"):
        plan.calibrate(1.0)
    with pytest.raises(QueryRejected, match="is a float with no public category list"):
        compile_sql("SELECT income, COUNT(*) FROM t GROUP BY income", "t", META)


@pytest.mark.parametrize("delta", [1e-5, 1e-7, 1e-9])
def test_the_charge_is_the_thresholded_plans_map_within_what_was_offered(delta: float) -> None:
    plan = plan_of("SELECT country, sex, COUNT(*) AS n, AVG(income) AS m FROM t GROUP BY country, sex")
    calibrated = plan.calibrate(1.0, delta)
    epsilon, spent = (float(x) for x in calibrated.measurement.map(META.privacy_unit))
    assert (calibrated.epsilon, calibrated.delta) == (epsilon, spent)
    assert 1.0 - 1e-9 < epsilon <= 1.0 and 0 < spent <= delta
    # the threshold is the least that fits: one lower would spend more delta than offered
    lower = plan.cost(plan.base_measurement(calibrated.scale, threshold=calibrated.threshold - 1))[1]
    assert lower > delta
    described = plan.describe(calibrated)["threshold"]
    assert described["threshold"] == calibrated.threshold and described["keys"] == ["country"]
    assert "suppressed" in described["note"] and str(calibrated.threshold) in described["note"].replace(",", "")


def test_what_stays_out_is_refused_before_anything_runs() -> None:
    with pytest.raises(QueryRejected, match="MEDIAN with GROUP BY country"):
        plan_of("SELECT country, MEDIAN(income) FROM t GROUP BY country")
    with pytest.raises(QueryRejected, match="CASE band together with country"):
        plan_of("SELECT country, CASE WHEN income > 50 THEN 'hi' ELSE 'lo' END AS b, COUNT(*) FROM t "
                "GROUP BY country, b")
    plan = plan_of("SELECT country, COUNT(*) FROM t GROUP BY country")
    with pytest.raises(QueryRejected, match="only on OpenDP's polars plan"):
        compile_stage(plan)


def test_large_groups_are_released_and_covered_and_a_one_row_key_is_not() -> None:
    """1,000 releases on a table with one extra row of a country no other row holds (a neighbour of the table
    without it). Every large group is released each time (100+ rows; the threshold is about 40 at a noise scale of 2), the 95%
    intervals cover the truth in at least 91.3% (5.3 sigma below 95%); the lone key appears with probability
    at most delta = 1e-9 per release, so never in 1,000 but with probability 1e-6."""
    sql = "SELECT country, zone, COUNT(*) AS n, SUM(income) AS s FROM t WHERE sex = 'F' GROUP BY country, zone"
    plan = plan_of(sql)
    calibrated = plan.calibrate(1.0, 1e-9)
    assert calibrated.threshold is not None and calibrated.threshold < 100
    data = table({"ZZ": 1})
    truth = {(r["country"], r["zone"]): r for r in data.filter(pl.col("sex") == "F").group_by("country", "zone")
             .agg(pl.len().alias("n"), pl.col("income").sum().alias("s")).to_dicts()}
    assert sum(r["n"] for k, r in truth.items() if k[0] == "ZZ") == 1  # the WHERE keeps the lone row
    described, tables = plan.describe(calibrated), plan.interval_tables(calibrated)
    lf = data.lazy()
    releases, seen, hits = 1000, 0, {"n": 0, "s": 0}
    large = {k for k in truth if k[0] != "ZZ"}
    for _ in range(releases):
        out = plan.postprocess(calibrated.release(lf), described, tables)
        keys = {(r["country"], r["zone"]) for r in out["rows"]}
        assert large <= keys and all(k[0] != "ZZ" for k in keys), keys
        for row, interval in zip(out["rows"], out["intervals"]):
            for name in ("n", "s"):
                low, high = interval[name]
                hits[name] += low <= truth[row["country"], row["zone"]][name] <= high
            seen += 1
    assert seen == releases * len(large)
    for name, hit in hits.items():
        assert hit / seen >= 0.95 - 5.3 * math.sqrt(0.05 * 0.95 / seen), (name, hit / seen)


async def test_the_api_prices_the_threshold_refuses_without_delta_and_says_what_was_suppressed(api) -> None:
    """Penguins with no public island list: without delta a 400 that says what to pass, nothing charged; the
    preview shows the threshold and its delta; the release charges that (epsilon, delta) and carries the note."""
    metadata = penguins_metadata()
    metadata["columns"]["island"].pop("categories")
    buf = io.BytesIO()
    pl.read_csv(penguins_csv(), null_values=["NA"]).write_parquet(buf)
    status, _ = await api("admin/datasets", "POST", {"name": "birds", "metadata": metadata, "format": "parquet",
                                                     "data_base64": base64.b64encode(buf.getvalue()).decode()})
    assert status == 201
    status, _ = await api("admin/grants", "PUT", {"username": "owner", "dataset": "birds", "epsilon": 2.0,
                                                  "delta": 1e-5})
    assert status == 200
    sql = "SELECT island, COUNT(*) AS n FROM birds GROUP BY island"
    status, refused = await api("query", "POST", {"dataset": "birds", "sql": sql, "epsilon": 1.0})
    assert status == 400 and "pass a delta > 0" in refused["message"], refused
    status, budget = await api("budget/birds")
    assert budget["epsilon_spent"] == 0 and budget["delta_spent"] == 0
    status, preview = await api("preview", "POST", {"dataset": "birds", "sql": sql, "epsilon": 1.0, "delta": 1e-6})
    assert status == 200, preview
    threshold = preview["plan"]["threshold"]
    assert threshold["keys"] == ["island"] and 0 < preview["cost"]["delta"] <= 1e-6
    assert f"at least {threshold['threshold']:,}" in preview["plan"]["choice"]["reason"]
    status, released = await api("query", "POST", {"dataset": "birds", "sql": sql, "epsilon": 1.0, "delta": 1e-6})
    assert status == 201, released
    assert {r["island"] for r in released["rows"]} == {"Biscoe", "Dream", "Torgersen"}  # 52+ rows each
    assert released["plan"]["threshold"]["note"] == threshold["note"]
    # what the notebook shows: the mechanism and threshold before, the suppression after
    assert f"Mechanism: {preview['plan']['choice']['reason']}" in preview_text(preview)
    assert "suppressed" in release_text(Release.from_json(released))
    status, budget = await api("budget/birds")
    assert budget["epsilon_spent"] == pytest.approx(released["cost"]["epsilon"])
    assert budget["delta_spent"] == pytest.approx(preview["cost"]["delta"]) and budget["delta_spent"] > 0
