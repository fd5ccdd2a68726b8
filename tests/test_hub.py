"""A class under a real JupyterHub: the lomas service as a Hub managed service under its own OS user, students'
single-user servers under theirs, configurable-http-proxy from npm, Hub OAuth and Hub tokens."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from lomas_jupyter_server.demo import penguins_csv, penguins_metadata

from .hubs import SERVICE_USER, Hub, hub_unavailable, run_cells, running_hub

# skipped where a Hub cannot run (not root, no npm), except in CI, where that is a failure
pytestmark = [pytest.mark.slow, pytest.mark.skipif(hub_unavailable() is not None and os.environ.get("CI") != "true",
                                                   reason=hub_unavailable() or "")]

STUDENTS = ["ljstudent1", "ljstudent2"]
INSTRUCTOR = "ljteacher"
GROUP = "stats101"


@pytest.fixture(scope="module")
def hub() -> Iterator[Hub]:
    with running_hub(STUDENTS, INSTRUCTOR, GROUP) as running:
        yield running


@pytest.fixture(scope="module")
def course(hub: Hub) -> dict:
    """What an instructor does, over the API the sidebar and `Client` use: import the data, create the course
    bound to the Hub group, attach the dataset with a per-student grant and a class cap."""
    body = {"name": "penguins", "format": "csv", "metadata": penguins_metadata(),
            "data_base64": base64.b64encode(penguins_csv().read_bytes()).decode()}
    r = hub.service("POST", "admin/datasets", INSTRUCTOR, json=body)
    assert r.status_code == 201, r.text
    assert hub.service("POST", "admin/courses", INSTRUCTOR, json={"name": GROUP, "hub_group": GROUP}).status_code == 201
    r = hub.service("PUT", f"admin/courses/{GROUP}/datasets", INSTRUCTOR, json={
        "dataset": "penguins", "epsilon_per_student": 2.0, "epsilon_cap": 3.0, "delta_per_student": 1e-6,
        "delta_cap": 1e-5})
    assert r.status_code == 200, r.text
    hub.set_group(GROUP, add=STUDENTS)
    return r.json()


def test_hub_users_become_lomas_users_and_only_instructors_administer(hub: Hub) -> None:
    student = hub.service("GET", "whoami", "ljstudent1").json()
    assert student["username"] == "ljstudent1" and student["role"] == "analyst"  # created on first use
    assert hub.service("GET", "whoami", INSTRUCTOR).json()["role"] == "admin"  # by the custom:lomas:admin scope
    for method, path in [("GET", "admin/users"), ("GET", "admin/ledger"), ("GET", "admin/courses"),
                         ("POST", "admin/courses"), ("GET", "admin/archive")]:
        r = hub.service(method, path, "ljstudent1", json={"name": "mine", "hub_group": "x"})
        assert r.status_code == 403 and "admin" in r.json()["message"], (method, path, r.text)
    r = requests.get(f"{hub.url}services/lomas/lomas/api/whoami", headers={"Authorization": "token forged"})
    assert r.status_code in (401, 403)
    # the Hub service serves the DP API and nothing else
    for path in ["api/contents", "api/kernels", "files/lomas.sqlite3", "lomas.sqlite3"]:
        r = requests.get(f"{hub.url}services/lomas/{path}", headers={"Authorization": f"token {hub.token(INSTRUCTOR)}"})
        assert r.status_code == 404, (path, r.status_code)


def test_students_query_from_their_own_kernels_and_are_charged(hub: Hub, course: dict) -> None:
    server = hub.start_server("ljstudent1")
    token = hub.token("ljstudent1")
    # the student's own server runs no DP service: its lomas/api/ (the sidebar's) is the Hub service, called with
    # the server's own token, so it is the student and nothing more
    mine = {"Authorization": f"token {token}"}
    r = requests.get(server + "lomas/api/whoami", headers=mine, timeout=60)
    assert r.status_code == 200 and (r.json()["username"], r.json()["role"]) == ("ljstudent1", "analyst"), r.text
    r = requests.get(server + "lomas/api/admin/ledger", headers=mine, timeout=60)
    assert r.status_code == 403 and "admin" in r.json()["message"]
    other = {"Authorization": f"token {hub.token('ljstudent2')}"}
    assert requests.get(server + "lomas/api/whoami", headers=other, timeout=60,
                        allow_redirects=False).status_code in (302, 403)
    out = run_cells(server, token, [
        "%load_ext lomas_jupyter",
        "%lomas status",
        "%%dpquery penguins --epsilon 0.5 -o answer\nSELECT species, COUNT(*) AS n FROM penguins GROUP BY species",
        "print(sorted(answer['species'].to_list()))",
        "from lomas_jupyter import Client; b = Client().budget('penguins'); print('SPENT', b['epsilon_spent'], "
        "b['epsilon_total'])",
    ])
    assert "you are ljstudent1 (analyst)" in out[1] and "(JupyterHub)" in out[1], out
    assert "ERROR" not in "".join(out), out
    assert "['Adelie', 'Chinstrap', 'Gentoo']" in out[3], out
    spent, total = (float(x) for x in out[4].split("SPENT")[1].split())
    assert 0.49 < spent <= 0.5 and total == 2.0
    spending = hub.service("GET", f"admin/courses/{GROUP}/spending/penguins", INSTRUCTOR).json()
    assert spending["per_student"]["ljstudent1"]["epsilon_spent"] == pytest.approx(spent)
    assert spending["epsilon_spent"] == pytest.approx(spent)


def test_a_student_kernel_cannot_read_the_services_files(hub: Hub, course: dict) -> None:
    files = [str(p) for p in hub.storage.rglob("*") if p.suffix in (".parquet", ".sqlite3")]
    assert any(f.endswith(".parquet") for f in files) and any(f.endswith(".sqlite3") for f in files)
    server = hub.start_server("ljstudent2")
    code = f"""
