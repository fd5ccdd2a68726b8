"""The quickstart notebook runs top to bottom in a real kernel against an embedded service in a real
Jupyter server, and shows what it promises."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
import requests
from nbclient import NotebookClient

from .servers import running_server

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def jupyter_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("embedded")
    token = "quickstart-test-token"
    args = [f"--IdentityProvider.token={token}", "--LomasApp.demo=True", "--LomasApp.workers=1",
            f"--ServerApp.root_dir={root}", "--no-browser"]
    with running_server("jupyter-server", args, root, {"LOMAS_STORAGE_DIR": str(root / "storage")}) as (url, pid):
        yield {"url": url, "token": token, "pid": str(pid), "runtime_dir": str(root / "runtime"),
               "log": str(root / "jupyter-server.log")}


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
    assert "noisy statistic" in preview and "derived from" in preview and "clipped to [30, 60]" in preview
    with_delta = out["%%dpquery penguins --epsilon 0.5 --delta 1e-6 --preview"]
    assert "Gaussian noise under zCDP" in with_delta and "it spends δ" in with_delta and "δ=1e-06" in with_delta
    dummy = out["%%dpquery penguins --epsilon 0.5 --dummy"]
    assert "DUMMY DATA" in dummy and "Nothing was charged" in dummy
    release = out["%%dpquery penguins --epsilon 0.5 -o by_species"]
    assert "DP release #1" in release and "Gentoo" in release and "95% interval" in release
    assert "95% interval of the mean of non-null bill_length_mm, each value clipped to [30, 60]" in release
    assert "rank ±" in out["%%dpquery penguins --epsilon 0.3"]
    assert "shape: (3, 3)" in out["by_species"]
    assert "mean_bill" in out["by_species"]
    assert "total_mass_low" in out["from lomas_jupyter import Client"]
    assert "DP estimates with 95% intervals" in out["release.plot()"]
    assert "ε spent over time" in out["%lomas budget plot"]
    assert out["%lomas archive"].count("penguins") >= 3
    over = out["%%dpquery penguins --epsilon 9.9"]
    assert "LomasError: not enough budget" in over and "costs epsilon=9.9" in over and "Traceback" not in over
    refused = out["%%dpquery penguins --epsilon 0.1"]
    assert "LomasError:" in refused and "SELECT *" in refused and "Traceback" not in refused
    budget = requests.get(jupyter_server["url"] + "lomas/api/budget/penguins",
                          headers={"Authorization": f"token {jupyter_server['token']}"}, timeout=10).json()
    assert budget["releases"] == 3 and budget["epsilon_spent"] <= 1.0 + 1e-9

    # Restart & Run All costs nothing: every query is a replay of its earlier release
    again = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(again, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    rerun = {c["source"].splitlines()[0]: _text(c) for c in again.cells if c["cell_type"] == "code"}
    assert "Replay of DP release #1" in rerun["%%dpquery penguins --epsilon 0.5 -o by_species"]
    assert rerun["by_species"] == out["by_species"]
    after = requests.get(jupyter_server["url"] + "lomas/api/budget/penguins",
                         headers={"Authorization": f"token {jupyter_server['token']}"}, timeout=10).json()
    assert after["epsilon_spent"] == budget["epsilon_spent"] and after["releases"] == 3


def _drain(kc, msg_id: str) -> list[dict]:
    """All iopub messages of one execution, until the kernel goes idle."""
    messages = []
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        messages.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return messages


def test_budget_widget_updates_over_the_widget_protocol(jupyter_server: dict[str, str]) -> None:
    from jupyter_client.manager import start_new_kernel

    env = {**os.environ, "LOMAS_URL": jupyter_server["url"], "LOMAS_TOKEN": jupyter_server["token"]}
    km, kc = start_new_kernel(kernel_name="python3", env=env)
    try:
        opened = _drain(kc, kc.execute("%load_ext lomas_jupyter\n%lomas budget"))
        gauges = {m["content"]["comm_id"]: m["content"]["data"]["state"] for m in opened
                  if m["msg_type"] == "comm_open"
                  and m["content"]["data"]["state"].get("_model_name") == "FloatProgressModel"}
        assert len(gauges) == 1
        (comm_id, state), = gauges.items()
        assert state["description"] == "penguins" and state["max"] == 10.0
        before = state["value"]
        assert any("application/vnd.jupyter.widget-view+json" in m["content"].get("data", {})
                   for m in opened if m["msg_type"] == "display_data")

        ran = _drain(kc, kc.execute("%%dpquery penguins --epsilon 0.25\nSELECT COUNT(*) FROM penguins"))
        updates = [m["content"]["data"]["state"] for m in ran
                   if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == comm_id
                   and m["content"]["data"].get("method") == "update"]
        values = [u["value"] for u in updates if "value" in u]
        assert values and values[-1] == pytest.approx(before + 0.25)
        labels = [u["value"] for m in ran if m["msg_type"] == "comm_msg"
                  for u in [m["content"]["data"].get("state", {})] if isinstance(u.get("value"), str)]
        assert any("last query ε 0.25" in text and "δ 0 of 0.000001" in text for text in labels)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_admin_notebook_registers_grants_and_queries(jupyter_server: dict[str, str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOMAS_URL", jupyter_server["url"])
    monkeypatch.setenv("LOMAS_TOKEN", jupyter_server["token"])
    nb = nbformat.read(ROOT / "notebooks" / "admin.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = [_text(c) for c in nb.cells if c["cell_type"] == "code"]
    joined = "\n".join(out)
    assert "'version': 1" in joined and "visits" in joined
    assert "refused: column 'age' has values outside its declared bounds" in joined
    assert "dana" in joined and "mean_cost_low" in joined
    headers = {"Authorization": f"token {jupyter_server['token']}"}
    grants = requests.get(jupyter_server["url"] + "lomas/api/admin/grants", headers=headers, timeout=10).json()
    assert {"username": "dana", "dataset": "visits", "epsilon": 2.0} in [
        {k: g[k] for k in ("username", "dataset", "epsilon")} for g in grants]
    ledger = requests.get(jupyter_server["url"] + "lomas/api/admin/ledger", headers=headers, timeout=10).json()
    assert [row["kind"] for row in ledger if row["dataset"] == "visits"] == ["commit", "reserve"]


def test_a_kernel_finds_the_server_that_started_it(jupyter_server: dict[str, str]) -> None:
    """No LOMAS_URL: the client matches JPY_PARENT_PID (set by the server for its kernels) to a runtime file."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOMAS_", "JUPYTERHUB_"))}
    env |= {"JPY_PARENT_PID": jupyter_server["pid"], "JUPYTER_RUNTIME_DIR": jupyter_server["runtime_dir"]}
    code = "from lomas_jupyter import Client; c = Client(); print(c.connection.source, c.whoami()['username'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "the Jupyter server running this kernel" in out.stdout
    env["JPY_PARENT_PID"] = "1"  # some other server's kernel: nothing matches, one line says what to do
    code = "from lomas_jupyter import Client, LomasError\ntry:\n    Client()\nexcept LomasError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "no DP service found" in out.stdout and "LOMAS_URL" in out.stdout


