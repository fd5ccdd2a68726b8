"""The restricted SQL compiler: what it accepts, and that everything else is refused by name."""

from __future__ import annotations

import pytest
import yaml

from lomas_jupyter_server.demo import penguins_metadata
from lomas_jupyter_server.engine.metadata import effective_bounds, parse_metadata
from lomas_jupyter_server.engine.plan import Plan
from lomas_jupyter_server.engine.sql import compile_sql
from lomas_jupyter_server.errors import QueryRejected

META = parse_metadata(penguins_metadata())


def test_grouped_query_spec() -> None:
    spec = compile_sql(
        "SELECT species, COUNT(*) AS n, AVG(bill_length_mm) mean_bill, SUM(body_mass_g), "
        "MEDIAN(flipper_length_mm), PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY body_mass_g) AS p90, COUNT(sex) "
        "FROM penguins WHERE island IN ('Biscoe', 'Dream') AND year BETWEEN 2007 AND 2008 "
        "AND NOT sex IS NULL AND -1 < bill_depth_mm GROUP BY species",
        "penguins",
        META,
    )
    assert spec.group_by == ("species",)
    assert [(a.kind, a.column, a.alias) for a in spec.aggregates] == [
        ("count_star", None, "n"),
        ("avg", "bill_length_mm", "mean_bill"),
        ("sum", "body_mass_g", "sum_body_mass_g"),
        ("quantile", "flipper_length_mm", "median_flipper_length_mm"),
        ("quantile", "body_mass_g", "p90"),
        ("count", "sex", "count_sex"),
    ]
    assert spec.aggregates[4].quantile == 0.9
    assert [o.name for o in spec.outputs] == ["species", "n", "mean_bill", "sum_body_mass_g",
                                              "median_flipper_length_mm", "p90", "count_sex"]
    where = spec.where
    assert where is not None and where["op"] == "and"
    text = str(where)
    assert "'op': 'in'" in text and "'op': 'between'" in text and "'negate': True" in text
    # a literal on the left is flipped: -1 < x  ->  x > -1
    # an AND chain is one node with all its operands, in order
    assert [a["op"] for a in where["args"]] == ["in", "between", "is_null", "cmp"]
    assert {"op": "cmp", "cmp": ">", "column": "bill_depth_mm", "value": -1.0} == where["args"][3]


def test_canonical_form_ignores_spelling() -> None:
    a = compile_sql("SELECT COUNT(*) AS n FROM penguins WHERE year > 2007", "penguins", META)
    b = compile_sql("select   count(*) as n\nfrom penguins\nwhere year>2007", "penguins", META)
    c = compile_sql("SELECT COUNT(*) AS n FROM penguins WHERE year > 2008", "penguins", META)
    assert a.canonical() == b.canonical() != c.canonical()


