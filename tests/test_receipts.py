"""Issue 22.2: signed release receipts, `%lomas certificate`, and `lomas-verify`, which checks a saved notebook
offline. One real standalone service; the last test stops it and verifies without it."""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import polars as pl
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nbclient import NotebookClient

from lomas_jupyter import Client
from lomas_jupyter import receipts as kernel_receipts
from lomas_jupyter.verify import verify_notebook

from .servers import BIN, add_analyst, lomas_admin, running_server

META = {"privacy_unit": 1, "max_rows": 1000, "description": "visits",
        "columns": {"kind": {"type": "string", "nullable": False, "categories": ["x", "y", "z"]},
                    "value": {"type": "int", "nullable": True, "bounds": [0, 100]}}}
COUNT_SQL = "SELECT kind, COUNT(*) AS n, AVG(value) AS mean FROM visits GROUP BY kind"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("receipts")
    rng = np.random.default_rng(7)
    pl.DataFrame({"kind": np.array(["x", "y", "z"])[rng.integers(0, 3, 400)],
                  "value": rng.integers(0, 101, 400)}).write_parquet(root / "visits.parquet")
    (root / "visits.json").write_text(json.dumps(META))
    storage = root / "storage"
    lomas_admin(storage, "dataset", "import", "visits", str(root / "visits.parquet"), "--metadata",
                str(root / "visits.json"))
    token = add_analyst(storage, "ana", {"visits": 100.0})
    env = {"JUPYTER_CONFIG_DIR": str(root / "config"), "JUPYTER_DATA_DIR": str(root / "data")}
    stack = ExitStack()
    with stack:
        url, _ = stack.enter_context(running_server(
            "jupyter-lomas", [f"--LomasApp.storage_dir={storage}", "--LomasApp.workers=1",
                              "--LomasApp.pricing_workers=1"], root, env))
        yield {"url": url, "token": token, "storage": storage, "root": root, "stop": stack.close}


def _trusted(service: dict[str, Any]) -> dict[str, bytes]:
    kid, raw = kernel_receipts.load_key(lomas_admin(service["storage"], "key"))
    return {kid: raw}


def test_a_receipt_verifies_and_changing_a_value_the_cost_or_the_user_fails(service: dict[str, Any]) -> None:
    client = Client(service["url"], service["token"])
    release = client.query("visits", COUNT_SQL, 0.5, fresh=True)
    answer, receipt = kernel_receipts.split(release.raw)
    keys = _trusted(service)
    # the endpoint and lomas-admin key name the same key, and the receipt is signed by it
    published = requests.get(service["url"] + "lomas/api/receipts/key",
                             headers={"Authorization": f"token {service['token']}"}, timeout=30).json()
    assert list(keys) == [published["key_id"]] == [receipt["key_id"]]
    assert kernel_receipts.load_key(json.dumps(published)) == next(iter(keys.items()))
    assert answer["user"] == "ana" and answer["cost"]["epsilon"] > 0
    assert kernel_receipts.check(answer, receipt, keys).problem is None

    def tampered(change: Callable[[dict[str, Any]], None]) -> str | None:
        doc = copy.deepcopy(answer)
        change(doc)
        return kernel_receipts.check(doc, receipt, keys).problem

    def one_digit(doc: dict[str, Any]) -> None:
        doc["rows"][0]["n"] = doc["rows"][0]["n"] + 1

    def epsilon(doc: dict[str, Any]) -> None:
        doc["cost"]["epsilon"] = doc["cost"]["epsilon"] / 2

    def user(doc: dict[str, Any]) -> None:
        doc["user"] = "bob"

    def interval(doc: dict[str, Any]) -> None:
        low, high = doc["intervals"][0]["n"]
        doc["intervals"][0]["n"] = [low + 1, high]

    for change in (one_digit, epsilon, user, interval):
        assert "changed after it was released" in (tampered(change) or ""), change.__name__

    # a replay is signed too (it says it is one, and what the release cost first)
    replay = client.query("visits", COUNT_SQL, 0.5)
    replay_answer, replay_receipt = kernel_receipts.split(replay.raw)
    assert replay_answer["replay"] and replay_answer["replay_of"]["release_id"] == release.release_id
    assert kernel_receipts.check(replay_answer, replay_receipt, keys).problem is None

    # a receipt made with another key: fine on its own terms, refused when the service's key is required
    forger = Ed25519PrivateKey.generate()
    forged_doc = copy.deepcopy(answer)
    forged_doc["rows"][0]["n"] += 50
    raw = forger.public_key().public_bytes_raw()
    forged = {**receipt, "key_id": kernel_receipts.key_id(raw), "public_key": base64.b64encode(raw).decode(),
              "signature": base64.b64encode(forger.sign(kernel_receipts.canonical_bytes(forged_doc))).decode()}
    assert kernel_receipts.check(forged_doc, forged).problem is None
    assert "not one you trust" in (kernel_receipts.check(forged_doc, forged, keys).problem or "")
    # dummy answers are not releases: no receipt
    assert client.query("visits", COUNT_SQL, 0.5, dummy=True).receipt is None


