"""JupyterLab in headless Chromium (Debian's) runs the quickstart: the result table and the budget widget render,
and the widget's text is readable in the light and the dark theme."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from .servers import running_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
THEMES = {"light": "JupyterLab Light", "dark": "JupyterLab Dark"}

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and os.environ.get("CI") != "true",
    reason="Debian chromium is not installed (scripts/test.sh installs it)",
)

CONTRAST_JS = """
(el) => {
  const rgb = (s) => (s.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const fg = rgb(getComputedStyle(el).color);
  let node = el, bg = null;
  while (node) {
    const c = rgb(getComputedStyle(node).backgroundColor);
    if (c.length >= 3 && (c.length === 3 || c[3] > 0)) { bg = c; break; }
    node = node.parentElement;
  }
  bg = bg || [255, 255, 255];
  const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
  return (a + 0.05) / (b + 0.05);
}
"""


STARTED_JS = """() => [...document.querySelectorAll('.jp-InputPrompt')].some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))
    || document.querySelector('.jp-Dialog') !== null"""


def run_all(page) -> None:  # noqa: ANN001
    """Run > Run All Cells, accepting any dialog JupyterLab puts up first (e.g. a kernel prompt under load)."""
    for attempt in range(4):
        dialog = page.locator(".jp-Dialog")
        if dialog.count():
            print(f"accepting dialog: {dialog.first.inner_text()[:200]!r}")
            page.locator(".jp-Dialog .jp-mod-accept").first.click()
            page.wait_for_timeout(500)
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_text("Run All Cells", exact=True).click()
        try:
            page.wait_for_function(STARTED_JS, timeout=20_000)
        except Exception:
            print(f"run-all attempt {attempt} started nothing")
            continue
        if not page.locator(".jp-Dialog").count():
            return
    raise AssertionError("Run All Cells never started the notebook")


@pytest.mark.parametrize("theme", list(THEMES))
def test_quickstart_renders_table_and_widget(theme: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    shutil.copy(ROOT / "notebooks" / "quickstart.ipynb", tmp_path / "quickstart.ipynb")
    settings = tmp_path / "settings"
    settings.mkdir()
    (settings / "overrides.json").write_text(json.dumps({
        "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
        "@jupyterlab/apputils-extension:themes": {"theme": THEMES[theme]},
        # render every cell (JupyterLab 4 otherwise detaches cells scrolled out of view)
        "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none", "autoStartDefaultKernel": True},
    }))
    token = "ui-test-token"
    args = [f"--IdentityProvider.token={token}", "--LomasApp.demo=True", "--LomasApp.workers=1",
            f"--ServerApp.root_dir={tmp_path}", f"--LabApp.app_settings_dir={settings}"]
    env = {"LOMAS_STORAGE_DIR": str(tmp_path / "storage"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "LOMAS_URL": "", "LOMAS_TOKEN": ""}
    with running_server("jupyter-lab", args, tmp_path, env) as (url, _pid), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}lab/tree/quickstart.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=60_000)
            # the status bar says "<kernel> | Idle" once a kernel is started and connected to this notebook
            page.wait_for_selector(".jp-StatusBar-Widget:has-text('| Idle')", timeout=90_000)
            run_all(page)
            table = page.wait_for_selector(".lomas-release:not(:has(.lomas-dummy-label)) table", timeout=90_000)
            gauge = page.wait_for_selector(".widget-hprogress", timeout=60_000)
            table.scroll_into_view_if_needed()
            assert "Gentoo" in table.inner_text() and "[" in table.inner_text()
            assert gauge.is_visible()
            label = page.wait_for_selector(".widget-hprogress + .widget-html, .widget-hbox .widget-html-content")
            page.wait_for_function("(el) => el.innerText.includes('release')", arg=label, timeout=60_000)
            assert label.evaluate(CONTRAST_JS) >= 4.5, "budget text is not readable in this theme"
            assert table.evaluate(CONTRAST_JS) >= 4.5
            ARTIFACTS.mkdir(exist_ok=True)
            gauge.scroll_into_view_if_needed()
            shot = ARTIFACTS / f"quickstart-{theme}-widget.png"
            page.screenshot(path=str(shot))
            table.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / f"quickstart-{theme}-table.png"))
            assert shot.stat().st_size > 20_000
            # %lomas describe: a readable table with every category, not a truncated polars repr
            described = page.locator(".lomas-table:has-text('Adelie, Chinstrap, Gentoo')").first
            described.scroll_into_view_if_needed()
            assert "shape:" not in described.inner_text()
            assert described.element_handle().evaluate(CONTRAST_JS) >= 4.5
            page.screenshot(path=str(ARTIFACTS / f"quickstart-{theme}-describe.png"))
            # release.plot(): JupyterLab renders the Vega-Lite chart natively (SVG or canvas)
            chart = page.wait_for_selector(".vega-embed:has-text('DP estimate') svg, .vega-embed canvas",
                                           timeout=60_000)
            chart.scroll_into_view_if_needed()
            box = chart.bounding_box()
            assert box and box["width"] > 200 and box["height"] > 50
            page.screenshot(path=str(ARTIFACTS / f"quickstart-{theme}-plot.png"))
        finally:
            browser.close()
