"""The JupyterLab sidebar (labextension/) in Debian's headless Chromium, against the embedded service: the analyst
view's gauges and releases follow releases made elsewhere without a reload, a ready %%dpquery cell goes into the
open notebook, everything reads well in both themes and works from the keyboard."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from .servers import running_server
from .test_ui import ARTIFACTS, CHROMIUM, CONTRAST_JS, THEMES, pytestmark  # noqa: F401  (same skip rule)

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def lab_settings(folder: Path, theme: str) -> Path:
    folder.mkdir()
    (folder / "overrides.json").write_text(json.dumps({
        "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
        "@jupyterlab/apputils-extension:themes": {"theme": THEMES[theme]},
        "lomas-jupyter:plugin": {"refreshSeconds": 1},
    }))
    return folder


@contextmanager
def lab_with_sidebar(tmp_path: Path, token: str, settings: Path, open_path: str = "lab",
                     embedded_demo: bool = True, viewport_height: int = 900,
                     browser: Any = None) -> Iterator[tuple[str, Any]]:
    """A real JupyterLab (embedded service, the demo dataset) in Chromium with the sidebar open; yields its URL
    and the page. Pass a running browser to open a second Lab beside the first (one Playwright per thread).
    Kernels are shut down before the server stops."""
    from playwright.sync_api import sync_playwright

    args = [f"--IdentityProvider.token={token}", "--LomasApp.workers=1", f"--ServerApp.root_dir={tmp_path}",
            f"--LabApp.app_settings_dir={settings}"] + (["--LomasApp.demo=True"] if embedded_demo else [])
    env = {"LOMAS_STORAGE_DIR": str(tmp_path / "embedded"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "LOMAS_URL": "", "LOMAS_TOKEN": ""}
    headers = {"Authorization": f"token {token}"}
    with running_server("jupyter-lab", args, tmp_path, env, headers) as (url, _pid), ExitStack() as stack:
        if browser is None:
            p = stack.enter_context(sync_playwright())
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
            stack.callback(browser.close)
        context = browser.new_context(viewport={"width": 1400, "height": viewport_height})
        stack.callback(context.close)
        try:
            page = context.new_page()
            page.goto(f"{url}{open_path}?token={token}")
            tab = page.locator("li[data-id='lomas-sidebar']")
            tab.wait_for(timeout=90_000)
            tab.click()
            yield url, page
        finally:
            for kernel in requests.get(f"{url}api/kernels", headers=headers, timeout=30).json():
                requests.delete(f"{url}api/kernels/{kernel['id']}", headers=headers, timeout=60)


@pytest.mark.parametrize("theme", list(THEMES))
def test_the_analyst_view_is_live_readable_and_keyboard_usable(theme: str, tmp_path: Path) -> None:
    token = "sidebar-token"
    headers = {"Authorization": f"token {token}"}
    with lab_with_sidebar(tmp_path, token, lab_settings(tmp_path / "lab", theme)) as (url, page):
        gauge = page.locator(".lomas-sb-gauge[data-dataset='penguins'] [role=progressbar]")
        gauge.wait_for(timeout=60_000)
        assert gauge.get_attribute("aria-valuenow") == "100"
        assert "ε 10 of 10 left" in page.locator(".lomas-sb-gauge[data-dataset='penguins']").inner_text()

        # a release made elsewhere (another client of the same service) shows up without a reload
        r = requests.post(f"{url}lomas/api/query", headers=headers, timeout=120, json={
            "dataset": "penguins", "epsilon": 2.5,
            "sql": "SELECT species, COUNT(*) AS n FROM penguins GROUP BY species"})
        assert r.status_code == 201, r.text
        page.wait_for_function(
            "() => document.querySelector(\".lomas-sb-gauge[data-dataset='penguins'] [role=progressbar]\")"
            ".getAttribute('aria-valuenow') === '75'", timeout=60_000)
        release = page.locator(".lomas-sb-release").first
        release.wait_for(timeout=30_000)
        assert "GROUP BY species" in release.inner_text() and "ε 2.5" in release.inner_text()

        # keyboard: open the release with Enter on its summary; every control has a name
        summary = release.locator("summary")
        summary.focus()
        page.keyboard.press("Enter")
        table = release.locator("table")
        table.wait_for(timeout=10_000)
        assert "Gentoo" in table.inner_text()
        assert _named_and_focusable(page, ".lomas-Panel button, .lomas-Panel summary") >= 2

        # contrast of every text in the panel
        worst = _contrast_of(page, ".lomas-Panel h2, .lomas-Panel h3, .lomas-sb-who, .lomas-sb-gauge-name, "
                                   ".lomas-sb-gauge-label, .lomas-sb-release-sql, .lomas-sb-release-meta, "
                                   ".lomas-sb-insert, .lomas-sb-table td", at_least=8)
        assert worst >= 4.5, f"text contrast {worst:.2f} in the {theme} theme"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"sidebar-{theme}.png"))

        # the button puts a ready %%dpquery cell into the open notebook
        page.get_by_role("menuitem", name="File", exact=True).click()
        page.get_by_text("New", exact=True).first.hover()
        page.locator(".lm-Menu-itemLabel:text-is('Notebook')").first.click()
        accept = page.locator(".jp-Dialog .jp-mod-accept")
        accept.wait_for(timeout=30_000)
        accept.click()  # the kernel chooser
        page.wait_for_selector(".jp-Notebook", timeout=60_000)
        if not page.locator(".lomas-Panel").is_visible():
            page.locator("li[data-id='lomas-sidebar']").click()
        page.locator(".lomas-sb-gauge[data-dataset='penguins'] .lomas-sb-insert").click()
        page.wait_for_function("() => [...document.querySelectorAll('.jp-Cell .jp-InputArea-editor')]"
                               ".some(e => e.textContent.includes('%%dpquery penguins'))", timeout=30_000)
        cell_text = page.locator(".jp-Cell .jp-InputArea-editor:has-text('%%dpquery penguins')").inner_text()
        assert "GROUP BY" in cell_text and "--preview" in cell_text


def _contrast_of(page, selector: str, at_least: int = 5) -> float:  # noqa: ANN001
    """The lowest text contrast among the matches, all read in one go: the panel re-renders every second, so
    reading element by element could meet one that a refresh has just replaced."""
    values = page.evaluate(f"(sel) => Array.from(document.querySelectorAll(sel)).map({CONTRAST_JS})", selector)
    assert len(values) >= at_least and all(v == v for v in values), values  # no NaN: every colour was read
    return min(values)


CONTROLS_JS = """(sel) => Array.from(document.querySelectorAll(sel))
    .filter(el => el.checkVisibility({visibilityProperty: true, opacityProperty: true}))
    .map(el => [el.getAttribute('aria-label') || (el.labels && el.labels.length ? el.labels[0].textContent : '')
                || el.innerText || '', el.tabIndex, el.outerHTML.slice(0, 200)])"""


def _named_and_focusable(page, selector: str) -> int:  # noqa: ANN001
    """Every shown control has a name and takes focus, all read in one go (the live refresh replaces elements);
    controls inside a closed part are checked when it opens."""
    shown = page.evaluate(CONTROLS_JS, selector)
    for name, tab_index, html in shown:
        assert name.strip(), f"a control without an accessible name: {html}"
        assert tab_index >= 0, f"a control out of the keyboard's reach: {html}"
    return len(shown)


SPEND_NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "id": "spend", "metadata": {}, "outputs": [],
               "source": "%load_ext lomas_jupyter\n"},
              {"cell_type": "code", "execution_count": None, "id": "query", "metadata": {}, "outputs": [],
               "source": "%%dpquery penguins --epsilon 1\nSELECT COUNT(*) AS n FROM penguins"}],
    "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
    "nbformat": 4, "nbformat_minor": 5,
}


def test_the_admin_view_adds_a_user_issues_a_token_grants_and_follows_spending(tmp_path: Path) -> None:
    from .test_ui import run_all

    token = "sidebar-admin-token"
    headers = {"Authorization": f"token {token}"}
    (tmp_path / "spend.ipynb").write_text(json.dumps(SPEND_NOTEBOOK))
    with lab_with_sidebar(tmp_path, token, lab_settings(tmp_path / "lab", "light"), "lab/tree/spend.ipynb",
                          viewport_height=1000) as (url, page):
        admin = page.locator(".lomas-sb-admin")
        admin.wait_for(timeout=60_000)
        status = page.locator(".lomas-sb-status")

        page.get_by_label("New user name").fill("ann")
        page.get_by_role("button", name="Add the user").click()
        page.wait_for_function("() => document.querySelector('.lomas-sb-status').textContent.includes('added ann')",
                               timeout=30_000)
        page.get_by_role("button", name="Issue a token for ann").click()
        value = page.get_by_label("New token of ann")
        value.wait_for(timeout=30_000)
        issued = value.input_value()
        assert issued.startswith("lomas_")
        assert page.get_by_role("button", name="Copy the token of ann").is_visible()
        page.get_by_role("button", name="Copy the token of ann").click()
        assert "shown once" in page.locator(".lomas-sb-token").inner_text()  # kept until the next action
        r = requests.get(f"{url}lomas/api/admin/users", headers=headers, timeout=30)
        assert "ann" in {u["username"] for u in r.json()}

        page.locator(".lomas-sb-admin-part > summary:has-text('Grants')").click()
        page.locator(".lomas-sb-form label:has-text('ann') input").check()
        page.get_by_label("Dataset to grant").select_option("penguins")
        page.get_by_label("Epsilon to grant").fill("1.5")
        page.get_by_role("button", name="Set the grant for the chosen users").click()
        page.wait_for_function("() => document.querySelector('.lomas-sb-status').textContent.includes('granted')",
                               timeout=30_000)
        grants = requests.get(f"{url}lomas/api/admin/grants?username=ann", headers=headers, timeout=30).json()
        assert [(g["dataset"], g["epsilon"]) for g in grants] == [("penguins", 1.5)]
        assert page.locator(".lomas-sb-token").inner_text() == ""  # issue 24.11: copied, then gone
        # the view re-reads what it changed: the grants table shows it, the part stays open
        page.locator("[data-part=grants] tr:has(td:text-is('ann')) td:text-is('1.5')").wait_for(timeout=30_000)
        # a failed grant is one line and changes nothing
        page.locator(".lomas-sb-form label:has-text('ann') input").check()
        page.get_by_label("Epsilon to grant").fill("-1")
        page.get_by_role("button", name="Set the grant for the chosen users").click()
        assert "non-negative" in status.inner_text()
        assert requests.get(f"{url}lomas/api/admin/grants?username=ann", headers=headers,
                            timeout=30).json()[0]["epsilon"] == 1.5
        page.get_by_label("Epsilon to grant").fill("")
        page.locator(".lomas-sb-form label:has-text('ann') input").uncheck()

        # courses: create one bound to a Hub group, attach the dataset with a class cap, enrol ann
        page.locator(".lomas-sb-admin-part > summary:has-text('Courses')").click()
        page.get_by_label("New course name").fill("stats101")
        page.get_by_label("Hub group of the new course").fill("stats101-students")
        page.get_by_role("button", name="Create the course").click()
        page.locator("[data-course=stats101]").wait_for(timeout=30_000)
        page.get_by_label("Course", exact=True).select_option("stats101")
        page.get_by_label("Dataset of the course").select_option("penguins")
        page.get_by_label("Epsilon per student").fill("1.5")
        page.get_by_label("Epsilon cap of the class").fill("4")
        page.get_by_role("button", name="Set the per-student grant and the class cap").click()
        page.locator("[data-course=stats101]:has-text('cap 4')").wait_for(timeout=30_000)
        page.get_by_label("Student to add to stats101").fill("ann")
        page.get_by_role("button", name="Add the student to stats101").click()
        page.locator("[data-course=stats101] td:text-is('ann')").wait_for(timeout=30_000)
        course = requests.get(f"{url}lomas/api/admin/courses/stats101", headers=headers, timeout=30).json()
        assert course["members"] == ["ann"] and course["datasets"][0]["epsilon_cap"] == 4

        caption = page.locator(".lomas-sb-chart figcaption")
        assert "0 of 11.5 granted" in caption.inner_text()  # root's 10 and ann's 1.5
        # a query run in the notebook moves the gauge and the burn-down without a reload
        run_all(page)
        page.wait_for_function(
            "() => document.querySelector('.lomas-sb-chart figcaption').textContent.includes(' 1 of 11.5')",
            timeout=120_000)
        assert page.locator(".lomas-sb-gauge[data-dataset='penguins'] [role=progressbar]").get_attribute(
            "aria-valuenow") == "90"
        path = page.locator(".lomas-sb-chart-spent").get_attribute("d")
        assert path and " V" in path

        with page.expect_download() as download:
            page.get_by_role("button", name="Export the filtered ledger as CSV").click()
        csv_text = Path(download.value.path()).read_text()
        assert csv_text.startswith("id,created_at,username,dataset,kind,epsilon,delta")
        assert ",root,penguins,commit,1" in csv_text.replace("\r", "")

        assert _named_and_focusable(page, ".lomas-sb-admin button, .lomas-sb-admin summary, "
                                          ".lomas-sb-admin select, .lomas-sb-admin input") >= 10
        ARTIFACTS.mkdir(exist_ok=True)
        texts = (".lomas-sb-admin summary, .lomas-sb-admin td, .lomas-sb-admin th, .lomas-sb-admin legend, "
                 ".lomas-sb-admin figcaption, .lomas-sb-admin .jp-Button, .lomas-sb-status")
        for theme in ["light", "dark"]:
            if theme == "dark":
                _switch_to_dark(page)
            worst = _contrast_of(page, texts)
            assert worst >= 4.5, f"admin text contrast {worst:.2f} in the {theme} theme"
            admin.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / f"sidebar-admin-{theme}.png"))


PROGRESS_JS = """() => { window.lomasProgress = [];
    new MutationObserver(() => window.lomasProgress.push(document.querySelector('.lomas-sb-progress').textContent))
      .observe(document.querySelector('.lomas-sb-progress'), {childList: true, characterData: true, subtree: true}); }"""


def _status_says(page, words: str) -> None:  # noqa: ANN001
    page.wait_for_function("(w) => document.querySelector('.lomas-sb-status').textContent.includes(w)", arg=words,
                           timeout=60_000)


def test_the_admin_registers_datasets_with_a_reviewed_draft_and_progress(tmp_path: Path) -> None:
    """From the file browser's context menu and from an upload: the file goes up in chunks with progress, a draft
    is proposed from the data and must be reviewed, a mismatch by column name is refused and changes nothing,
    edits in YAML and in the form are what gets saved, and the public metadata is viewable."""
    import polars as pl

    rows = 200_000  # about 3 MB of CSV: two chunks of 2 MiB
    (tmp_path / "visits.csv").write_text(
        "clinic,minutes\n" + "".join(f"clinic{i % 5},{(i * 37) % 120}.5\n" for i in range(rows)))
    pl.DataFrame({"ward": ["a", "b", "c"] * 100, "stay": [float(i % 40) for i in range(300)]}).write_parquet(
        tmp_path / "wards.parquet")
    token = "sidebar-datasets-token"
    headers = {"Authorization": f"token {token}"}

    def stored() -> dict[str, Any]:
        got = requests.get(f"{url}lomas/api/admin/datasets", headers=headers, timeout=30).json()
        return {d["name"]: d for d in got}

    with lab_with_sidebar(tmp_path, token, lab_settings(tmp_path / "lab", "light"), viewport_height=1100) as (
            url, page):
        page.locator(".lomas-sb-admin").wait_for(timeout=60_000)
        page.evaluate(PROGRESS_JS)
        # pick the CSV in the file browser and register it from its context menu
        page.locator("li[data-id='filebrowser']").click()
        item = page.locator(".jp-DirListing-item[title^='Name: visits.csv']")
        item.click()
        item.click(button="right")
        page.locator(".lm-Menu-item:has-text('Register as a DP dataset')").click()
        _status_says(page, "uploaded visits.csv")
        seen = page.evaluate("window.lomasProgress")
        assert any(t.startswith("Uploading: ") and "100%" not in t for t in seen), seen  # a step between
        assert page.locator(".lomas-sb-progress").inner_text().startswith("Uploading: 100%")
        assert page.get_by_label("Dataset name").input_value() == "visits"

        page.get_by_role("button", name="Propose a draft of the metadata from the uploaded data").click()
        _status_says(page, "proposed metadata for 2 columns")
        assert page.get_by_label("Upper bound of minutes (from the data: review)").input_value() == "200"
        # every row arrived once (the file was read from the server in ranges): the row bound is the next round
        # number strictly above the count (issue 24.11: never the count itself, which would publish it)
        assert page.get_by_label("max rows (from the data: review)").input_value() == "500000"
        assert "clinic0, clinic1" in page.get_by_label("Categories of clinic (from the data: review)").input_value()
        assert "rare value" in page.locator(".lomas-sb-review").inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator(".lomas-sb-register").scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "sidebar-datasets-review.png"))
        # never saved without review
        page.get_by_role("button", name="Import the dataset with this metadata").click()
        _status_says(page, "tick")
        assert "visits" not in stored()
        # issue 24.11: the reason stands beside the button, in view, not only at the panel's top
        beside = page.locator(".lomas-sb-import-status")
        assert "tick" in beside.inner_text() and beside.is_visible()
        assert page.evaluate("() => { const r = document.querySelector('.lomas-sb-import-status')"
                             ".getBoundingClientRect(); return r.top >= 0 && r.bottom <= window.innerHeight; }")
        # a description typed in the form is in the YAML view too
        page.get_by_label("Dataset description (public)").fill("Visits to five clinics")

        # a mismatch by column name, written in YAML, is refused and changes nothing
        page.get_by_role("button", name="Switch the metadata editor between the form and YAML").click()
        yaml_box = page.get_by_label("Metadata as YAML")
        text = yaml_box.input_value()
        assert text.startswith("# REVIEW ") and "clinic:" in text and "Visits to five clinics" in text
        yaml_box.fill(text.replace("clinic:", "site:"))
        page.locator(".lomas-sb-register .lomas-sb-check input[aria-describedby]").check()
        page.get_by_role("button", name="Import the dataset with this metadata").click()
        _status_says(page, "site")
        assert "Import refused" in page.locator(".lomas-sb-progress").inner_text()
        assert "visits" not in stored()
        # fixed in YAML (the upload is kept: no second upload), with a public description
        yaml_box.fill(text.replace("description: ''", "description: Clinic visits, 2025"))
        page.get_by_label("Dataset description (public)").fill("Visits to five clinics")
        page.get_by_role("button", name="Import the dataset with this metadata").click()
        _status_says(page, "imported visits version 1")
        assert page.locator(".lomas-sb-progress").inner_text() == "Imported visits version 1"
        visits = stored()["visits"]
        assert visits["description"] == "Visits to five clinics"
        assert visits["metadata"]["columns"]["minutes"]["bounds"] == [0.0, 200.0]

        # the public metadata is viewable in the list
        page.locator("details[data-dataset=visits] > summary").click()
        page.locator("details[data-dataset=visits] th:text-is('clinic')").wait_for(timeout=30_000)
        assert "categories clinic0, clinic1" in page.locator("details[data-dataset=visits]").inner_text()

        # an upload from this machine, with a bound edited in the form
        page.get_by_label("Upload a CSV or Parquet file").set_input_files(str(tmp_path / "wards.parquet"))
        _status_says(page, "uploaded wards.parquet")
        page.get_by_role("button", name="Propose a draft of the metadata from the uploaded data").click()
        _status_says(page, "proposed metadata for 2 columns")
        upper = page.get_by_label("Upper bound of stay (from the data: review)")
        upper.fill("365")
        upper.press("Tab")
        page.get_by_label("Categories of ward (from the data: review)").fill("a, b, c, d")
        page.get_by_label("Categories of ward (from the data: review)").press("Tab")
        page.locator(".lomas-sb-register .lomas-sb-check input[aria-describedby]").check()
        page.get_by_role("button", name="Import the dataset with this metadata").click()
        _status_says(page, "imported wards version 1")
        wards = stored()["wards"]["metadata"]["columns"]
        assert wards["stay"]["bounds"][1] == 365 and wards["ward"]["categories"] == ["a", "b", "c", "d"]

        part = ".lomas-sb-admin details[data-part=datasets]"
        assert _named_and_focusable(page, f"{part} button, {part} input, {part} textarea, {part} summary") >= 8
        texts = f"{part} summary, {part} td, {part} th, {part} legend, {part} p, {part} .jp-Button"
        for theme in ["light", "dark"]:
            if theme == "dark":
                _switch_to_dark(page)
            worst = _contrast_of(page, texts)
            assert worst >= 4.5, f"datasets text contrast {worst:.2f} in the {theme} theme"
            page.screenshot(path=str(ARTIFACTS / f"sidebar-datasets-{theme}.png"))


def _switch_to_dark(page) -> None:  # noqa: ANN001
    page.get_by_role("menuitem", name="Settings", exact=True).click()
    page.get_by_text("Theme", exact=True).first.hover()
    page.get_by_text("JupyterLab Dark", exact=True).first.click()
    page.wait_for_function("() => document.body.dataset.jpThemeLight === 'false'", timeout=30_000)


def test_an_analyst_of_a_remote_standalone_service_sees_only_the_analyst_view(tmp_path: Path) -> None:
    from .servers import add_analyst, lomas_admin

    storage = tmp_path / "service"
    lomas_admin(storage, "demo", "--user", "boss")
    analyst_token = add_analyst(storage, "alice", {"penguins": 2.0})
    service_env = {"JUPYTER_CONFIG_DIR": str(tmp_path / "sconfig"), "JUPYTER_DATA_DIR": str(tmp_path / "sdata")}
    # the browser calls the service from JupyterLab's origin: the service allows it (CORS), tokens in a header
    service_args = [f"--LomasApp.storage_dir={storage}", "--LomasApp.workers=1", "--ServerApp.allow_origin=*"]
    with running_server("jupyter-lomas", service_args, tmp_path, service_env) as (service_url, _):
        settings = lab_settings(tmp_path / "lab", "light")
        overrides = json.loads((settings / "overrides.json").read_text())
        overrides["lomas-jupyter:plugin"] |= {"serviceUrl": service_url, "token": analyst_token}
        (settings / "overrides.json").write_text(json.dumps(overrides))
        with lab_with_sidebar(tmp_path, "sidebar-remote-token", settings, embedded_demo=False) as (url, page):
            page.locator(".lomas-sb-who:has-text('alice (analyst)')").wait_for(timeout=60_000)
            assert "ε 2 of 2 left" in page.locator(".lomas-sb-gauge[data-dataset='penguins']").inner_text()
            assert page.locator(".lomas-sb-admin").count() == 0
            r = requests.post(f"{service_url}lomas/api/query", timeout=120,
                              headers={"Authorization": f"token {analyst_token}"},
                              json={"dataset": "penguins", "epsilon": 0.5, "sql": "SELECT COUNT(*) AS n FROM penguins"})
            assert r.status_code == 201, r.text
            page.wait_for_function(
                "() => document.querySelector(\".lomas-sb-gauge[data-dataset='penguins'] [role=progressbar]\")"
                ".getAttribute('aria-valuenow') === '75'", timeout=60_000)


def _remote_settings(folder: Path, theme: str, service_url: str, token: str) -> Path:
    settings = lab_settings(folder, theme)
    overrides = json.loads((settings / "overrides.json").read_text())
    overrides["lomas-jupyter:plugin"] |= {"serviceUrl": service_url, "token": token}
    (settings / "overrides.json").write_text(json.dumps(overrides))
    return settings


@pytest.mark.parametrize("theme", list(THEMES))
def test_a_budget_request_is_asked_badged_refused_over_the_cap_and_approved_live(theme: str, tmp_path: Path) -> None:
    """Issue 22.1 in two JupyterLabs on one standalone service: the student asks from the sidebar; the
    instructor's tab shows a badge; approving over the class cap is refused with the reason; approving part of it
    shows up in the student's gauge and request list without a reload."""
    from playwright.sync_api import expect

    from lomas_jupyter import Client

    from .servers import lomas_admin

    storage = tmp_path / "service"
    lomas_admin(storage, "demo", "--user", "prof")
    service_env = {"JUPYTER_CONFIG_DIR": str(tmp_path / "sconfig"), "JUPYTER_DATA_DIR": str(tmp_path / "sdata")}
    service_args = [f"--LomasApp.storage_dir={storage}", "--LomasApp.workers=1", "--ServerApp.allow_origin=*"]
    with running_server("jupyter-lomas", service_args, tmp_path, service_env) as (service_url, _):
        prof_token = lomas_admin(storage, "token", "issue", "prof")
        prof = Client(service_url, prof_token)
        prof._call("POST", "admin/users", {"username": "stu", "role": "analyst"})
        stu_token = prof.issue_token("stu")
        prof.create_course("lab", hub_group="lab-students")
        prof.course_dataset("lab", "penguins", epsilon_per_student=1.0, epsilon_cap=1.5)
        prof._call("POST", "admin/courses/lab/members", {"username": "stu"})
        stu = Client(service_url, stu_token)
        stu.query("penguins", "SELECT COUNT(*) FROM penguins", epsilon=1.0)  # the class has 0.5 left

        student_settings = _remote_settings(tmp_path / "lab-stu", theme, service_url, stu_token)
        teacher_settings = _remote_settings(tmp_path / "lab-prof", theme, service_url, prof_token)
        (tmp_path / "stu").mkdir()
        (tmp_path / "prof").mkdir()
        with lab_with_sidebar(tmp_path / "stu", "sidebar-stu", student_settings, embedded_demo=False) as (_, page):
            gauge = page.locator(".lomas-sb-gauge[data-dataset='penguins']")
            gauge.locator("text=ε 0 of 1 left").wait_for(timeout=60_000)
            gauge.get_by_role("button", name="Ask your instructor for more ε on penguins").click()
            form = page.locator(".lomas-sb-request-form")
            form.get_by_label("ε to ask for").fill("0.8")
            form.get_by_label("Reason for the request").fill("for exercise 3")
            form.get_by_role("button", name="Send request").click()
            page.locator(".lomas-sb-request-pending:has-text('waiting for your instructor')").wait_for(timeout=30_000)
            assert form.is_hidden()

            with lab_with_sidebar(tmp_path / "prof", "sidebar-prof", teacher_settings, embedded_demo=False,
                                  browser=page.context.browser) as (_, admin_page):
                tab = admin_page.locator("li[data-id='lomas-sidebar']")
                admin_page.wait_for_function(
                    "() => document.querySelector(\"li[data-id='lomas-sidebar']\").dataset.lomasPending === '1'",
                    timeout=60_000)
                assert tab.get_attribute("data-lomas-pending") == "1"
                pending = admin_page.locator(".lomas-sb-pending").first
                pending.wait_for(timeout=30_000)
                assert "stu asks for ε 0.8 on penguins (class lab)" in pending.inner_text()
                assert "for exercise 3" in pending.inner_text()
                admin_page.screenshot(path=str(ARTIFACTS / f"sidebar-requests-{theme}.png"))
                # all 0.8 would let the class spend past its cap: refused, with the reason, nothing changed
                pending.get_by_role("button", name="Approve request").click()
                admin_page.locator(".lomas-sb-status.lomas-sb-error:has-text('left under its cap')").wait_for(
                    timeout=30_000)
                assert stu.budget("penguins")["epsilon_total"] == 1.0
                amount, note = pending.get_by_label("ε to approve for request"), pending.get_by_label("Note on request")
                # The instructor types while a periodic reload is on its way (its class-spending answer held back
                # here): the reload must not replace the box and wipe what was typed — it once did, and Approve
                # then asked for the whole 0.8 again (the flaky timeout this test had).
                held: list = []
                admin_page.route("**/spending/**", lambda route: held.append(route))
                deadline = time.monotonic() + 60
                while not held and time.monotonic() < deadline:
                    admin_page.wait_for_timeout(50)
                assert held, "the sidebar's periodic reload never asked for the class spending"
                amount.fill("0.5")
                note.fill("0.5 is what the class has left")
                for route in held:
                    route.continue_()
                admin_page.unroute("**/spending/**")
                admin_page.wait_for_function("() => !document.querySelector('.lomas-sb-admin[aria-busy]')",
                                             timeout=30_000)
                expect(amount).to_have_value("0.5")
                expect(note).to_have_value("0.5 is what the class has left")
                pending.get_by_role("button", name="Approve request").click()
                admin_page.locator(".lomas-sb-status:has-text('approved ε 0.5 for stu')").wait_for(timeout=60_000)
                admin_page.wait_for_function(
                    "() => !document.querySelector(\"li[data-id='lomas-sidebar']\").dataset.lomasPending",
                    timeout=30_000)
            # the student's panel, never reloaded: the new budget and the answer
            gauge.locator("text=ε 0.5 of 1.5 left").wait_for(timeout=60_000)
            page.locator(".lomas-sb-request-approved:has-text('approved, ε 0.5 added — 0.5 is what the class has "
                         "left')").wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / f"sidebar-request-answered-{theme}.png"))
        assert stu.budget("penguins")["epsilon_total"] == 1.5
