"""The REST API on a real Jupyter server (pytest-jupyter), embedded mode: the server's owner is the admin."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import socket
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from lomas_jupyter_server.api import API_PREFIX, ROUTES
from lomas_jupyter_server.demo import penguins_csv, penguins_metadata

GROUPED = "SELECT species, COUNT(*) AS n, AVG(bill_length_mm) AS mean_bill FROM penguins GROUP BY species"


async def spent(api) -> float:
    status, budget = await api("budget/penguins")
    assert status == 200
    return budget["epsilon_spent"]


async def test_query_preview_budget_archive(api) -> None:
    status, me = await api("whoami")
    assert (status, me["username"], me["role"]) == (200, "owner", "admin")
    status, datasets = await api("datasets")
    assert [d["name"] for d in datasets] == ["penguins"] and datasets[0]["budget"]["epsilon_total"] == 10.0
    status, described = await api("datasets/penguins")
    assert status == 200 and described["metadata"]["columns"]["species"]["categories"] == ["Adelie", "Chinstrap",
                                                                                           "Gentoo"]
    assert "parquet" not in str(described)

    status, preview = await api("preview", "POST", {"dataset": "penguins", "sql": GROUPED, "epsilon": 0.5})
    assert status == 200 and 0 < preview["cost"]["epsilon"] <= 0.5 and preview["affordable"] is True
    assert await spent(api) == 0.0  # preview is free

    status, result = await api("query", "POST", {"dataset": "penguins", "sql": GROUPED, "epsilon": 0.5})
    assert status == 201, result
    assert result["columns"] == ["species", "n", "mean_bill"]
    assert [r["species"] for r in result["rows"]] == ["Adelie", "Chinstrap", "Gentoo"]
    assert result["cost"] == preview["cost"]  # what the preview promised is what was charged
    for row, interval in zip(result["rows"], result["intervals"]):
        assert interval["n"][0] <= row["n"] <= interval["n"][1]
        assert 30.0 <= interval["mean_bill"][0] <= row["mean_bill"] <= interval["mean_bill"][1] <= 60.0
    assert {a["name"]: a["mechanism"] for a in result["aggregates"]}["n"].startswith("Laplace")
    assert await spent(api) == result["cost"]["epsilon"]
    assert result["budget"]["epsilon_remaining"] == pytest.approx(10.0 - result["cost"]["epsilon"])

    status, archive = await api("archive")
    assert status == 200 and len(archive) == 1
    assert archive[0]["sql"] == GROUPED and archive[0]["result"]["rows"] == result["rows"]
    assert archive[0]["epsilon"] == result["cost"]["epsilon"]


async def test_admin_flows(api, tmp_path: Path) -> None:
    status, user = await api("admin/users", "POST", {"username": "alice", "role": "analyst"})
    assert status == 201 and user["role"] == "analyst"
    status, again = await api("admin/users", "POST", {"username": "alice"})
    assert status == 409 and "already exists" in again["message"]
    status, token = await api("admin/users/alice/tokens", "POST", {"label": "laptop"})
    assert status == 201 and token["token"].startswith("lomas_")

    frame = pl.DataFrame({"g": ["x", "y", "x", "y"] * 25, "v": list(range(100))})
    buf = io.BytesIO()
    frame.write_parquet(buf)
    meta = {"privacy_unit": 1, "max_rows": 1000,
            "columns": {"g": {"type": "string", "categories": ["x", "y"]}, "v": {"type": "int", "bounds": [0, 99]}}}
    status, dataset = await api("admin/datasets", "POST", {"name": "small", "metadata": meta, "format": "parquet",
                                                           "data_base64": base64.b64encode(buf.getvalue()).decode()})
    assert status == 201 and dataset["version"] == 1 and dataset["warnings"] == []

    status, grant = await api("admin/grants", "PUT", {"username": "alice", "dataset": "small", "epsilon": 2.0})
    assert status == 200 and grant["epsilon"] == 2.0
    status, grants = await api("admin/grants")
    assert {(g["username"], g["dataset"]) for g in grants} >= {("alice", "small"), ("owner", "penguins")}
    # several users at once, all or nothing: an unknown user changes no grant
    await api("admin/users", "POST", {"username": "bob"})
    status, failed = await api("admin/grants", "PUT", {"usernames": ["bob", "nobody"], "dataset": "small",
                                                       "epsilon": 3.0})
    assert status == 404 and "nobody" in failed["message"]
    status, bobs = await api("admin/grants", username="bob")
    assert bobs == []
    status, both = await api("admin/grants", "PUT", {"usernames": ["alice", "bob"], "dataset": "small", "epsilon": 3.0})
    assert status == 200 and [(g["username"], g["epsilon"]) for g in both["grants"]] == [("alice", 3.0), ("bob", 3.0)]
    status, role = await api("admin/users/alice", "PATCH", {"role": "admin"})
    assert status == 200 and role["role"] == "admin"

    status, _ = await api("admin/grants", "PUT", {"username": "owner", "dataset": "small", "epsilon": 1.0})
    status, result = await api("query", "POST", {"dataset": "small", "epsilon": 1.0,
                                                 "sql": "SELECT g, SUM(v) AS s FROM small GROUP BY g"})
    assert status == 201 and [r["g"] for r in result["rows"]] == ["x", "y", None]  # g may hold NULL: its group is kept
    status, releases = await api("admin/archive", username="owner")
    assert status == 200 and releases[0]["dataset"] == "small"
    status, ledger = await api("admin/ledger")
    assert [row["kind"] for row in ledger[:2]] == ["commit", "reserve"]
    status, audit = await api("admin/audit")
    assert {"create_user", "issue_token", "put_dataset", "set_grant", "set_role"} <= {a["action"] for a in audit}
    status, revoked = await api("admin/users/alice/tokens", "DELETE")
    assert status == 200 and revoked["revoked"] == 1


async def test_insufficient_budget_says_cost_and_remaining(api) -> None:
    await api("admin/grants", "PUT", {"username": "owner", "dataset": "penguins", "epsilon": 0.3})
    status, error = await api("query", "POST", {"dataset": "penguins", "sql": GROUPED, "epsilon": 0.5})
    assert status == 403 and error["error"] == "insufficient_budget"
    assert error["cost"]["epsilon"] == pytest.approx(0.5) and error["remaining"]["epsilon"] == pytest.approx(0.3)
    assert "0.5" in error["message"] and "0.3" in error["message"]
    assert await spent(api) == 0.0


BAD_INPUTS: list[tuple[str, str, Any, int, str]] = [
    ("query", "POST", {"dataset": "penguins", "sql": "SELECT * FROM penguins", "epsilon": 1}, 400, "SELECT *"),
    ("query", "POST", {"dataset": "nope", "sql": GROUPED, "epsilon": 1}, 404, "no dataset 'nope'"),
    ("query", "POST", {"dataset": "penguins", "sql": GROUPED}, 400, "'epsilon' is required"),
    ("query", "POST", {"dataset": "penguins", "sql": GROUPED, "epsilon": -1}, 400, "epsilon must be above 0"),
    ("query", "POST", {"dataset": "penguins", "sql": GROUPED, "epsilon": 1e9}, 400, "at most"),
    ("query", "POST", {"dataset": "penguins", "sql": GROUPED, "epsilon": "1"}, 400, "epsilon must be a number"),
    ("query", "POST", {"dataset": "penguins", "sql": GROUPED, "epsilon": 1, "delta": 2}, 400, "delta"),
    ("query", "POST", {"dataset": "penguins", "sql": 42, "epsilon": 1}, 400, "'sql' is required"),
    ("query", "POST", {"dataset": "penguins", "sql": GROUPED, "epsilon": 1, "plan": "x"}, 400, "unknown field"),
    ("query", "POST", {"dataset": "penguins", "epsilon": 1, "sql": "SELECT AVG(bill_length_mm) FROM penguins",
                       "bounds": {"bill_length_mm": [0, 1000]}}, 400, "may only narrow"),
    ("query", "POST", [1, 2], 400, "JSON object"),
    ("query", "POST", b"{not json", 400, "not valid JSON"),
    ("preview", "POST", {"dataset": "penguins", "sql": "SELECT MAX(year) FROM penguins", "epsilon": 1}, 400, "MAX"),
    ("datasets/nope", "GET", None, 404, "no dataset"),
    ("budget/nope", "GET", None, 404, "no dataset"),
    ("archive", "GET", {"limit": "lots"}, 400, "limit"),
    ("admin/users", "POST", {"username": "bob", "role": "root"}, 400, "role must be one of"),
    ("admin/users/nobody/tokens", "POST", {}, 404, "no user"),
    ("admin/grants", "PUT", {"username": "owner", "dataset": "penguins", "epsilon": -3}, 400, "non-negative"),
    ("admin/grants", "PUT", {"username": "owner", "dataset": "nope", "epsilon": 1}, 404, "no dataset"),
    ("admin/datasets", "POST", {"name": "t", "metadata": {}, "data_base64": "%%%"}, 400, "base64"),
    ("admin/datasets", "POST", {"name": "t", "metadata": {"x": 1}, "data_base64": "YQ==", "format": "csv"}, 400,
     "metadata"),
    ("admin/datasets", "POST", {"name": "t", "metadata": penguins_metadata(), "path": "/etc/passwd"}, 400,
     "outside the service's import folders"),
    ("admin/datasets", "POST", {"name": "t", "metadata": penguins_metadata(), "path": "notes.txt"}, 400,
     "CSV or Parquet"),
    ("admin/datasets", "POST", {"name": "t/../x", "metadata": {}}, 400, "dataset names"),
]


@pytest.mark.parametrize(("path", "method", "body", "status", "expected"), BAD_INPUTS)
async def test_bad_input_is_a_clear_4xx_and_charges_nothing(api, storage_dir: Path, path: str, method: str,
                                                           body: Any, status: int, expected: str) -> None:
    before = await spent(api)
    if method == "GET":
        got, error = await api(path, **(body or {}))
    elif isinstance(body, bytes):
        got, error = await api(path, method, raw=body)
    else:
        got, error = await api(path, method, body)
    assert got == status, error
    assert isinstance(error, dict) and error["error"] and expected.lower() in error["message"].lower()
    assert str(storage_dir) not in error["message"] and socket.gethostname() not in error["message"]
    assert not re.search(r"/(tmp|root|home|etc)/", error["message"])
    assert await spent(api) == before


ATTACKS = [
    "SELECT * FROM read_csv('/etc/os-release')",
    "SELECT island, COUNT(*) FROM penguins GROUP BY island UNION ALL SELECT column_1, 1 FROM read_csv('/etc/hostname')",
    "SELECT species, COUNT(*) FROM penguins RIGHT JOIN read_parquet('{dataset}') USING (species) GROUP BY species",
    "SELECT bill_length_mm, COUNT(*) FROM penguins GROUP BY bill_length_mm",
    "SELECT COUNT(*) FROM penguins WHERE species IN (SELECT species FROM read_csv('/etc/passwd'))",
    "COPY penguins TO '/tmp/leak.csv'",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT COUNT(*) FROM penguins; DROP TABLE penguins",
]


@pytest.mark.parametrize("sql", ATTACKS)
async def test_attack_payloads_are_refused(api, lomas_app, sql: str) -> None:
    dataset_path = lomas_app.service.store.get_dataset("penguins").parquet_path
    status, error = await api("query", "POST", {"dataset": "penguins", "epsilon": 1.0,
                                                "sql": sql.format(dataset=dataset_path)})
    assert status == 400 and error["error"] == "query_rejected"
    assert dataset_path not in error["message"] and "Debian" not in error["message"]
    assert await spent(api) == 0.0


async def test_serialized_polars_plan_or_pickle_is_never_deserialized(api, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    import pickle

    payload = base64.b64encode(pickle.dumps(Evil())).decode()
    plan = pl.LazyFrame(schema={"x": pl.Int64}).select(pl.col("x").sum()).serialize()
    for body in (
        {"dataset": "penguins", "epsilon": 1.0, "sql": payload},
        {"dataset": "penguins", "epsilon": 1.0, "sql": base64.b64encode(plan).decode()},
        {"dataset": "penguins", "epsilon": 1.0, "sql": GROUPED, "opendp_json": payload},
    ):
        status, error = await api("query", "POST", body)
        assert status == 400, error
    status, error = await api("query", "POST", raw=pickle.dumps(Evil()))
    assert status == 400 and "JSON" in error["message"]
    assert not marker.exists()


async def test_concurrent_queries_exhaust_the_budget_exactly_and_never_over(api) -> None:
    await api("admin/grants", "PUT", {"username": "owner", "dataset": "penguins", "epsilon": 10.0})
    body = {"dataset": "penguins", "sql": "SELECT COUNT(*) FROM penguins", "epsilon": 0.2, "fresh": True}
    answers = await asyncio.gather(*[api("query", "POST", body) for _ in range(60)])
    codes = [code for code, _ in answers]
    assert codes.count(201) == 50 and codes.count(403) == 10, codes
    assert all(a["error"] == "insufficient_budget" for code, a in answers if code == 403)
    charged = sum(a["cost"]["epsilon"] for code, a in answers if code == 201)
    total = await spent(api)
    assert total == pytest.approx(charged) and total <= 10.0 and total == pytest.approx(10.0)
    status, budget = await api("budget/penguins")
    assert budget["releases"] == 50 and budget["epsilon_remaining"] < 0.2


async def test_every_endpoint_needs_authentication(api) -> None:
    for route, handler in ROUTES:
        path = re.sub(r"\(\?P<\w+>[^)]*\)", "x", route)
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            if method.lower() not in handler.__dict__:
                continue
            status, error = await api(path, method, headers={"Authorization": ""})
            assert status == 401, (method, path, status)
            assert "authentication required" in error["message"]


def test_no_endpoint_of_ours_lacks_an_auth_decorator(recwarn, jp_serverapp) -> None:
    """jupyter_server warns (JupyterServerAuthWarning) about endpoints without an auth decorator; none is ours."""
    warned = [str(w.message) for w in recwarn if type(w.message).__name__ == "JupyterServerAuthWarning"]
    assert not [line for text in warned for line in text.splitlines() if "lomas" in line]
    web_app = jp_serverapp.web_app
    for route, handler in ROUTES:
        assert web_app._check_handler_auth(route, handler) == [], route
    from lomas_jupyter_server.api import LomasHandler

    class Naked(LomasHandler):  # the negative control: the same check catches a missing decorator
        def get(self) -> None: ...

    assert web_app._check_handler_auth("naked", Naked) == ["- GET of Naked registered for naked"]


def test_openapi_matches_the_handlers() -> None:
    spec = yaml.safe_load((resources.files("lomas_jupyter_server.api") / "openapi.yaml").read_text())
    documented = {(path, method.upper()) for path, item in spec["paths"].items() for method in item
                  if method in ("get", "post", "put", "patch", "delete")}
    served = set()
    for route, handler in ROUTES:
        path = "/" + re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", route)
        for method in ("get", "post", "put", "patch", "delete"):
            if method in handler.__dict__:
                served.add((path, method.upper()))
    assert documented == served
    assert API_PREFIX == "lomas/api/"


def test_shipped_config_enables_the_extension() -> None:
    doc = (Path(__file__).parents[1] / "jupyter-config" / "jupyter_server_config.d" / "lomas_jupyter_server.json")
    assert yaml.safe_load(doc.read_text())["ServerApp"]["jpserver_extensions"]["lomas_jupyter_server"] is True
    assert penguins_csv().is_file()


async def test_dummy_rows_and_dummy_queries_are_free_and_independent_of_the_data(api, lomas_app) -> None:
    status, dummy = await api("datasets/penguins/dummy", rows="50")
    assert status == 200 and dummy["dummy"] is True and len(dummy["rows"]) == 50
    assert set(dummy["columns"]) == set(penguins_metadata()["columns"])
    assert {r["species"] for r in dummy["rows"]} <= {"Adelie", "Chinstrap", "Gentoo"}
    assert all(30.0 <= r["bill_length_mm"] <= 60.0 for r in dummy["rows"] if r["bill_length_mm"] is not None)
    body = {"dataset": "penguins", "epsilon": 1.0, "sql": "SELECT COUNT(*) AS n FROM penguins"}
    status, answer = await api("dummy", "POST", body)
    assert status == 200 and answer["dummy"] is True and answer["cost"]["epsilon"] == 0.0
    assert 0 < answer["would_cost"]["epsilon"] <= 1.0
    # 1,000 dummy rows, not the 344 real ones: at this epsilon the noise's scale is 1, so a miss by 40 has
    # probability about 1e-17
    assert abs(answer["rows"][0]["n"] - 1000) < 40
    assert await spent(api) == 0.0
    status, archive = await api("archive")
    assert archive == []
    # the dummy table is made from metadata alone: replacing the real data does not change it
    before = await api("datasets/penguins/dummy", rows="20")
    store = lomas_app.service.store
    record = store.get_dataset("penguins")
    pl.DataFrame(schema=pl.read_parquet(record.parquet_path).schema).write_parquet(record.parquet_path)
    assert await api("datasets/penguins/dummy", rows="20") == before


async def test_replays_are_free_and_identical_and_fresh_releases_are_charged(api) -> None:
    body = {"dataset": "penguins", "epsilon": 0.5, "sql": GROUPED}
    status, first = await api("query", "POST", body)
    assert status == 201 and first["replay"] is False
    charged = await spent(api)
    respelled = ("select species,\n  count(*) as n,   avg(bill_length_mm) mean_bill\n"
                 "from penguins p group by p.species")
    for sql in (GROUPED, respelled):
        status, again = await api("query", "POST", {**body, "sql": sql})
        assert status == 201 and again["replay"] is True and again["cost"]["epsilon"] == 0.0
        assert again["rows"] == first["rows"] and again["intervals"] == first["intervals"]
        assert again["replay_of"]["release_id"] == first["release_id"]
        assert again["replay_of"]["epsilon"] == first["cost"]["epsilon"]
    assert await spent(api) == charged
    status, other_eps = await api("query", "POST", {**body, "epsilon": 0.4})
    assert other_eps["replay"] is False
    status, fresh = await api("query", "POST", {**body, "fresh": True})
    assert status == 201 and fresh["replay"] is False and fresh["release_id"] != first["release_id"]
    assert await spent(api) == pytest.approx(charged + other_eps["cost"]["epsilon"] + fresh["cost"]["epsilon"])
    status, archive = await api("archive")
    assert len(archive) == 3
    status, error = await api("query", "POST", {**body, "fresh": "yes"})
    assert status == 400 and "fresh" in error["message"]


async def test_a_new_dataset_version_is_not_replayed(api, jp_root_dir: Path) -> None:
    body = {"dataset": "penguins", "epsilon": 0.5, "sql": "SELECT COUNT(*) FROM penguins"}
    status, first = await api("query", "POST", body)
    (jp_root_dir / "penguins.csv").write_bytes(Path(penguins_csv()).read_bytes())  # the server's root folder
    status, imported = await api("admin/datasets", "POST", {"name": "penguins", "metadata": penguins_metadata(),
                                                            "path": "penguins.csv"})
    assert status == 201 and imported["version"] == 2
    status, second = await api("query", "POST", body)
    assert status == 201 and second["replay"] is False and second["dataset_version"] == 2


async def test_invalid_text_is_a_400_before_anything_and_charges_nothing(api) -> None:
    """Issue 17.4: a lone UTF-16 surrogate (valid JSON, not valid text) in the SQL or the dataset answered 500
    with epsilon committed and no release archived; it is refused first, naming the field."""
    before = await spent(api)
    for body in ({"dataset": "penguins", "sql": "SELECT COUNT(*) FROM penguins WHERE species = '\ud800'",
                  "epsilon": 0.5},
                 {"dataset": "penguins\udfff", "sql": "SELECT COUNT(*) FROM penguins", "epsilon": 0.5}):
        for path in ("query", "preview"):
            status, error = await api(path, "POST", body)
            field = "'sql'" if "\ud800" in body["sql"] else "'dataset'"
            assert status == 400 and field in error["message"] and "surrogate" in error["message"], error
    assert await spent(api) == before
    status, archive = await api("archive")
    assert status == 200 and archive == []


async def test_a_missing_or_legacy_relative_data_file(api, lomas_app, storage_dir: Path) -> None:
    """Issue 17.10: a store made by `lomas-admin --storage-dir store` held a path relative to where the admin
    ran it; a service started elsewhere failed every query and charged it. Such paths are found where every
    import writes them; a file that is truly missing is the service's fault: 503, nothing charged, no path."""
    import sqlite3

    store = lomas_app.service.store
    record = store.get_dataset("penguins")
    real = Path(record.parquet_path)
    assert real.is_absolute() and real.is_file()
    with sqlite3.connect(store.path) as raw:  # what the old lomas-admin wrote from the store's parent folder
        raw.execute("UPDATE datasets SET parquet_path = ?", (f"lomas-storage/datasets/penguins/{real.name}",))
    body = {"dataset": "penguins", "sql": "SELECT COUNT(*) AS n FROM penguins", "epsilon": 0.25}
    status, answer = await api("query", "POST", body)
    assert status == 201, answer
    before = await spent(api)
    real.rename(real.with_suffix(".moved"))
    status, error = await api("query", "POST", body | {"fresh": True})
    assert status == 503 and error["error"] == "dataset_unavailable" and "Nothing was charged" in error["message"]
    assert str(storage_dir) not in error["message"] and "lomas-storage" not in error["message"]
    assert await spent(api) == before
    real.with_suffix(".moved").rename(real)
    status, answer = await api("query", "POST", body | {"fresh": True})
    assert status == 201