REFUSED = [
    ("SELECT * FROM penguins", "SELECT *"),
    ("SELECT species FROM penguins", "not aggregated"),
    ("SELECT bill_length_mm, COUNT(*) FROM penguins GROUP BY bill_length_mm", "no public category list"),
    ("SELECT COUNT(*) FROM penguins p JOIN penguins q ON p.year = q.year", "JOIN"),
    ("SELECT COUNT(*) FROM penguins ORDER BY 5", "there are 1 output columns"),
    ("SELECT COUNT(*) FROM penguins LIMIT 3 OFFSET 1", "OFFSET"),
    ("SELECT COUNT(*) FROM penguins LIMIT 'x'", "whole number"),
    ("SELECT species, COUNT(*) FROM penguins GROUP BY species HAVING AVG(bill_length_mm) > 3", "not selected"),
    ("SELECT species, COUNT(*) FROM penguins GROUP BY species HAVING island > 3", "not a selected column"),
    ("SELECT species, COUNT(*) AS n FROM penguins GROUP BY species HAVING n > species", "with a number"),
    ("SELECT species, COUNT(*) FROM penguins GROUP BY species ORDER BY 3", "there are 2 output columns"),
    ("SELECT species, COUNT(*) FROM penguins GROUP BY species ORDER BY body_mass_g", "not a selected column"),
    ("WITH t AS (SELECT * FROM penguins) SELECT COUNT(*) FROM t", "WITH"),
    ("SELECT COUNT(*) FROM (SELECT * FROM penguins) s", "FROM must name"),
    ("SELECT COUNT(*) FROM read_csv('/etc/os-release')", "FROM must name"),
    ("SELECT COUNT(*) FROM read_parquet('/srv/data.parquet')", "FROM must name"),
    ("SELECT COUNT(*) FROM other", "FROM other"),
    ("SELECT COUNT(*) FROM main.penguins", "without a schema"),
    ("SELECT MAX(body_mass_g) FROM penguins", "MAX is not supported"),
    ("SELECT COUNT(DISTINCT species, island) FROM penguins", "takes one column"),
    ("SELECT DISTINCT species FROM penguins", "DISTINCT"),
    ("SELECT SUM(species) FROM penguins", "not numeric"),
    ("SELECT SUM(body_mass_g / bill_length_mm) FROM penguins", "divide by a non-zero number only"),
    ("SELECT SUM(body_mass_g / 0) FROM penguins", "divide by a non-zero number only"),
    ("SELECT SUM(species || 'x') FROM penguins", "unsupported expression inside SUM"),
    ("SELECT AVG(species * 2) FROM penguins", "column 'species' is string"),
    ("SELECT SUM(SUM(body_mass_g)) FROM penguins", "aggregates cannot be nested"),
    ("SELECT SUM(2 * 3) FROM penguins", "is a constant"),
    ("SELECT SUM(body_mass_g * 0) FROM penguins", "takes a single value"),
    ("SELECT body_mass_g / 2 FROM penguins", "put the arithmetic inside the aggregate"),
    ("SELECT CASE WHEN year > 2008 THEN 'late' END AS p, COUNT(*) FROM penguins", "not in GROUP BY"),
    ("SELECT CASE WHEN year > 2008 THEN body_mass_g END AS p, COUNT(*) FROM penguins GROUP BY p",
     "text or whole-number literal"),
    ("SELECT CASE WHEN year > 2008 THEN 'late' ELSE 1 END AS p, COUNT(*) FROM penguins GROUP BY p",
     "all be text, or all whole numbers"),
    ("SELECT COUNT(*) FROM penguins GROUP BY 2", "there are 1 select items"),
    ("SELECT 2 + 3 FROM penguins", "computes no aggregate"),
    ("SELECT COUNT(*) FROM penguins WHERE species > 3", "quoted string"),
    ("SELECT COUNT(*) FROM penguins WHERE year = 'x'", "compare it with a number"),
    ("SELECT COUNT(*) FROM penguins WHERE secret = 1", "unknown column 'secret'"),
    ("SELECT COUNT(*) FROM penguins WHERE year IN (SELECT 1)", "IN accepts"),
    ("SELECT COUNT(*) FROM penguins WHERE year + 1 > 3", "plain column"),
    ("SELECT COUNT(*) FROM penguins WHERE species LIKE 'A%'", "unsupported condition"),
    ("SELECT COUNT(*) FROM penguins UNION SELECT COUNT(*) FROM penguins", "only SELECT"),
    ("DROP TABLE penguins", "only SELECT"),
    ("SELECT COUNT(*) FROM penguins; SELECT COUNT(*) FROM penguins", "exactly one statement"),
    ("SELECT COUNT(*) OVER () FROM penguins", "window functions"),
    ("SELECT PERCENTILE_CONT(1.5) WITHIN GROUP (ORDER BY body_mass_g) FROM penguins", "between 0 and 1"),
    ("SELEC COUNT(*) FROM penguins", "must start with SELECT, not 'SELEC' (did you mean SELECT?)"),
    ("SELECT COUNT(* FROM penguins", "unexpected 'FROM' at line 1, column 19"),
    ("", "empty"),
    ("SELECT species, COUNT(*) AS species FROM penguins GROUP BY species", "distinct aliases"),
    ("SELECT 1 FROM penguins", "unsupported select item"),
]


