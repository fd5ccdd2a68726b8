"""The polars-shaped builder: its JSON description compiles to the same spec as its SQL twin (one price, free
replays either way), bad descriptions are one clear 4xx line and cost nothing, and the kernel side sends data only."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

import lomas_jupyter as lj
from lomas_jupyter import Client, LomasError
from lomas_jupyter_server.demo import penguins_metadata
from lomas_jupyter_server.engine.builder import description_to_sql
from lomas_jupyter_server.engine.metadata import parse_metadata
from lomas_jupyter_server.engine.sql import compile_sql
from lomas_jupyter_server.errors import BadRequest, QueryRejected

from .servers import add_analyst, lomas_admin, running_server

META = parse_metadata(penguins_metadata())
TWINS = [
    (lambda q: q.agg(lj.len()), "SELECT COUNT(*) FROM penguins"),
    (lambda q: q.filter(lj.col("year") >= 2008).group_by("species")
     .agg(lj.col("body_mass_g").mean(), lj.len()),
     "SELECT species, AVG(body_mass_g), COUNT(*) FROM penguins WHERE year >= 2008 GROUP BY species"),
    (lambda q: q.group_by("island", "sex").agg(lj.col("bill_length_mm").sum().alias("total"),
                                               lj.col("sex").count().alias("known")),
     "SELECT island, sex, SUM(bill_length_mm) AS total, COUNT(sex) AS known FROM penguins GROUP BY island, sex"),
    (lambda q: q.filter((lj.col("species") == "Gentoo") | lj.col("sex").is_null()).agg(
        lj.col("flipper_length_mm").median(), lj.col("flipper_length_mm").quantile(0.25)),
     "SELECT MEDIAN(flipper_length_mm), PERCENTILE_CONT(0.25) WITHIN GROUP (ORDER BY flipper_length_mm) "
     "FROM penguins WHERE species = 'Gentoo' OR sex IS NULL"),
    (lambda q: q.filter(~lj.col("island").is_in(["Dream"]) & lj.col("body_mass_g").is_between(3000, 5000))
     .agg(lj.col("body_mass_g").var(), lj.col("body_mass_g").std(ddof=0)),
     "SELECT VARIANCE(body_mass_g), STDDEV_POP(body_mass_g) FROM penguins "
     "WHERE NOT island IN ('Dream') AND body_mass_g BETWEEN 3000 AND 5000"),
    (lambda q: q.group_by("species").agg(lj.len().alias("n"), (lj.col("body_mass_g").sum() / lj.len()).alias("m"))
     .filter(lj.col("n") > 10).sort("n", descending=True).limit(2),
     "SELECT species, COUNT(*) AS n, SUM(body_mass_g) / COUNT(*) AS m FROM penguins GROUP BY species "
     "HAVING n > 10 ORDER BY n DESC LIMIT 2"),
    (lambda q: q.filter(lj.col("bill_depth_mm").is_not_null() & (lj.col("bill_depth_mm") < 18.5))
     .agg(((lj.col("bill_depth_mm").mean() - 1) * 10).alias("scaled")),
     "SELECT (AVG(bill_depth_mm) - 1) * 10 AS scaled FROM penguins "
     "WHERE bill_depth_mm IS NOT NULL AND bill_depth_mm < 18.5"),
    (lambda q: q.group_by("sex").agg((lj.col("body_mass_g") * 2 - 100).sum().alias("s"),
                                     lj.col("island").n_unique().alias("k")),
     "SELECT sex, SUM(body_mass_g * 2 - 100) AS s, COUNT(DISTINCT island) AS k FROM penguins GROUP BY sex"),
]


def _spec_of(query: lj.Query) -> str:
    return compile_sql(description_to_sql(query.to_json(), "penguins"), "penguins", META).canonical()


@pytest.mark.parametrize("n", range(len(TWINS)))
def test_a_builder_query_and_its_sql_twin_are_one_spec(n: int) -> None:
    build, sql = TWINS[n]
    query = build(Client("http://127.0.0.1:9/", "unused").table("penguins"))
    json.dumps(query.to_json())  # plain data: nothing else could be sent
    assert _spec_of(query) == compile_sql(sql, "penguins", META).canonical()


@pytest.mark.parametrize("description, problem", [
    ([], "must be an object"),
    ({"agg": []}, "query.agg"),
    ({"agg": [{"len": True}], "join": "other"}, "unknown key(s) ['join']"),
    ({"agg": [{"fn": "exec", "arg": {"col": "x"}}]}, "unknown function 'exec'"),
    ({"agg": [{"fn": "sum", "arg": {"col": "body_mass_g"}, "code": "1"}]}, "sum takes"),
    ({"agg": [{"len": True}], "filter": {"op": ">", "args": [{"col": "year"}]}}, "takes 2 argument(s), not 1"),
    ({"agg": [{"len": True}], "filter": {"op": "like", "args": [{"col": "a"}, {"lit": "%"}]}}, "unknown operator"),
    ({"agg": [{"len": True}], "filter": {"op": ">", "args": [{"col": "year"}, {"lit": [1]}]}}, "a literal is"),
    ({"agg": [{"fn": "var", "arg": {"col": "year"}, "ddof": 2}]}, "ddof is 1"),
    ({"agg": [{"len": True}], "limit": -1}, "query.limit"),
    ({"agg": [{"len": True}], "sort": [{"by": 3}]}, "query.sort[0]"),
    ({"agg": [{"python": "__import__('os')"}]}, "unknown expression"),
])
def test_a_bad_description_names_the_problem(description: object, problem: str) -> None:
    with pytest.raises(BadRequest) as info:
        description_to_sql(description, "penguins")
    assert problem in info.value.message


def test_names_in_a_description_are_identifiers_and_values_stay_values() -> None:
    """A column named like SQL is an unknown column, a value like SQL is text: the compiler sees no code."""
    sneaky = {"agg": [{"fn": "sum", "arg": {"col": 'body_mass_g") FROM penguins; --'}}]}
    with pytest.raises(QueryRejected, match="unknown column"):
        compile_sql(description_to_sql(sneaky, "penguins"), "penguins", META)
    quoted = {"agg": [{"len": True}], "filter": {"op": "==", "args": [{"col": "species"}, {"lit": "x' OR '1'='1"}]}}
    spec = compile_sql(description_to_sql(quoted, "penguins"), "penguins", META)
    assert "x' OR '1'='1" in json.dumps(spec.to_json())


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("builder")
    storage = root / "storage"
    lomas_admin(storage, "demo", "--user", "boss")
    token = add_analyst(storage, "ana", {"penguins": 3.0})
    env = {"JUPYTER_CONFIG_DIR": str(root / "config"), "JUPYTER_DATA_DIR": str(root / "data")}
    with running_server("jupyter-lomas", [f"--LomasApp.storage_dir={storage}", "--LomasApp.workers=1"], root,
                        env) as (url, _pid):
        yield {"url": url, "token": token}


def test_a_builder_release_and_its_sql_twin_share_one_price_and_replay_each_other(service: dict[str, str]) -> None:
    ana = Client(service["url"], service["token"])
    pens = ana.table("penguins")
    q = pens.filter(lj.col("year") >= 2008).group_by("species").agg(lj.col("body_mass_g").mean(), lj.len())
    sql = "SELECT species, AVG(body_mass_g), COUNT(*) FROM penguins WHERE year >= 2008 GROUP BY species"
    preview = q.preview(epsilon=0.5)
    assert preview["cost"] == ana.preview("penguins", sql, 0.5)["cost"]
    assert preview["columns"] == ["species", "avg_body_mass_g", "count"] and "GROUP BY" in q.sql()
    assert ana.budget("penguins")["epsilon_spent"] == 0  # previews are free

    release = q.release(epsilon=0.5)
    assert not release.replay and release.df.height == 3 and release.cost["epsilon"] > 0
    spent = ana.budget("penguins")["epsilon_spent"]
    assert spent == pytest.approx(release.cost["epsilon"])
    twin = ana.query("penguins", sql, 0.5)  # the SQL twin replays the builder's release
    assert twin.replay and twin.df.equals(release.df)
    assert ana.budget("penguins")["epsilon_spent"] == spent

    # and the other way round: SQL first, then its builder twin
    first = ana.query("penguins", "SELECT island, COUNT(*) AS n FROM penguins GROUP BY island", 0.25)
    again = pens.group_by("island").agg(lj.len().alias("n")).release(epsilon=0.25)
    assert again.replay and again.df.equals(first.df)

    dummy = q.dummy()
    assert dummy.dummy and dummy.df.columns == release.df.columns
    assert ana.budget("penguins")["epsilon_spent"] == pytest.approx(spent + first.cost["epsilon"])


def test_a_bad_builder_query_is_one_line_and_costs_nothing(service: dict[str, str]) -> None:
    ana = Client(service["url"], service["token"])
    before = ana.budget("penguins")["epsilon_spent"]
    with pytest.raises(LomasError) as info:
        ana.table("penguins").agg(lj.col("no_such_column").mean()).release(epsilon=0.1)
    assert info.value.status == 400 and "no_such_column" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(LomasError, match="unknown function"):
        ana.query("penguins", epsilon=0.1, query={"agg": [{"fn": "eval", "arg": {"col": "year"}}]})
    with pytest.raises(LomasError, match="either 'sql'"):
        ana._call("POST", "query", {"dataset": "penguins", "epsilon": 0.1, "sql": "SELECT COUNT(*) FROM penguins",
                                    "query": {"agg": [{"len": True}]}})
    with pytest.raises(TypeError, match="truth value"):
        ana.table("penguins").filter(lj.col("year") > 2007 and lj.col("year") < 2009)
    assert ana.budget("penguins")["epsilon_spent"] == before