import os, pwd, sqlite3
print('UID', pwd.getpwuid(os.getuid()).pw_name)
for path in {files!r} + [{str(hub.storage)!r}]:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        elif path.endswith('.sqlite3'):
            sqlite3.connect(f'file:{{path}}?mode=ro', uri=True).execute('SELECT * FROM ledger').fetchall()
        else:
            open(path, 'rb').read(4)
        print('READ', path)
    except (PermissionError, sqlite3.OperationalError) as err:
        print('REFUSED', type(err).__name__)
"""
    out = run_cells(server, hub.token("ljstudent2"), [code])[0]
    assert "UID ljstudent2" in out, out
    assert "READ" not in out and out.count("REFUSED") == len(files) + 1, out
    owner = {Path(f).stat().st_uid for f in files}
    import pwd

    assert owner == {pwd.getpwnam(SERVICE_USER).pw_uid}


def test_students_never_see_each_others_releases(hub: Hub, course: dict) -> None:
    r = hub.service("POST", "query", "ljstudent2", json={"dataset": "penguins", "epsilon": 0.25,
                                                          "sql": "SELECT COUNT(*) AS n FROM penguins"})
    assert r.status_code == 201, r.text
    mine = hub.service("GET", "archive", "ljstudent2").json()
    assert mine and {rec.get("username", "ljstudent2") for rec in mine} == {"ljstudent2"}
    theirs = hub.service("GET", "archive", "ljstudent1").json()
    assert r.json()["release_id"] not in {rec["id"] for rec in theirs}
    assert hub.service("GET", "admin/archive", "ljstudent1").status_code == 403


def test_the_instructor_sees_class_spending_plotted_from_a_kernel(hub: Hub, course: dict) -> None:
    server = hub.start_server(INSTRUCTOR)
    out = run_cells(server, hub.token(INSTRUCTOR), [
        "%load_ext lomas_jupyter",
        f"chart = get_ipython().run_line_magic('lomas', 'class {GROUP} penguins'); "
        "import json; print(json.dumps(chart.spec))",
    ])
    assert "ERROR" not in "".join(out), out
    assert "whole class" in out[1] and "ljstudent1" in out[1]
    spec = json.loads(out[1].strip().splitlines()[-1])
    bars = {row["who"]: row["spent"] for row in spec["layer"][0]["data"]["values"]}
    assert bars["whole class"] == pytest.approx(sum(v for k, v in bars.items() if k != "whole class"))
    assert spec["layer"][1]["data"]["values"][0]["cap"] == 3.0


def test_concurrent_students_stop_exactly_at_the_class_cap(hub: Hub, course: dict) -> None:
    students = [f"capstudent{i}" for i in range(6)]
    assert hub.api("POST", "groups/capclass").status_code in (201, 409)
    hub.set_group("capclass", add=students)
    assert hub.service("POST", "admin/courses", INSTRUCTOR, json={"name": "capclass", "hub_group": "capclass"}).ok
    r = hub.service("PUT", "admin/courses/capclass/datasets", INSTRUCTOR, json={
        "dataset": "penguins", "epsilon_per_student": 1.0, "epsilon_cap": 2.0})
    assert r.ok, r.text
    for student in students:  # first use: each becomes a lomas user enrolled by their Hub group
        assert hub.service("GET", "budget/penguins", student).json()["epsilon_total"] == 1.0

    def ask(student: str) -> tuple[str, int, str]:
        r = hub.service("POST", "query", student, json={"dataset": "penguins", "epsilon": 0.25, "fresh": True,
                                                         "sql": "SELECT COUNT(*) AS n FROM penguins"})
        return student, r.status_code, r.text

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(ask, students * 4))
    granted = [r for r in results if r[1] == 201]
    refused = [r for r in results if r[1] != 201]
    assert len(granted) == 8, results  # 2.0 / 0.25
    assert all(r[1] == 403 and "class 'capclass'" in r[2] for r in refused), refused
    spending = hub.service("GET", "admin/courses/capclass/spending/penguins", INSTRUCTOR).json()
    assert 2.0 - 1e-6 <= spending["epsilon_spent"] <= 2.0
    assert all(s["epsilon_spent"] <= 1.0 for s in spending["per_student"].values())
    # a top-up lets the class go on
    assert hub.service("PUT", "admin/courses/capclass/datasets", INSTRUCTOR, json={
        "dataset": "penguins", "epsilon_per_student": 1.0, "epsilon_cap": 2.25}).ok
    assert ask(students[0])[1] == 201


def test_a_student_removed_from_the_group_loses_access(hub: Hub, course: dict) -> None:
    query = {"dataset": "penguins", "epsilon": 0.1, "fresh": True, "sql": "SELECT COUNT(*) AS n FROM penguins"}
    assert hub.service("POST", "query", "ljstudent2", json=query).status_code == 201
    hub.set_group(GROUP, remove=["ljstudent2"])
    r = hub.service("POST", "query", "ljstudent2", json=query)
    assert r.status_code in (403, 404) and "budget" in r.json()["message"], r.text
    assert hub.service("GET", "budget/penguins", "ljstudent2").json()["epsilon_remaining"] == 0
    members = hub.service("GET", f"admin/courses/{GROUP}", INSTRUCTOR).json()["members"]
    assert "ljstudent2" not in members and "ljstudent1" in members


def test_browsers_sign_in_through_hub_oauth(hub: Hub, course: dict) -> None:
    for user, role in [("ljstudent1", "student"), (INSTRUCTOR, "instructor")]:
        browser = requests.Session()
        browser.get(f"{hub.url}hub/login")
        r = browser.post(f"{hub.url}hub/login", data={"username": user, "password": "any",
                                                      "_xsrf": browser.cookies["_xsrf"]})
        assert r.ok
        page = browser.get(f"{hub.url}services/lomas/")
        assert page.status_code == 200 and f"Signed in as <b>{user}</b>, {role}" in page.text, page.text[:500]
        assert any(h.status_code == 302 for h in page.history)  # through the Hub's OAuth
        me = browser.get(f"{hub.url}services/lomas/lomas/api/whoami").json()
        assert me["username"] == user and me["role"] == ("admin" if role == "instructor" else "analyst")
    # no cookie, no token: the API says who to be, the page sends the browser to the Hub
    assert requests.get(f"{hub.url}services/lomas/lomas/api/whoami").status_code == 401
    r = requests.get(f"{hub.url}services/lomas/", allow_redirects=False)
    assert r.status_code == 302 and "/hub/api/oauth2/authorize" in r.headers["Location"]


def test_a_course_shows_who_in_its_group_has_not_started(hub: Hub, course: dict) -> None:
    hub.set_group(GROUP, add=["ljlate"])  # a Hub user who has never called the service
    one = hub.service("GET", f"admin/courses/{GROUP}", INSTRUCTOR).json()
    assert "ljlate" in one["waiting"] and "ljlate" not in one["members"]
    assert set(one["waiting"]).isdisjoint(one["members"])
    listed = {c["name"]: c for c in hub.service("GET", "admin/courses", INSTRUCTOR).json()}
    assert listed[GROUP]["waiting"] == one["waiting"]
    out = run_cells(hub.start_server(INSTRUCTOR), hub.token(INSTRUCTOR),
                    ["%load_ext lomas_jupyter", f"%lomas class {GROUP} penguins"])
    assert "not started yet (in the Hub group): " in out[1] and "ljlate" in out[1].split("not started yet")[1], out
    # the first request enrols them with the per-student grant
    assert hub.service("GET", "budget/penguins", "ljlate").json()["epsilon_total"] == 2.0
    after = hub.service("GET", f"admin/courses/{GROUP}", INSTRUCTOR).json()
    assert "ljlate" in after["members"] and "ljlate" not in after["waiting"]


def test_a_hub_user_an_instructor_removed_is_refused_with_the_reason(hub: Hub) -> None:
    assert hub.service("GET", "whoami", "ljgone").json()["role"] == "analyst"
    r = hub.service("DELETE", "admin/users/ljgone", INSTRUCTOR)
    assert r.ok, r.text
    for path in ["whoami", "budget"]:
        r = hub.service("GET", path, "ljgone")
        assert r.status_code == 403 and "removed by an admin" in r.json()["message"], r.text


def test_the_sidebar_works_in_jupyterlab_under_the_hub(hub: Hub, course: dict) -> None:
    """In Chromium: the instructor logs in to the Hub and opens JupyterLab in their own server. The sidebar's calls
    go through that server (its login and XSRF check) to the Hub service as the instructor, so the admin view
    appears and a grant made there (a PUT) lands in the service."""
    from playwright.sync_api import sync_playwright

    from .test_sidebar import BROWSER_ARGS
    from .test_ui import CHROMIUM

    hub.start_server(INSTRUCTOR)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{hub.url}hub/login")
            page.locator("input[name=username]").fill(INSTRUCTOR)
            page.locator("input[name=password]").fill("any")
            page.locator("input[type=submit], button[type=submit]").first.click()
            page.wait_for_url(lambda url: "/hub/login" not in url, timeout=60_000)
            page.goto(f"{hub.url}user/{INSTRUCTOR}/lab")
            tab = page.locator("li[data-id='lomas-sidebar']")
            tab.wait_for(timeout=180_000)
            tab.click()
            page.locator(".lomas-sb-admin").wait_for(timeout=60_000)
            assert INSTRUCTOR in page.locator(".lomas-sb-who").first.inner_text()
            page.locator(".lomas-sb-admin-part > summary:has-text('Grants')").click()
            page.locator(f".lomas-sb-form label:has-text('{INSTRUCTOR}') input").check()
            page.get_by_label("Dataset to grant").select_option("penguins")
            page.get_by_label("Epsilon to grant").fill("0.7")
            page.get_by_role("button", name="Set the grant for the chosen users").click()
            page.wait_for_function(
                "() => document.querySelector('.lomas-sb-status').textContent.includes('granted')", timeout=60_000)
            grants = hub.service("GET", f"admin/grants?username={INSTRUCTOR}", INSTRUCTOR).json()
            assert [(g["dataset"], g["epsilon"]) for g in grants] == [("penguins", 0.7)]
            page.locator(".lomas-sb-gauge[data-dataset='penguins']").wait_for(timeout=60_000)
        finally:
            browser.close()
