"""schemathesis against a real standalone server, as an analyst and as an admin: every answer must be one that
`openapi.yaml` documents (status, content type, body schema), and none may be a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from .servers import add_analyst, lomas_admin, running_server

EXAMPLES_PER_OPERATION = 15
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
VICTIM = "fuzz-victim"  # destructive admin calls are pointed at this user, so the admin keeps its own access


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("contract")
    storage = root / "store"
    lomas_admin(storage, "demo", "--user", "boss")
    lomas_admin(storage, "user", "add", VICTIM)
    tokens = {"alice": add_analyst(storage, "alice", {"penguins": 1000}),
              "boss": lomas_admin(storage, "token", "issue", "boss")}
    env = {"JUPYTER_CONFIG_DIR": str(root / "config"), "JUPYTER_DATA_DIR": str(root / "data")}
    args = [f"--LomasApp.storage_dir={storage}", "--LomasApp.workers=1", "--LomasApp.query_timeout=60"]
    with running_server("jupyter-lomas", args, root, env) as (url, _pid):
        yield {"url": url, "tokens": tokens, "log": root / "jupyter-lomas.log"}


def _schema() -> Any:
    raw = yaml.safe_load((resources.files("lomas_jupyter_server.api") / "openapi.yaml").read_text())
    return schemathesis.openapi.from_dict(raw)


def _operations() -> list[Any]:
    return [result.ok() for result in _schema().get_all_operations()]


REAL_QUERIES = [
    "SELECT COUNT(*) FROM penguins",
    "SELECT species, AVG(bill_length_mm), SUM(body_mass_g) FROM penguins GROUP BY species",
    "SELECT island, sex, MEDIAN(flipper_length_mm) FROM penguins WHERE year >= 2008 GROUP BY island, sex",
]


def _on_penguins(drawn: tuple[Any, str, float]) -> Any:
    """A mostly valid query: the real dataset, real SQL and a sane epsilon; the other fields stay random."""
    case, sql, epsilon = drawn
    if isinstance(case.body, dict):
        case.body = {**case.body, "dataset": "penguins", "sql": sql, "epsilon": epsilon}
        case.body.pop("bounds", None)
        case.body.pop("query", None)  # a builder description beside the SQL is a 400 (exactly one of them)
    return case


def _fuzz(operation: Any, strategy: Any, base_url: str, headers: dict[str, str], seen: dict[str, set[int]]) -> None:
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=120)
        case.validate_response(response, checks=CHECKS)
        seen.setdefault(operation.label, set()).add(response.status_code)

    run()


@pytest.mark.slow
@pytest.mark.parametrize("who", ["alice", "boss"])
def test_every_operation_answers_as_documented_and_never_5xx(service: dict[str, Any], who: str) -> None:
    headers = {"Authorization": f"token {service['tokens'][who]}"}
    base_url = service["url"].rstrip("/") + "/lomas/api"
    seen: dict[str, set[int]] = {}
    for operation in _operations():
        path_parameters = {"username": VICTIM} if "{username}" in operation.path else None
        _fuzz(operation, operation.as_strategy(path_parameters=path_parameters), base_url, headers, seen)
        # random names rarely hit a real dataset: also fuzz everything else against the real one
        if "{name}" in operation.path or "{dataset}" in operation.path:
            on_penguins = operation.as_strategy(path_parameters={"name": "penguins", "dataset": "penguins"})
            _fuzz(operation, on_penguins, base_url, headers, seen)
        if operation.path in ("/query", "/preview", "/dummy"):
            real = st.tuples(operation.as_strategy(), st.sampled_from(REAL_QUERIES), st.floats(0.01, 5)).map(_on_penguins)
            _fuzz(operation, real, base_url, headers, seen)
    assert len(seen) == len(_operations())  # every operation was exercised
    if who == "alice":  # an analyst is refused every admin operation, and answered on her own
        answered = {label: codes for label, codes in seen.items() if "/admin/" in label and codes != {403}}
        assert not answered, answered
        assert 200 in seen["GET /budget"] and 200 in seen["GET /whoami"] and 200 in seen["GET /budget/{dataset}"]
        assert 201 in seen["POST /query"] and 200 in seen["POST /preview"] and 200 in seen["POST /dummy"]
    else:
        assert 200 in seen["GET /admin/users"] and 200 in seen["GET /admin/ledger"]
    assert "Traceback" not in Path(service["log"]).read_text()