async def test_path_imports_only_from_import_folders_and_never_the_store(api, lomas_app, jp_root_dir: Path,
                                                                          storage_dir: Path) -> None:
    """Issue 17.5: a path import or draft of the store's own SQLite file made polars open and close it inside
    the service, dropping its locks (and later the WAL). Paths outside the import folders (embedded: the
    server's root folder) and anything in the storage folder are refused; a link does not lead around it."""
    store_file = Path(lomas_app.service.store.path)
    (jp_root_dir / "store-link.parquet").symlink_to(store_file)
    for path in (str(store_file), str(storage_dir / "datasets"), "store-link.parquet"):
        for endpoint in ("admin/datasets", "admin/datasets/draft"):
            body = {"path": path} | ({"name": "t", "metadata": penguins_metadata()} if "draft" not in endpoint
                                     else {})
            status, error = await api(endpoint, "POST", body)
            assert status == 400 and "storage folder" in error["message"], (endpoint, path, error)
            assert str(storage_dir) not in error["message"]
    status, error = await api("admin/datasets/draft", "POST", {"path": str(penguins_csv())})
    assert status == 400 and "outside the service's import folders" in error["message"]
    (jp_root_dir / "p.csv").write_bytes(Path(penguins_csv()).read_bytes())
    status, draft = await api("admin/datasets/draft", "POST", {"path": "p.csv"})
    assert status == 200, draft


