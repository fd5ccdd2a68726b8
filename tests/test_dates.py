"""Issue 21.2: date columns with a public first and last date, and their date parts (YEAR, QUARTER, MONTH, DAY,
ISODOW) as group keys and as values; dates in WHERE. From a CSV draft to a release through the service, and the
privacy of a year no row reaches."""

from __future__ import annotations

import base64
import datetime
import itertools
import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from lomas_jupyter_server import engine
from lomas_jupyter_server.engine.metadata import parse_metadata
from lomas_jupyter_server.engine.sql import compile_sql
from lomas_jupyter_server.errors import MetadataError
from lomas_jupyter_server.service.importing import propose_metadata

START = datetime.date(2019, 1, 1)


def _csv(rows: int = 400) -> bytes:
    days = [START + datetime.timedelta(days=(i * 37) % 1095) for i in range(rows)]  # 2019 to 2021
    frame = pl.DataFrame({"visit": [None if i % 20 == 0 else d.isoformat() for i, d in enumerate(days)],
                          "cost": [(i * 13) % 500 for i in range(rows)]})
    return frame.write_csv().encode()


def test_a_draft_proposes_a_date_column_with_whole_years_and_the_metadata_checks_its_dates(tmp_path: Path) -> None:
    path = tmp_path / "visits.csv"
    path.write_bytes(_csv())
    draft = propose_metadata(path)
    visit = draft["metadata"]["columns"]["visit"]
    assert visit == {"type": "date", "nullable": True, "bounds": ["2019-01-01", "2021-12-31"]}
    assert any(n["column"] == "visit" and n["field"] == "bounds" for n in draft["review"])
    with pytest.raises(MetadataError, match="YYYY-MM-DD"):
        parse_metadata({"privacy_unit": 1, "max_rows": 10, "columns": {"d": {"type": "date",
                                                                            "bounds": ["2019", "2020"]}}})
    with pytest.raises(MetadataError, match="group by a date part"):
        parse_metadata({"privacy_unit": 1, "max_rows": 10, "columns": {"d": {"type": "date",
                                                                            "categories": ["2019-01-01"]}}})
    # YAML reads an unquoted date as a date: the same metadata
    doc = {"privacy_unit": 1, "max_rows": 10, "columns": {"d": {"type": "date",
                                                                "bounds": [datetime.date(2019, 1, 1), "2020-06-30"]}}}
    assert parse_metadata(doc).to_json()["columns"]["d"]["bounds"] == ["2019-01-01", "2020-06-30"]


def test_date_parts_take_their_range_from_the_public_dates() -> None:
    meta = parse_metadata({"privacy_unit": 1, "max_rows": 100, "columns": {
        "d": {"type": "date", "bounds": ["2020-02-10", "2020-08-31"], "nullable": False}}})
    plan = engine.Plan(compile_sql("SELECT MONTH(d) AS m, QUARTER(d) AS q, COUNT(*) FROM t GROUP BY m, q", "t", meta),
                       meta, {})
    assert plan.metadata.column("__k0").group_keys == (2, 3, 4, 5, 6, 7, 8)  # within one year: its months only
    assert plan.metadata.column("__k1").group_keys == (1, 2, 3)
    spelled = ["SELECT YEAR(d) AS y, COUNT(*) FROM t GROUP BY 1",
               "SELECT EXTRACT(YEAR FROM d) AS y, COUNT(*) FROM t GROUP BY y",
               "SELECT DATE_PART('year', d) AS y, COUNT(*) FROM t GROUP BY DATE_PART('year', d)"]
    assert len({compile_sql(sql, "t", meta).canonical() for sql in spelled}) == 1


async def test_a_date_column_from_csv_answers_by_year_and_refuses_a_bad_date_free(api) -> None:
    metadata = {"privacy_unit": 1, "max_rows": 1000, "columns": {
        "visit": {"type": "date", "bounds": ["2019-01-01", "2022-12-31"]},  # 2022: a public year with no visits
        "cost": {"type": "int", "bounds": [0, 500], "nullable": False}}}
    status, created = await api("admin/datasets", "POST", {"name": "visits", "metadata": metadata, "format": "csv",
                                                           "data_base64": base64.b64encode(_csv()).decode()})
    assert status == 201, created
    status, _ = await api("admin/grants", "PUT", {"username": "owner", "dataset": "visits", "epsilon": 5.0})
    assert status == 200
    bad = {"dataset": "visits", "epsilon": 1.0, "sql": "SELECT COUNT(*) FROM visits WHERE visit > 2020"}
    status, refused = await api("query", "POST", bad)
    assert status == 400 and "compare it with a date written 'YYYY-MM-DD'" in refused["message"], refused
    sql = ("SELECT YEAR(visit) AS y, COUNT(*) AS n, AVG(cost) AS c FROM visits WHERE visit >= DATE '2019-07-01' "
           "GROUP BY y")
    status, preview = await api("preview", "POST", {"dataset": "visits", "epsilon": 1.0, "sql": sql})
    assert status == 200, preview
    status, released = await api("query", "POST", {"dataset": "visits", "epsilon": 1.0, "sql": sql})
    assert status == 201, released
    assert [r["y"] for r in released["rows"]] == [2019, 2020, 2021, 2022, None]  # the public years, and NULL
    status, budget = await api("budget/visits")
    assert budget["epsilon_spent"] == pytest.approx(released["cost"]["epsilon"]) == pytest.approx(
        preview["cost"]["epsilon"])
    status, dummy = await api("datasets/visits/dummy", rows="30")
    assert status == 200, dummy
    days = [datetime.date.fromisoformat(r["visit"]) for r in dummy["rows"] if r["visit"] is not None]
    assert days and all(datetime.date(2019, 1, 1) <= d <= datetime.date(2022, 12, 31) for d in days)
    status, answer = await api("dummy", "POST", {"dataset": "visits", "epsilon": 1.0, "sql": sql})
    assert status == 200 and answer["cost"]["epsilon"] == 0.0, answer


