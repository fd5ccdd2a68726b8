"""Datasets in an S3-compatible object store. No S3 server installs from the package registries here, so the
endpoint is moto's server mode (`ThreadedMotoServer`) on 127.0.0.1; deployments use MinIO or a cloud bucket.

A dataset used in place (a folder of parquet parts) and one imported into the bucket answer like the local one;
the endpoint and credentials reach no API answer, error, log, store row or serialized plan."""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import polars as pl
import pytest
import requests
import sqlalchemy as sa

from lomas_jupyter_server.store import SQLStore

from .servers import BIN, add_analyst, lomas_admin, running_server

BUCKET = "lake"


@pytest.fixture(scope="module")
def object_store() -> Iterator[dict[str, str]]:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "access_key_id": "AKIA" + secrets.token_hex(8).upper(),
               "secret_access_key": "s3cr3t-" + secrets.token_hex(16), "region": "us-east-1", "allow_http": "true"}
    client = boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id=options["access_key_id"],
                          aws_secret_access_key=options["secret_access_key"], region_name=options["region"])
    client.create_bucket(Bucket=BUCKET)
    yield {**options, "client": client}
    server.stop()


def _aws_env(options: dict[str, Any]) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": options["endpoint_url"], "AWS_ACCESS_KEY_ID": options["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": options["secret_access_key"], "AWS_REGION": options["region"],
            "AWS_ALLOW_HTTP": "true"}


def _secrets(options: dict[str, Any]) -> list[str]:
    host_port = options["endpoint_url"].split("//", 1)[1]
    return [options["secret_access_key"], options["access_key_id"], host_port]


