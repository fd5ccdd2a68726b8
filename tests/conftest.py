from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError

pytest_plugins = ["pytest_jupyter.jupyter_server"]

Api = Callable[..., Awaitable[tuple[int, Any]]]


@pytest.fixture
def storage_dir(tmp_path: Path) -> Path:
    path = tmp_path / "lomas-storage"
    path.mkdir()
    return path


@pytest.fixture
def lomas_config(storage_dir: Path) -> dict[str, Any]:
    return {"storage_dir": str(storage_dir), "workers": 1, "pricing_workers": 1, "demo": True, "demo_epsilon": 10.0,
            "local_username": "owner"}


@pytest.fixture
def jp_server_config(lomas_config: dict[str, Any]) -> dict[str, Any]:
    # pytest-jupyter isolates Jupyter's paths, so the shipped jupyter-config file is not seen: enable here.
    return {
        "ServerApp": {"jpserver_extensions": {"lomas_jupyter_server": True}, "allow_unauthenticated_access": False},
        "LomasApp": lomas_config,
    }


@pytest.fixture
def lomas_app(jp_serverapp: Any) -> Any:
    return jp_serverapp.extension_manager.extension_points["lomas"].app


@pytest.fixture
def api(jp_fetch: Any) -> Api:
    """Call a lomas endpoint; returns (status, decoded JSON) for success and error answers alike."""

    async def call(path: str, method: str = "GET", body: Any = None, raw: bytes | None = None,
                   headers: dict[str, str] | None = None, request_timeout: float | None = None,
                   **params: Any) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"method": method, "params": params or None}
        if request_timeout is not None:  # a first Spark query starts a driver: not for the default 20 s
            kwargs["request_timeout"] = request_timeout
        if headers is not None:
            kwargs["headers"] = headers
        if raw is not None:
            kwargs["body"] = raw
        elif body is not None:
            kwargs["body"] = json.dumps(body)
        elif method in ("POST", "PUT", "PATCH"):
            kwargs["body"] = "{}"
        try:
            response = await jp_fetch("lomas", "api", *path.split("/"), **kwargs)
        except HTTPClientError as err:
            assert err.response is not None, err
            return err.code, json.loads(err.response.body or b"null")
        return response.code, json.loads(response.body or b"null")

    return call


@pytest.fixture(scope="session")
def postgres() -> Any:
    """One throwaway PostgreSQL cluster for the session (started on first use); each test takes a new database."""
    import os

    from .postgres import PostgresCluster, server_bin

    if server_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL's server is missing: scripts/test.sh installs it from the Debian packages")
        pytest.skip("PostgreSQL's server is not installed (scripts/test.sh installs it)")
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store's database, once on a SQLite file and once on PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "store.sqlite3")
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture(scope="session")
def spark_cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A Spark standalone master and one worker on 127.0.0.1 for the session (started on first use): the
    remote path, where the exact stage runs on the cluster's executors."""
    import os

    from .spark import SparkCluster, java_available

    if not java_available():
        if os.environ.get("CI"):
            pytest.fail("Java is missing: scripts/test.sh installs default-jre-headless from the Debian packages")
        pytest.skip("Java is not installed (scripts/test.sh installs it)")
    cluster = SparkCluster(tmp_path_factory.mktemp("spark")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def spark_connect(spark_cluster: Any) -> str:
    """A Spark Connect server on the session's cluster: its sc:// URL (stopped with the cluster)."""
    return spark_cluster.start_connect()
