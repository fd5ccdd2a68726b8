"""`jupyter lomas`: the service in its own process, with per-user API tokens and nothing but the DP API."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from lomas_jupyter import Client, LomasError

from .servers import add_analyst, free_port, lomas_admin, running_server


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("standalone")
    storage = root / "storage"
    lomas_admin(storage, "demo", "--user", "boss")
    tokens = {"alice": add_analyst(storage, "alice", {"penguins": 1.0}),
              "boss": lomas_admin(storage, "token", "issue", "boss")}
    env = {"JUPYTER_CONFIG_DIR": str(root / "config"), "JUPYTER_DATA_DIR": str(root / "data")}
    args = [f"--LomasApp.storage_dir={storage}", "--LomasApp.workers=1"]
    with running_server("jupyter-lomas", args, root, env) as (url, _pid):
        yield {"url": url, **tokens, "storage": str(storage)}


def test_tokens_identify_users_and_roles(service: dict[str, str]) -> None:
    alice = Client(service["url"], service["alice"])
    assert alice.whoami()["username"] == "alice" and alice.whoami()["role"] == "analyst"
    boss = Client(service["url"], service["boss"])
    assert boss.whoami()["role"] == "admin"
    assert {u["username"] for u in boss.users()} == {"alice", "boss"}
    with pytest.raises(LomasError, match="admin role"):
        alice.users()


def test_query_over_http_with_the_python_client(service: dict[str, str]) -> None:
    alice = Client(service["url"], service["alice"])
    release = alice.query("penguins", "SELECT island, COUNT(*) AS n FROM penguins GROUP BY island", epsilon=0.25)
    assert release.df.columns == ["island", "n"] and release.df.height == 3
    assert set(release.with_intervals().columns) == {"island", "n", "n_low", "n_high"}
    assert release.covers == {"n": "the number of rows"} and release.plan["mechanism"] == "laplace"
    budget = alice.budget("penguins")
    assert budget["epsilon_spent"] == pytest.approx(release.cost["epsilon"]) and budget["epsilon_spent"] <= 0.25
    with pytest.raises(LomasError) as info:
        alice.query("penguins", "SELECT COUNT(*) FROM penguins", epsilon=5.0)
    assert "costs epsilon=5" in str(info.value) and info.value.code == "insufficient_budget"
    assert alice.budget("penguins")["epsilon_spent"] == budget["epsilon_spent"]


def test_missing_or_wrong_tokens_are_refused(service: dict[str, str]) -> None:
    for headers in ({}, {"Authorization": "token lomas_not-a-real-token"}):
        response = requests.get(service["url"] + "lomas/api/datasets", headers=headers, timeout=10)
        assert response.status_code == 401 and "token" in response.json()["message"]
    with pytest.raises(LomasError):
        Client(service["url"], "lomas_wrong").datasets()


def test_only_the_dp_api_is_exposed(service: dict[str, str]) -> None:
    headers = {"Authorization": f"token {service['boss']}"}
    for path in ("api/contents", "api/kernels", "api/sessions", "api/terminals", "files/x", "lab"):
        response = requests.get(service["url"] + path, headers=headers, timeout=10)
        assert response.status_code == 404, path


def test_unreachable_service_is_one_clear_error() -> None:
    with pytest.raises(LomasError, match="unreachable"):
        Client(f"http://127.0.0.1:{free_port()}/", "x").datasets()


def test_delta_is_spent_only_when_gaussian_noise_is_chosen(service: dict[str, str]) -> None:
    boss = Client(service["url"], service["boss"])
    boss.grant("boss", "penguins", 5.0, 1e-5)
    many = ("SELECT species, island, sex, COUNT(*), AVG(bill_length_mm), MEDIAN(bill_length_mm), "
            "AVG(bill_depth_mm), MEDIAN(bill_depth_mm), AVG(flipper_length_mm), MEDIAN(flipper_length_mm), "
            "AVG(body_mass_g), MEDIAN(body_mass_g) FROM penguins GROUP BY species, island, sex")
    before = boss.budget("penguins")
    preview = boss.preview("penguins", many, 0.5, 1e-6)
    assert preview["plan"]["mechanism"] == "gaussian" and preview["cost"]["delta"] == 1e-6
    release = boss.query("penguins", many, 0.5, 1e-6)
    assert release.cost == preview["cost"] and release.plan["choice"]["mechanism"] == "gaussian"
    single = boss.query("penguins", "SELECT COUNT(*) FROM penguins", 0.5, 1e-6)
    assert single.cost["delta"] == 0.0 and "no δ is spent" in single.plan["choice"]["reason"]
    after = boss.budget("penguins")
    assert after["delta_spent"] == pytest.approx(before["delta_spent"] + 1e-6, abs=1e-15)
    assert after["epsilon_spent"] == pytest.approx(before["epsilon_spent"] + release.cost["epsilon"]
                                                   + single.cost["epsilon"])