@pytest.fixture(scope="module")
def s3_service(object_store: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("s3")
    storage = root / "storage"
    lomas_admin(storage, "demo", "--user", "boss")
    store = SQLStore(storage / "lomas.sqlite3")
    local = store.get_dataset("penguins")
    store.close()
    assert local is not None
    frame = pl.read_parquet(local.parquet_path)
    (root / "meta.json").write_text(json.dumps(local.metadata))
    half = frame.height // 2
    for i, part in enumerate((frame[:half], frame[half:])):  # a folder of parts, as a warehouse exports it
        buffer = io.BytesIO()
        part.write_parquet(buffer)
        object_store["client"].put_object(Bucket=BUCKET, Key=f"exports/penguins/part-{i}.parquet",
                                          Body=buffer.getvalue())
    admin_env = {**os.environ, **_aws_env(object_store)}  # lomas-admin takes the credentials from its environment
    for name, where in (("in_place", ["s3://lake/exports/penguins/", "--in-place"]),
                        ("copied", [local.parquet_path, "--to", "s3://lake/lomas"])):
        done = subprocess.run([str(BIN / "lomas-admin"), "--storage-dir", str(storage), "dataset", "import", name,
                               where[0], "--metadata", str(root / "meta.json"), *where[1:]], check=True,
                              capture_output=True, env=admin_env, text=True)
        if name == "in_place":  # a bucket prefix is listed and checked part by part, as a local folder is
            assert "checked part 1 of 2" in done.stderr and "checked part 2 of 2" in done.stderr, done.stderr
    token = add_analyst(storage, "alice", {"penguins": 100.0, "in_place": 100.0, "copied": 100.0})
    boss = lomas_admin(storage, "token", "issue", "boss")
    config = root / "config"
    config.mkdir()
    # the service gets the object store from its configuration (not its environment) and hands it to workers
    options = {k: v for k, v in object_store.items() if k != "client"}
    (config / "jupyter_server_config.json").write_text(json.dumps({"LomasApp": {"object_store": options}}))
    env = {"JUPYTER_CONFIG_DIR": str(config), "JUPYTER_DATA_DIR": str(root / "data")}
    args = [f"--LomasApp.storage_dir={storage}", "--LomasApp.workers=1", "--log-level=DEBUG",
            "--LomasApp.dataset_url=s3://lake/api-imports"]
    leaked = [k for k in _aws_env(object_store) if k in os.environ]
    assert not leaked, leaked
    with running_server("jupyter-lomas", args, root, env) as (url, _pid):
        yield {"url": url, "token": token, "boss": boss, "root": root, "storage": storage, "truth": frame,
               "metadata": local.metadata}


def _call(service: dict[str, Any], method: str, path: str, body: Any = None, who: str = "token") -> tuple[int, Any]:
    response = requests.request(method, service["url"] + "lomas/api/" + path, json=body, timeout=600,
                                headers={"Authorization": f"token {service[who]}"})
    return response.status_code, response.json()


def test_an_s3_dataset_answers_like_the_local_one(s3_service: dict[str, Any], object_store: dict[str, Any]) -> None:
    keys = [o["Key"] for o in object_store["client"].list_objects_v2(Bucket=BUCKET, Prefix="lomas/")["Contents"]]
    assert len(keys) == 1 and keys[0].startswith("lomas/copied/") and keys[0].endswith(".parquet")
    truth = s3_service["truth"]
    expected = dict(truth.group_by("species").len().iter_rows())
    for dataset in ("penguins", "in_place", "copied"):  # the same table: at home, in place in a bucket, copied
        sql = f"SELECT species, COUNT(*) AS n FROM {dataset} GROUP BY species"
        status, answer = _call(s3_service, "POST", "query", {"dataset": dataset, "sql": sql, "epsilon": 10.0})
        assert status == 201, answer
        counts = {row["species"]: row["n"] for row in answer["rows"]}
        # Laplace noise at epsilon 10: |noise| >= 3 has probability about e^-15 per count
        assert set(counts) == set(expected) and all(abs(counts[k] - expected[k]) < 3 for k in expected), counts


def test_an_import_through_the_api_is_written_to_the_bucket(s3_service: dict[str, Any],
                                                            object_store: dict[str, Any]) -> None:
    import base64

    buffer = io.BytesIO()
    s3_service["truth"].write_parquet(buffer)
    status, record = _call(s3_service, "POST", "admin/datasets", {
        "name": "uploaded", "metadata": s3_service["metadata"], "format": "parquet",
        "data_base64": base64.b64encode(buffer.getvalue()).decode()}, who="boss")
    assert status == 201, record
    assert "s3://" not in json.dumps(record) and "parquet_path" not in record
    listed = object_store["client"].list_objects_v2(Bucket=BUCKET, Prefix="api-imports/uploaded/")
    assert [o["Key"].endswith(".parquet") for o in listed["Contents"]] == [True]
    assert not (s3_service["storage"] / "datasets" / "uploaded").exists()
    assert _call(s3_service, "PUT", "admin/grants", {"username": "alice", "dataset": "uploaded", "epsilon": 10.0},
                 who="boss")[0] == 200
    status, answer = _call(s3_service, "POST", "query", {"dataset": "uploaded", "epsilon": 10.0,
                                                         "sql": "SELECT COUNT(*) AS n FROM uploaded"})
    assert status == 201 and abs(answer["rows"][0]["n"] - s3_service["truth"].height) < 3


def test_credentials_and_locations_appear_nowhere(s3_service: dict[str, Any], object_store: dict[str, Any]) -> None:
    seen: list[str] = []
    for path in ("datasets", "datasets/in_place", "datasets/copied", "budget", "archive"):
        seen.append(json.dumps(_call(s3_service, "GET", path)))
    for path in ("admin/datasets", "admin/audit", "admin/ledger", "admin/archive"):
        seen.append(json.dumps(_call(s3_service, "GET", path, who="boss")))
    status, preview = _call(s3_service, "POST", "preview",
                            {"dataset": "in_place", "sql": "SELECT AVG(body_mass_g) FROM in_place", "epsilon": 1.0})
    assert status == 200
    seen.append(json.dumps(preview))
    # the data goes missing: the query is refused before a row is read, nothing is charged, nothing is named
    object_store["client"].delete_object(Bucket=BUCKET, Key="exports/penguins/part-1.parquet")
    object_store["client"].delete_object(Bucket=BUCKET, Key="exports/penguins/part-0.parquet")
    before = _call(s3_service, "GET", "budget/in_place")[1]
    status, error = _call(s3_service, "POST", "query", {"dataset": "in_place", "fresh": True, "epsilon": 1.0,
                                                        "sql": "SELECT COUNT(*) FROM in_place"})
    assert status == 503 and error["error"] == "dataset_unavailable" and "nothing was" in error["message"].lower()
    assert _call(s3_service, "GET", "budget/in_place")[1]["epsilon_spent"] == before["epsilon_spent"]
    seen.append(json.dumps(error))
    answers = "\n".join(seen)
    for forbidden in [*_secrets(object_store), "s3://", BUCKET + "/", "exports/penguins"]:
        assert forbidden not in answers, forbidden
    # the service's and workers' logs (at DEBUG), and every row of the store: no credential
    logs = "\n".join(p.read_text(errors="replace") for p in s3_service["root"].rglob("*.log"))
    store = SQLStore(s3_service["storage"] / "lomas.sqlite3")
    with store.engine.connect() as conn:
        rows = "\n".join(str(row) for table in ("datasets", "audit", "ledger", "releases")
                         for row in conn.execute(sa.text(f"SELECT * FROM {table}")))
    store.close()
    assert "s3://lake/exports/penguins/" in rows  # the location is the store's to know (never shown)
    for forbidden in _secrets(object_store)[:2]:
        assert forbidden not in logs and forbidden not in rows, forbidden


def test_plans_are_built_without_the_scan_and_the_scan_carries_no_secret(object_store: dict[str, Any],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from lomas_jupyter_server.engine import locations
    from lomas_jupyter_server.engine.metadata import parse_metadata
    from lomas_jupyter_server.engine.plan import Plan
    from lomas_jupyter_server.engine.polars_backend import build_plan
    from lomas_jupyter_server.engine.sql import compile_sql

    for key, value in _aws_env(object_store).items():
        monkeypatch.setenv(key, value)
    buffer = io.BytesIO()
    pl.DataFrame({"x": [1.0, 2.0]}).write_parquet(buffer)
    object_store["client"].put_object(Bucket=BUCKET, Key="plans/x.parquet", Body=buffer.getvalue())
    scan = locations.scan("s3://lake/plans/x.parquet")
    assert scan.select(pl.len()).collect().item() == 2
    serialized = scan.serialize()
    assert not any(s.encode() in serialized for s in _secrets(object_store)[:2])
    doc = {"max_rows": 10, "privacy_unit": 1, "columns": {"x": {"type": "float", "bounds": [0, 5]}}}
    spec = compile_sql("SELECT SUM(x) FROM d", "d", parse_metadata(doc), 100)
    plan = Plan.from_json(spec.to_json(), doc, None)
    frame = build_plan(plan.spec, plan.metadata, plan.bounds, plan.statistics, plan.steps)
    assert b"lake" not in frame.serialize() and not locations.available("s3://lake/plans/missing.parquet")


def test_a_missing_or_unreachable_prefix_is_refused_in_one_line_naming_no_endpoint(object_store: dict[str, Any],
                                                                                tmp_path: Any) -> None:
    meta = {"privacy_unit": 1, "max_rows": 10, "columns": {"x": {"type": "int", "bounds": [0, 9]}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    good = _aws_env(object_store)
    unreachable = {**good, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # nothing listens on the discard port
    for env in (good, unreachable):
        done = subprocess.run([str(BIN / "lomas-admin"), "--storage-dir", str(tmp_path / "storage"), "dataset",
                               "import", "nothing", "s3://lake/nothing-here/", "--in-place", "--metadata",
                               str(tmp_path / "meta.json")], capture_output=True, env={**os.environ, **env},
                              text=True, timeout=300)
        assert done.returncode != 0 and "could not be found in the object store" in done.stderr, done.stderr
        for forbidden in [*_secrets(object_store), "127.0.0.1:9"]:
            assert forbidden not in done.stderr + done.stdout, forbidden
    assert "nothing" not in lomas_admin(tmp_path / "storage", "dataset", "list")