def _outputs_text(cell: dict[str, Any]) -> str:
    return "".join(o.get("text", "") + json.dumps(o.get("data", {}), ensure_ascii=False) for o in cell["outputs"])


def _verify(path: Path, *keys: str, user: str | None = None) -> tuple[int, str]:
    argv = [str(BIN / "lomas-verify"), str(path)] + (["--user", user] if user else [])
    for key in keys:
        argv += ["--key", key]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


def test_lomas_verify_checks_a_saved_notebook_offline(service: dict[str, Any], tmp_path: Path) -> None:
    cells = ["%load_ext lomas_jupyter",
             f"%lomas connect {service['url']} $LOMAS_TEST_TOKEN",
             f"%%dpquery visits --epsilon 0.3 --fresh\n{COUNT_SQL}",
             "%%dpquery visits --epsilon 0.3 --preview\nSELECT COUNT(*) AS n FROM visits",
             "%%dpquery visits --epsilon 0.2\nSELECT SUM(value) AS total FROM visits",
             "%lomas certificate --save cert"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = Client(service["url"], service["token"])
    before = client.budget("visits")["epsilon_spent"]
    os.environ["LOMAS_TEST_TOKEN"] = service["token"]
    try:
        done = NotebookClient(nb, timeout=240, kernel_name="python3",
                              resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.pop("LOMAS_TEST_TOKEN", None)
    spent = client.budget("visits")["epsilon_spent"] - before
    assert "DP release #" in _outputs_text(done.cells[2]), _outputs_text(done.cells[2])
    saved = json.loads((tmp_path / "cert.json").read_text())
    assert [r["dataset"] for r in saved["releases"]] == ["visits", "visits"]
    assert saved["totals"][0]["epsilon"] == pytest.approx(spent, abs=1e-9) and spent > 0
    assert (tmp_path / "cert.html").read_text().count("<tr>") >= 3
    key_file = tmp_path / "site.pem"
    key_file.write_text(lomas_admin(service["storage"], "key"))
    notebook = tmp_path / "homework.ipynb"
    nbformat.write(done, notebook)

    service["stop"]()  # from here on, no service: the grader's machine
    with pytest.raises(requests.ConnectionError):
        requests.get(service["url"] + "lomas/api/whoami", timeout=5)

    code, out = _verify(notebook, str(key_file))
    assert code == 0, out
    assert "OK: 2 DP output(s) checked" in out and "FLAGGED" not in out
    doc = json.loads(notebook.read_text())
    assert verify_notebook(doc, dict([kernel_receipts.load_key(str(key_file))])).entries[0].release_epsilon > 0

    def flagged(change: Callable[[dict[str, Any]], None], *keys: str) -> str:
        edited = copy.deepcopy(doc)
        change(edited)
        path = tmp_path / "edited.ipynb"
        path.write_text(json.dumps(edited))
        code, out = _verify(path, *keys)
        assert code == 1, out
        return out

    def first_digit(text: str) -> str:
        index = next(i for i, ch in enumerate(text) if ch.isdigit() and text[i - 1] == " ")
        return text[:index] + str((int(text[index]) + 1) % 10) + text[index + 1:]

    def edit_shown_value(nb_doc: dict[str, Any]) -> None:
        data = nb_doc["cells"][4]["outputs"][0]["data"]
        data["text/plain"] = first_digit("".join(data["text/plain"]))

    def hand_typed(nb_doc: dict[str, Any]) -> None:
        nb_doc["cells"][2]["outputs"] = [{"output_type": "stream", "name": "stdout",
                                          "text": "kind  n    mean\nx     141  50.2 [47.1, 53.3]\n"}]

    def hand_typed_elsewhere(nb_doc: dict[str, Any]) -> None:
        nb_doc["cells"].append(nbformat.v4.new_markdown_cell(
            "DP release #9 on visits · charged ε=0.1 · [brackets]: 95% interval\n\nn = 400"))

    def cheaper(nb_doc: dict[str, Any]) -> None:
        nb_doc["cells"][4]["outputs"][0]["metadata"]["lomas"]["answer"]["cost"]["epsilon"] = 0.01

    assert "edited after release" in flagged(edit_shown_value, str(key_file))
    assert "no released answer" in flagged(hand_typed, str(key_file))
    assert "looks like a DP answer" in flagged(hand_typed_elsewhere, str(key_file))
    assert "changed after it was released" in flagged(cheaper, str(key_file))
    other = tmp_path / "other.pem"
    other_storage = tmp_path / "other"
    other_storage.mkdir()
    other.write_text(lomas_admin(other_storage, "key"))
    assert "not one you trust" in flagged(lambda nb_doc: None, str(other))
    # a classmate's notebook handed in as one's own: every receipt is valid, but made for ana
    assert _verify(notebook, str(key_file), user="ana")[0] == 0
    code, out = _verify(notebook, str(key_file), user="bob")
    assert code == 1 and out.count("was made for 'ana', not for bob (copied?)") == 2, out
    # without --key: checked for edits only, and it says so
    code, out = _verify(notebook)
    assert code == 0 and "no --key given" in out
