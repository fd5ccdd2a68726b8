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


def test_the_service_process_leaves_the_engines_libraries_to_its_workers() -> None:
    """A fast start: `jupyter lomas` imports neither what only workers run (the tasks, OpenDP's plans, SciPy) nor
    the optional IRI grammar that jsonschema would build at import; the workers import the tasks by name."""
    import subprocess
    import sys

    code = ("import sys; from lomas_jupyter_server import launch; launch.skip_slow_optional_imports(); "
            "import lomas_jupyter_server.app; "
            "loaded = [m for m in ('lomas_jupyter_server.engine.tasks', 'lomas_jupyter_server.engine.plan', "
            "'lomas_jupyter_server.engine.noise', 'scipy', 'rfc3987_syntax') if sys.modules.get(m) is not None]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


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


def test_a_course_shares_one_cap_and_only_admins_manage_it(service: dict[str, str]) -> None:
    """Over HTTP against the standalone service: an instructor (admin) sets up a course; students get their grant
    on enrolment, and the class stops at its cap whoever spends; students cannot see or change the course."""
    boss, alice = Client(service["url"], service["boss"]), Client(service["url"], service["alice"])
    call = boss._call
    call("POST", "admin/users", {"username": "carl", "role": "analyst"})
    course = call("POST", "admin/courses", {"name": "stats101", "hub_group": "stats101-students"})
    assert course["members"] == [] and course["hub_group"] == "stats101-students"
    call("PUT", "admin/courses/stats101/datasets",
         {"dataset": "penguins", "epsilon_per_student": 1.0, "epsilon_cap": 1.5})
    for student in ("alice", "carl"):
        course = call("POST", "admin/courses/stats101/members", {"username": student})
    assert course["members"] == ["alice", "carl"]
    carl = Client(service["url"], boss.issue_token("carl"))
    carl.query("penguins", "SELECT COUNT(*) FROM penguins WHERE year = 2007", epsilon=1.0)
    with pytest.raises(LomasError, match="class 'stats101' has reached its cap") as refused:
        alice.query("penguins", "SELECT COUNT(*) FROM penguins WHERE year = 2008", epsilon=0.7)  # her grant allows it
    assert "Nothing was charged" in str(refused.value)
    alice.query("penguins", "SELECT COUNT(*) FROM penguins WHERE year = 2009", epsilon=0.5)
    spending = call("GET", "admin/courses/stats101/spending/penguins")
    assert spending["epsilon_spent"] == pytest.approx(1.5) and spending["epsilon_cap"] == 1.5
    assert spending["per_student"]["carl"]["epsilon_spent"] == pytest.approx(1.0)
    for method, path in (("GET", "admin/courses"), ("GET", "admin/courses/stats101/spending/penguins"),
                         ("POST", "admin/courses/stats101/members")):
        with pytest.raises(LomasError, match="admin role"):
            alice._call(method, path, {"username": "alice"} if method == "POST" else None)
    call("DELETE", "admin/courses/stats101/members/carl")
    with pytest.raises(LomasError, match="not enough budget"):
        carl.query("penguins", "SELECT COUNT(*) FROM penguins WHERE island = 'Dream'", epsilon=0.01)


def test_a_file_larger_than_the_request_limit_imports_in_chunks(service: dict[str, str], tmp_path) -> None:
    """The standalone service takes bodies of at most 4 MB; a 6 MB CSV arrives as an upload in chunks."""
    rows = 400_000
    path = tmp_path / "visits.csv"
    path.write_text("clinic,minutes\n" + "".join(f"clinic{i % 7},{(i * 37) % 120}.25\n" for i in range(rows)))
    assert path.stat().st_size > 4 * 1024 * 1024
    boss = Client(service["url"], service["boss"])
    draft = boss.draft_metadata(path)
    assert draft["rows"] == rows and draft["metadata"]["columns"]["clinic"]["categories"] == [f"clinic{i}" for i in range(7)]
    assert draft["metadata"]["columns"]["minutes"]["bounds"] == [0.0, 200.0]
    with pytest.raises(LomasError, match="max_rows"):
        boss.import_dataset("visits", path, {**draft["metadata"], "max_rows": 1000})
    imported = boss.import_dataset("visits", path, draft["metadata"])
    assert imported["version"] == 1
    boss.grant("boss", "visits", 1.0)
    count = boss.query("visits", "SELECT COUNT(*) AS n FROM visits", 0.5)
    # scale 2 at ε 0.5: a miss of 200 has probability about e^-100
    assert abs(count.df["n"][0] - rows) < 200
    with pytest.raises(LomasError, match="admin"):
        Client(service["url"], service["alice"]).draft_metadata(path)


def test_a_service_that_cannot_start_stops_with_the_reason(tmp_path) -> None:
    """A bad option (or an unreachable database) must not leave a server that answers every request with 404."""
    import subprocess
    import sys
    from pathlib import Path

    argv = [str(Path(sys.executable).parent / "jupyter-lomas"), f"--LomasApp.storage_dir={tmp_path}",
            "--LomasApp.timing_padding=False", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={free_port()}"]
    env = {"JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_DATA_DIR": str(tmp_path / "data"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    import os

    done = subprocess.run(argv + (["--allow-root"] if os.geteuid() == 0 else []), env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "timing_padding" in done.stderr and "expected any of" in done.stderr