def test_connect_status_and_one_line_errors_in_a_real_kernel(jupyter_server: dict[str, str]) -> None:
    from jupyter_client.manager import start_new_kernel

    from .servers import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOMAS_", "JUPYTERHUB_"))}
    km, kc = start_new_kernel(kernel_name="python3", env=env)

    def run(code: str) -> tuple[str, str]:
        messages = _drain(kc, kc.execute(code))
        streams = [m["content"] for m in messages if m["msg_type"] == "stream"]
        errors = [m for m in messages if m["msg_type"] == "error"]
        assert not errors, errors
        out = "".join(s["text"] for s in streams if s["name"] == "stdout")
        err = "".join(s["text"] for s in streams if s["name"] == "stderr")
        return out, err

    try:
        run("%load_ext lomas_jupyter")
        _, err = run(f"%lomas connect http://127.0.0.1:{free_port()}/ some-token")
        assert err.count("\n") == 1 and "LomasError:" in err and "unreachable" in err
        _, err = run(f"%lomas connect {jupyter_server['url']} wrong-token")
        assert err.count("\n") == 1 and "authentication required" in err
        out, err = run(f"%lomas connect {jupyter_server['url']} {jupyter_server['token']}\n%lomas status")
        assert not err and "connected to" in out and "(admin)" in out and "explicit URL" in out
        _, err = run("%%dpquery nope --epsilon 0.1\nSELECT COUNT(*) FROM nope")
        assert err.count("\n") == 1 and "no dataset 'nope'" in err
        _, err = run("%%dpquery penguins --epsilon banana\nSELECT COUNT(*) FROM penguins")
        assert err.count("\n") == 1 and "epsilon" in err
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_under_jupyterhub_the_kernel_sends_its_hub_token_to_lomas_url(jupyter_server: dict[str, str]) -> None:
    """A Hub's kernel gets LOMAS_URL from the Hub config and authenticates with $JUPYTERHUB_API_TOKEN; without
    LOMAS_URL it says what is missing instead of calling the user's own server (which runs no service there).
    The real Hub flow is in test_hub.py."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOMAS_", "JUPYTERHUB_", "JPY_"))}
    env |= {"JUPYTERHUB_API_TOKEN": jupyter_server["token"], "LOMAS_URL": jupyter_server["url"]}
    code = "from lomas_jupyter import Client; c = Client(); print(c.connection.source, c.whoami()['role'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "JupyterHub admin"
    del env["LOMAS_URL"]
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "sets no LOMAS_URL" in out.stderr