@pytest.mark.parametrize(("sql", "expected"), REFUSED)
def test_refused_with_a_message_naming_the_problem(sql: str, expected: str) -> None:
    with pytest.raises(QueryRejected) as info:
        compile_sql(sql, "penguins", META)
    assert expected.lower() in info.value.message.lower()


def test_a_case_is_a_group_key_named_by_itself_its_alias_or_its_position() -> None:
    """Issue 21.2: CASE WHEN maps rows into public labels; the three spellings are one query (one replay key)."""
    case = "CASE WHEN year < 2008 THEN 'early' WHEN year = 2008 THEN 'mid' ELSE 'late' END"
    spellings = [f"SELECT {case} AS period, COUNT(*) FROM penguins GROUP BY {case}",
                 f"SELECT {case} AS period, COUNT(*) FROM penguins GROUP BY period",
                 f"SELECT {case} AS period, COUNT(*) FROM penguins GROUP BY 1"]
    specs = [compile_sql(sql, "penguins", META) for sql in spellings]
    assert len({spec.canonical() for spec in specs}) == 1
    spec = specs[0]
    assert spec.group_by == ("__k0",) and spec.outputs[0].name == "period"
    plan = Plan(spec, META, effective_bounds(META, None))
    assert plan.metadata.column("__k0").group_keys == ("early", "mid", "late")  # no NULL group: there is an ELSE
    no_else = compile_sql("SELECT CASE species WHEN 'Adelie' THEN 1 END AS a, COUNT(*) FROM penguins GROUP BY a",
                          "penguins", META)
    assert Plan(no_else, META, {}).metadata.column("__k0").group_keys == (1, None)


def test_arithmetic_inside_an_aggregate_is_a_derived_column_with_bounds_from_metadata() -> None:
    """Issue 21.2: SUM(a * b), AVG(x - 18): one derived value per distinct expression, its bounds by interval
    arithmetic on the columns' (narrowed) bounds, never from data; the canonical query names the expression."""
    spec = compile_sql("SELECT SUM(body_mass_g * 2) AS s, AVG((body_mass_g * 2)), SUM(bill_length_mm - 18) "
                       "FROM penguins", "penguins", META)
    assert [d.expression for d in spec.derived] == [
        {"op": "*", "args": [{"col": "body_mass_g"}, {"const": 2}]},
        {"op": "-", "args": [{"col": "bill_length_mm"}, {"const": 18}]}]
    assert [a.column for a in spec.aggregates] == ["__d0", "__d0", "__d1"]
    assert [o.name for o in spec.outputs] == ["s", "AVG((body_mass_g * 2))", "SUM(bill_length_mm - 18)"]
    lo, hi = META.column("body_mass_g").bounds
    plan = Plan(spec, META, effective_bounds(META, {"body_mass_g": [3000, 5000]}))
    assert plan.bounds["__d0"] == (6000.0, 10000.0) and plan.bounds["__d0"] != (2 * lo, 2 * hi)
    blo, bhi = META.column("bill_length_mm").bounds
    assert plan.bounds["__d1"] == (blo - 18, bhi - 18)


def test_group_by_needs_public_categories_even_with_metadata_from_yaml() -> None:
    doc = yaml.safe_load("privacy_unit: 1\nmax_rows: 10\ncolumns:\n  g: {type: string}\n  x: {type: int, bounds: [0, 5]}")
    meta = parse_metadata(doc)
    spec = compile_sql("SELECT g, COUNT(*) FROM t GROUP BY g", "t", meta)  # private keys: only with delta
    with pytest.raises(QueryRejected, match="no public category list.*pass a delta > 0"):
        Plan(spec, meta, effective_bounds(meta, None)).calibrate(1.0)
    with pytest.raises(QueryRejected, match="no public bounds"):
        compile_sql("SELECT SUM(x) FROM t", "t", parse_metadata(
            yaml.safe_load("privacy_unit: 1\nmax_rows: 10\ncolumns:\n  x: {type: int}")))