async def test_a_lomas_token_works_on_the_embedded_api_as_its_own_user(api) -> None:
    """Issue 24.4: a token issued in the sidebar or by lomas-admin was refused by the embedded service that
    issued it. It is accepted on the lomas API, as its own user (never as the server's owner); a wrong one is
    named as not valid."""
    status, _ = await api("admin/users", "POST", {"username": "bob"})
    assert status == 201
    status, _ = await api("admin/grants", "PUT", {"username": "bob", "dataset": "penguins", "epsilon": 1.0})
    status, issued = await api("admin/users/bob/tokens", "POST", {})
    assert status == 201 and issued["token"].startswith("lomas_")
    as_bob = {"Authorization": f"token {issued['token']}"}
    status, me = await api("whoami", headers=as_bob)
    assert (status, me["username"], me["role"]) == (200, "bob", "analyst")
    status, answer = await api("query", "POST", {"dataset": "penguins", "sql": "SELECT COUNT(*) FROM penguins",
                                                 "epsilon": 0.25}, headers=as_bob)
    assert status == 201, answer
    status, budget = await api("budget/penguins", headers=as_bob)
    assert budget["username"] == "bob" and budget["epsilon_spent"] == answer["cost"]["epsilon"]
    status, error = await api("admin/users", headers=as_bob)
    assert status == 403  # an analyst's token is not the owner's admin role
    assert await spent(api) == 0.0  # the owner was not charged
    status, error = await api("whoami", headers={"Authorization": "token lomas_not-a-real-token"})
    assert status == 401 and "not valid" in error["message"]


