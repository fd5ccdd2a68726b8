"""The JupyterLab sidebar (labextension/) in Debian's headless Chromium, against the embedded service: the analyst
view's gauges and releases follow releases made elsewhere without a reload, a ready %%dpquery cell goes into the
open notebook, everything reads well in both themes and works from the keyboard."""

from __future__ import annotations

import json
from pathlib import Path

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


@pytest.mark.parametrize("theme", list(THEMES))
def test_the_analyst_view_is_live_readable_and_keyboard_usable(theme: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    token = "sidebar-token"
    args = [f"--IdentityProvider.token={token}", "--LomasApp.demo=True", "--LomasApp.workers=1",
            f"--ServerApp.root_dir={tmp_path}", f"--LabApp.app_settings_dir={lab_settings(tmp_path / 'lab', theme)}"]
    env = {"LOMAS_STORAGE_DIR": str(tmp_path / "storage"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "LOMAS_URL": "", "LOMAS_TOKEN": ""}
    headers = {"Authorization": f"token {token}"}
    with running_server("jupyter-lab", args, tmp_path, env, headers) as (url, _pid), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}lab?token={token}")
            tab = page.locator("li[data-id='lomas-sidebar']")
            tab.wait_for(timeout=90_000)
            tab.click()
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
            controls = page.locator(".lomas-Panel button, .lomas-Panel summary")
            assert controls.count() >= 2
            for i in range(controls.count()):
                control = controls.nth(i)
                name = control.get_attribute("aria-label") or control.inner_text()
                assert name.strip(), "a control without an accessible name"
                assert control.evaluate("(el) => el.tabIndex") >= 0

            # contrast of every text in the panel
            texts = page.locator(".lomas-Panel h2, .lomas-Panel h3, .lomas-sb-who, .lomas-sb-gauge-name, "
                                 ".lomas-sb-gauge-label, .lomas-sb-release-sql, .lomas-sb-release-meta, "
                                 ".lomas-sb-insert, .lomas-sb-table td")
            assert texts.count() >= 8
            worst = min(texts.nth(i).evaluate(CONTRAST_JS) for i in range(texts.count()))
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
            tab.click() if not page.locator(".lomas-Panel").is_visible() else None
            page.locator(".lomas-sb-gauge[data-dataset='penguins'] .lomas-sb-insert").click()
            page.wait_for_function("() => [...document.querySelectorAll('.jp-Cell .jp-InputArea-editor')]"
                                   ".some(e => e.textContent.includes('%%dpquery penguins'))", timeout=30_000)
            cell_text = page.locator(".jp-Cell .jp-InputArea-editor:has-text('%%dpquery penguins')").inner_text()
            assert "GROUP BY" in cell_text and "--preview" in cell_text
        finally:
            for kernel in requests.get(f"{url}api/kernels", headers=headers, timeout=30).json():
                requests.delete(f"{url}api/kernels/{kernel['id']}", headers=headers, timeout=60)
            browser.close()
