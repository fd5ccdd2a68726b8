"""The sidebar ships inside the Python package: after `pip install`, a plain JupyterLab finds it, enabled."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from .servers import BIN

ROOT = Path(__file__).parents[1]


def test_jupyterlab_lists_the_prebuilt_sidebar_as_enabled() -> None:
    out = subprocess.run([str(BIN / "jupyter"), "labextension", "list"], capture_output=True, text=True, check=True)
    listing = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
    line = next((x for x in listing.splitlines() if "lomas-jupyter" in x), "")
    assert "enabled" in line and "OK" in line and "(python, lomas-jupyter)" in line, listing


def test_the_built_extension_matches_its_sources() -> None:
    package = json.loads((ROOT / "lomas_jupyter" / "labextension" / "package.json").read_text())
    sources = json.loads((ROOT / "labextension" / "package.json").read_text())
    assert package["name"] == sources["name"] and package["version"] == sources["version"]
    assert package["jupyterlab"]["_build"]["load"].startswith("static/remoteEntry.")
    assert (ROOT / "lomas_jupyter" / "labextension" / package["jupyterlab"]["_build"]["load"]).is_file()