META_DOC: dict[str, Any] = {"privacy_unit": 1, "max_rows": 1000, "columns": {
    "d": {"type": "date", "bounds": ["2019-01-01", "2021-12-31"]},
    "x": {"type": "int", "bounds": [0, 10]}}}
RELEASES = 300


@pytest.mark.parametrize(("mechanism", "delta"), [(engine.LAPLACE, 0.0), (engine.GAUSSIAN, 1e-6)])
def test_a_year_no_row_reaches_releases_independent_noise(tmp_path: Path, mechanism: str, delta: float) -> None:
    """Rows in 2019 and 2020 only: the public year 2021 is released, and its statistics are independent draws
    (no two of them equal more often than chance), so its emptiness is not a give-away."""
    rows = [(START + datetime.timedelta(days=i * 7), i % 11) for i in range(100)]  # 2019-01-01 to 2020-11-23
    path = tmp_path / "t.parquet"
    pl.DataFrame(rows, schema={"d": pl.Date, "x": pl.Int64}, orient="row").write_parquet(path)
    meta = parse_metadata(META_DOC)
    sql = ("SELECT YEAR(d) AS y, COUNT(*) AS n, COUNT(x) AS c, SUM(x) AS s, SUM(MONTH(d)) AS m FROM t "
           "WHERE d >= '2019-01-01' GROUP BY y")
    plan = engine.Plan(compile_sql(sql, "t", meta), meta, engine.effective_bounds(meta, None))
    calibrated = plan.calibrate_mechanism(mechanism, 0.5, delta)
    scales = [s["scale"] / (s["fixed_point_step"] or 1.0) for s in plan.describe(calibrated)["statistics"]]
    p = 1 / (2 * min(scales)) if mechanism == engine.LAPLACE else 1 / (min(scales) * math.sqrt(2 * math.pi))
    lf = pl.scan_parquet(path)
    cells = []
    for _ in range(RELEASES):
        raw = calibrated.release(lf).sort("__k0").filter(pl.col("__k0") == 2021)
        cells.append(list(raw.select(f"__s{j}" for j in range(len(plan.statistics))).row(0)))
    bound = RELEASES * p + 5.3 * math.sqrt(RELEASES * p * (1 - p)) + 1  # about one false failure in 2e7
    for i, j in itertools.combinations(range(len(cells[0])), 2):
        assert sum(r[i] == r[j] for r in cells) <= bound, (i, j)


def test_a_builder_date_part_and_its_sql_twin_are_one_spec() -> None:
    """`lj.col("visit").dt.year()` as a group key and a `datetime.date` in a filter compile to the SQL twin's spec."""
    import lomas_jupyter as lj
    from lomas_jupyter import Client
    from lomas_jupyter_server.engine.builder import description_to_sql

    meta = parse_metadata({"privacy_unit": 1, "max_rows": 1000, "columns": {
        "visit": {"type": "date", "bounds": ["2019-01-01", "2022-12-31"]},
        "cost": {"type": "int", "bounds": [0, 500], "nullable": False}}})
    query = (Client("http://127.0.0.1:9/", "unused").table("visits")
             .filter(lj.col("visit") >= datetime.date(2019, 7, 1))
             .group_by(lj.col("visit").dt.year().alias("y"), lj.col("visit").dt.weekday().alias("w"))
             .agg(lj.len().alias("n"), lj.col("cost").mean().alias("c")))
    twin = ("SELECT YEAR(visit) AS y, EXTRACT(ISODOW FROM visit) AS w, COUNT(*) AS n, AVG(cost) AS c FROM visits "
            "WHERE visit >= DATE '2019-07-01' GROUP BY y, w")
    built = compile_sql(description_to_sql(query.to_json(), "visits"), "visits", meta)
    assert built.canonical() == compile_sql(twin, "visits", meta).canonical()
    assert built.where == {"op": "cmp", "cmp": ">=", "column": "visit", "value": {"date": "2019-07-01"}}