def test_having_order_by_and_limit_are_post_processing_of_the_outputs() -> None:
    """Issue 21.1: they name the query's outputs (by alias, by the selected aggregate, by position) and never
    change what is released: the canonical query (the replay key) is the same without them."""
    base = "SELECT species, COUNT(*) AS n, AVG(bill_length_mm) AS m FROM penguins GROUP BY species"
    spec = compile_sql(base + " HAVING COUNT(*) > 50 AND NOT m < 40 ORDER BY 2 DESC, species LIMIT 2", "penguins",
                       META)
    assert spec.post == {
        "having": {"op": "and", "args": [{"op": "cmp", "cmp": ">", "output": "n", "value": 50.0},
                                         {"op": "not", "arg": {"op": "cmp", "cmp": "<", "output": "m", "value": 40.0}}]},
        "order": [{"output": "n", "desc": True}, {"output": "species", "desc": False}],
        "limit": 2,
    }
    assert spec.canonical() == compile_sql(base, "penguins", META).canonical()
    assert compile_sql(base, "penguins", META).post is None
    flipped = compile_sql(base + " HAVING 50 < n", "penguins", META).post
    assert flipped == {"having": {"op": "cmp", "cmp": ">", "output": "n", "value": 50.0}}


def test_a_parenthesised_aggregate_is_the_aggregate() -> None:
    plain = compile_sql("SELECT SUM(body_mass_g) AS s FROM penguins", "penguins", META)
    assert compile_sql("SELECT (SUM(body_mass_g)) AS s FROM penguins", "penguins", META) == plain


def test_variance_and_stddev_compile_with_their_kinds() -> None:
    spec = compile_sql("SELECT VARIANCE(bill_length_mm), VAR_POP(bill_length_mm), STDDEV(bill_length_mm), "
                       "STDDEV_SAMP(bill_length_mm) AS s2, STDDEV_POP(bill_length_mm) FROM penguins", "penguins", META)
    assert [a.kind for a in spec.aggregates] == ["var_samp", "var_pop", "stddev_samp", "stddev_samp", "stddev_pop"]


def test_floor_bands_and_casts_are_case_keys_with_edges_from_public_bounds() -> None:
    """Issue 21.2: FLOOR(x / w) * w over bounds [2500, 6500] is the CASE of bands 2000..6000 (a NULL group for a
    nullable column); each edge is exact, so a value on an edge goes to the upper band as FLOOR puts it."""
    spec = compile_sql("SELECT FLOOR(body_mass_g / 1000) * 1000 AS band, COUNT(*) FROM penguins GROUP BY band",
                       "penguins", META)
    plan = Plan(spec, META, effective_bounds(META, None))
    assert plan.metadata.column("__k0").group_keys == (2000, 3000, 4000, 5000, 6000, None)
    edges = [case["when"].get("value") for case in spec.derived[0].expression["case"]]
    assert edges == [None, 3000, 4000, 5000, 6000]  # body_mass_g < 3000 is the band 2000, and so on
    shifted = compile_sql("SELECT FLOOR((flipper_length_mm - 1) / 20) AS b, COUNT(*) FROM penguins GROUP BY b",
                          "penguins", META)
    assert [c["when"].get("value") for c in shifted.derived[0].expression["case"]][1:] == [181, 201, 221]
    cast = compile_sql("SELECT CAST(year AS VARCHAR) AS y, COUNT(*) FROM penguins GROUP BY 1", "penguins", META)
    assert Plan(cast, META, {}).metadata.column("__k0").group_keys == ("2007", "2008", "2009")
    with pytest.raises(QueryRejected, match="makes 4001 bands"):
        compile_sql("SELECT FLOOR(body_mass_g), COUNT(*) FROM penguins GROUP BY 1", "penguins", META)
    with pytest.raises(QueryRejected, match="no public categories"):
        compile_sql("SELECT CAST(body_mass_g AS VARCHAR), COUNT(*) FROM penguins GROUP BY 1", "penguins", META)