async def test_an_admin_without_a_grant_is_told_to_grant_themselves(api) -> None:
    """Issue 24.11: an admin who imports a dataset has no grant on it, and was told to 'ask an admin'."""
    status, _ = await api("admin/datasets", "POST", {"name": "mine", "metadata": penguins_metadata(),
                                                     "data_base64": base64.b64encode(
                                                         Path(penguins_csv()).read_bytes()).decode(),
                                                     "format": "csv"})
    assert status == 201
    status, error = await api("query", "POST", {"dataset": "mine", "sql": "SELECT COUNT(*) FROM mine",
                                                "epsilon": 0.1})
    assert status == 403 and "as an admin, grant yourself one" in error["message"]
    assert "ask an admin" not in error["message"]


async def test_having_order_by_and_limit_are_applied_to_the_release_for_free(api) -> None:
    """Issue 21.1: post-processing runs on the released values, never on the data. The whole release is
    archived, so another HAVING / ORDER BY / LIMIT of the same query is a free replay of it."""
    base = "SELECT island, COUNT(*) AS n, AVG(body_mass_g) AS mass FROM penguins GROUP BY island"
    status, full = await api("query", "POST", {"dataset": "penguins", "sql": base, "epsilon": 0.5})
    assert status == 201 and len(full["rows"]) == 3 and "post_processing" not in full
    charged = await spent(api)
    sql = base + " HAVING n > 60 ORDER BY mass DESC LIMIT 2"
    status, post = await api("query", "POST", {"dataset": "penguins", "sql": sql, "epsilon": 0.5})
    assert status == 201, post
    assert post["replay"] is True and post["cost"]["epsilon"] == 0 and await spent(api) == charged
    expected = sorted((r for r in full["rows"] if r["n"] > 60), key=lambda r: -r["mass"])[:2]
    assert post["rows"] == expected and post["sql"] == sql
    by_island = {r["island"]: i for r, i in zip(full["rows"], full["intervals"])}
    assert post["intervals"] == [by_island[r["island"]] for r in expected]  # each row keeps its intervals
    assert post["post_processing"]["applied"] == ["having", "order", "limit"]
    assert "noisy values" in post["post_processing"]["note"]
    status, preview = await api("preview", "POST", {"dataset": "penguins", "sql": sql, "epsilon": 0.5})
    assert status == 200 and "post_processing" in preview
    status, archive = await api("archive")
    assert len(archive) == 1 and len(archive[0]["result"]["rows"]) == 3  # the archive keeps the whole release
