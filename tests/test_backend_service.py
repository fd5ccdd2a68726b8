"""A dataset's backend, through the real service: the embedded engine and a Spark standalone cluster answer
with the price the preview stated, and a backend the service cannot reach is a clear 4xx that charges nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lomas_jupyter_server.demo import penguins_csv, penguins_metadata

SQL = "SELECT species, COUNT(*) AS n, AVG(bill_length_mm) AS bill, MEDIAN(body_mass_g) AS mass FROM {} GROUP BY species"


async def _import(api: Any, root: Path, name: str, backend: str) -> None:
    (root / "penguins.csv").write_bytes(Path(penguins_csv()).read_bytes())
    status, body = await api("admin/datasets", "POST", {"name": name, "path": "penguins.csv",
                                                        "metadata": penguins_metadata() | {"backend": backend}})
    assert status == 201, body
    status, body = await api("admin/grants", "PUT", {"username": "owner", "dataset": name, "epsilon": 5.0})
    assert status in (200, 201), body


async def _spent(api: Any, name: str) -> float:
    status, budget = await api(f"budget/{name}")
    assert status == 200
    return budget["epsilon_spent"]


async def _answers_at_its_price(api: Any, name: str, backend: str) -> dict[str, Any]:
    body = {"dataset": name, "sql": SQL.format(name), "epsilon": 0.9}
    status, preview = await api("preview", "POST", body)
    assert status == 200, preview
    assert preview["plan"]["backend"] == backend
    status, result = await api("query", "POST", body, request_timeout=600)
    assert status == 201, result
    assert result["plan"]["backend"] == backend and result["cost"] == preview["cost"]
    assert [r["species"] for r in result["rows"]] == ["Adelie", "Chinstrap", "Gentoo"]
    for row, interval in zip(result["rows"], result["intervals"]):
        assert interval["n"][0] <= row["n"] <= interval["n"][1]
        assert 30.0 <= interval["bill"][0] <= row["bill"] <= interval["bill"][1] <= 60.0
        assert 2700 <= row["mass"] <= 6300
    assert await _spent(api, name) == pytest.approx(result["cost"]["epsilon"])
    return result


async def test_the_embedded_engine_answers_at_the_previewed_price(api: Any, jp_root_dir: Path) -> None:
    await _import(api, jp_root_dir, "big", "embedded")
    await _answers_at_its_price(api, "big", "embedded")
    # the dataset's description says which engine serves it (public, as the rest of its metadata)
    status, described = await api("datasets/big")
    assert status == 200 and described["metadata"]["backend"] == "embedded"


async def test_a_spark_dataset_without_a_cluster_is_a_clear_4xx_and_charges_nothing(api: Any,
                                                                                     jp_root_dir: Path) -> None:
    await _import(api, jp_root_dir, "onspark", "spark")
    for path in ("preview", "query"):
        status, body = await api(path, "POST", {"dataset": "onspark", "sql": SQL.format("onspark"), "epsilon": 0.5})
        assert 400 <= status < 500 and "Spark" in body["message"] and "spark_remote" in body["message"], body
    assert await _spent(api, "onspark") == 0.0


def test_a_bad_backend_name_in_metadata_is_refused() -> None:
    from lomas_jupyter_server.engine.metadata import parse_metadata
    from lomas_jupyter_server.errors import MetadataError

    with pytest.raises(MetadataError, match="backend must be one of"):
        parse_metadata(penguins_metadata() | {"backend": "oracle"})


@pytest.fixture
def lomas_config(storage_dir: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    config = {"storage_dir": str(storage_dir), "workers": 1, "pricing_workers": 1, "demo": True,
              "demo_epsilon": 10.0, "local_username": "owner"}
    if "spark" in request.keywords:
        config["spark_remote"] = request.getfixturevalue("spark_cluster").url
    return config


@pytest.mark.spark
async def test_a_spark_cluster_answers_at_the_previewed_price(api: Any, jp_root_dir: Path) -> None:
    """The worker's Spark driver sends the exact stage to the standalone cluster's executor; the noise is added
    back in the worker; a second query reuses the warm session."""
    await _import(api, jp_root_dir, "onspark", "spark")
    first = await _answers_at_its_price(api, "onspark", "spark")
    body = {"dataset": "onspark", "sql": "SELECT COUNT(*) AS n FROM onspark WHERE year >= 2008", "epsilon": 0.5}
    status, second = await api("query", "POST", body, request_timeout=600)
    assert status == 201 and second["plan"]["backend"] == "spark"
    assert await _spent(api, "onspark") == pytest.approx(first["cost"]["epsilon"] + second["cost"]["epsilon"])
