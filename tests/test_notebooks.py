"""The quickstart notebook runs top to bottom in a real kernel against an embedded service in a real
Jupyter server, and shows what it promises."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
import requests
from nbclient import NotebookClient

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def jupyter_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("embedded")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "quickstart-test-token"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(root / "runtime"), "LOMAS_STORAGE_DIR": str(root / "storage")}
    args = [str(BIN / "jupyter-server"), "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
            f"--IdentityProvider.token={token}", "--LomasApp.demo=True", "--LomasApp.workers=1",
            f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False"]
    if os.geteuid() == 0:
        args.append("--allow-root")
    log = open(root / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "lomas/api/whoami", headers={"Authorization": f"token {token}"}, timeout=2).ok:
                break
        except requests.ConnectionError:
            pass
        if proc.poll() is not None:
            raise RuntimeError((root / "server.log").read_text())
        time.sleep(0.3)
    try:
        yield {"url": url, "token": token}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _text(cell: dict) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        data = out.get("data", {})
        parts.append(data.get("text/html", "") + data.get("text/plain", ""))
        if "application/vnd.jupyter.widget-view+json" in data:
            parts.append("<<widget>>")
    return "\n".join(parts)


def test_quickstart_runs_and_shows_results(jupyter_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOMAS_URL", jupyter_server["url"])
    monkeypatch.setenv("LOMAS_TOKEN", jupyter_server["token"])
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    cells = {c["source"].splitlines()[0]: c for c in nb.cells if c["cell_type"] == "code"}
    out = {first: _text(c) for first, c in cells.items()}
    assert "you are" in out["%load_ext lomas_jupyter"] and "(admin)" in out["%load_ext lomas_jupyter"]
    assert "penguins" in out["%lomas datasets"]
    assert "bill_length_mm" in out["%lomas describe penguins"] and "Adelie" in out["%lomas describe penguins"]
    assert "<<widget>>" in out["%lomas budget"]
    preview = out["%%dpquery penguins --epsilon 0.5 --preview"]
    assert "nothing spent" in preview and "Laplace" in preview
    release = out["%%dpquery penguins --epsilon 0.5 -o by_species"]
    assert "DP release #1" in release and "Gentoo" in release and "95% interval" in release
    assert "shape: (3, 3)" in out["by_species"]
    assert "mean_bill" in out["by_species"]
    assert "total_mass_low" in out["from lomas_jupyter import Client"]
    assert out["%lomas archive"].count("penguins") >= 3
    over = out["%%dpquery penguins --epsilon 9.9"]
    assert "LomasError: not enough budget" in over and "costs epsilon=9.9" in over and "Traceback" not in over
    refused = out["%%dpquery penguins --epsilon 0.1"]
    assert "LomasError:" in refused and "SELECT *" in refused and "Traceback" not in refused
    budget = requests.get(jupyter_server["url"] + "lomas/api/budget/penguins",
                          headers={"Authorization": f"token {jupyter_server['token']}"}, timeout=10).json()
    assert budget["releases"] == 3 and budget["epsilon_spent"] <= 1.0 + 1e-9
