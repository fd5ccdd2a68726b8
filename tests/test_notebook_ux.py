"""The notebook as a data scientist lives in it, in a real kernel against a real embedded service: a budget
widget that shows the service's truth, nothing spent without a chosen epsilon, a failed connect that keeps the
old one, readable tables and numbers, plots with intervals, progress for slow work."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from lomas_jupyter.display import fmt

from .test_notebooks import jupyter_server  # noqa: F401 - the module's real Jupyter server

VEGA_LITE = "application/vnd.vegalite.v5+json"


class Kernel:
    """A real IPython kernel; `run` returns everything one execution sent, and what else arrived meanwhile
    (widget updates from the panel's poller carry no parent)."""

    def __init__(self, kc: Any) -> None:
        self.kc = kc

    def run(self, code: str) -> dict[str, Any]:
        msg_id = self.kc.execute(code)
        own, others = [], []
        while True:
            msg = self.kc.get_iopub_msg(timeout=120)
            (own if msg["parent_header"].get("msg_id") == msg_id else others).append(msg)
            if msg in own and msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        errors = [m for m in own if m["msg_type"] == "error"]
        assert not errors, [(e["content"]["ename"], e["content"]["evalue"]) for e in errors]
        streams = [m["content"] for m in own if m["msg_type"] == "stream"]
        data = [m["content"]["data"] for m in own if m["msg_type"] in ("display_data", "execute_result",
                                                                         "update_display_data")]
        return {
            "out": "".join(s["text"] for s in streams if s["name"] == "stdout"),
            "err": "".join(s["text"] for s in streams if s["name"] == "stderr"),
            "html": "\n".join(d.get("text/html", "") for d in data),
            "text": "\n".join(d.get("text/plain", "") for d in data),
            "data": data,
            "messages": own,
            "others": others,
        }


@contextmanager
def kernel(server: dict[str, str], **extra_env: str) -> Iterator[Kernel]:
    from jupyter_client.manager import start_new_kernel

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOMAS_", "JUPYTERHUB_"))}
    env |= {"LOMAS_URL": server["url"], "LOMAS_TOKEN": server["token"], **extra_env}
    km, kc = start_new_kernel(kernel_name="python3", env=env)
    try:
        k = Kernel(kc)
        k.run("%load_ext lomas_jupyter")
        yield k
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _budget(server: dict[str, str]) -> dict[str, Any]:
    return requests.get(server["url"] + "lomas/api/budget/penguins",
                        headers={"Authorization": f"token {server['token']}"}, timeout=10).json()


def _widget_states(messages: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(comm id, state) of every widget opened or updated in these messages."""
    out = []
    for m in messages:
        if m["msg_type"] in ("comm_open", "comm_msg"):
            state = m["content"].get("data", {}).get("state")
            if state:
                out.append((m["content"]["comm_id"], state))
    return out


def _gauge_and_label(opened: dict[str, Any]) -> tuple[str, str]:
    states = _widget_states(opened["messages"])
    models = {cid: s["_model_name"] for cid, s in states if "_model_name" in s}
    gauge = next(cid for cid, name in models.items() if name == "FloatProgressModel")
    labels = [cid for cid, s in states if models.get(cid) == "HTMLModel" and "release" in str(s.get("value", ""))]
    return gauge, labels[-1]


def test_the_widget_shows_the_services_truth(jupyter_server: dict[str, str]) -> None:  # noqa: F811
    with kernel(jupyter_server) as k:
        # 1. A release through the Python API (not the magic) refreshes the panel at once: the poller is
        #    switched off here, so only the release hook can have done it.
        k.run("import lomas_jupyter.widget as w\nw.POLL_SECONDS = 3600")
        gauge, label = _gauge_and_label(k.run("%lomas budget"))
        ran = k.run("from lomas_jupyter import Client\n"
                    "Client().query('penguins', 'SELECT COUNT(*) FROM penguins', epsilon=0.125, fresh=True)\n"
                    "None")
        truth = _budget(jupyter_server)
        updates = dict(_widget_states(ran["messages"] + ran["others"]))
        assert updates[gauge]["value"] == pytest.approx(truth["epsilon_spent"])
        assert f"spent ε {fmt(truth['epsilon_spent'])}" in updates[label]["value"]
        assert f"{truth['releases']:,} release" in updates[label]["value"]

        # 2. A release by another client (this test process, over HTTP) shows up while the panel is displayed.
        k.run("m = get_ipython().magics_manager.registry['LomasMagics']\nm.panel.close()\nm.panel = None\n"
              "w.POLL_SECONDS = 0.3")
        gauge, label = _gauge_and_label(k.run("%lomas budget"))
        answer = requests.post(jupyter_server["url"] + "lomas/api/query", timeout=60,
                               headers={"Authorization": f"token {jupyter_server['token']}"},
                               json={"dataset": "penguins", "sql": "SELECT COUNT(*) FROM penguins",
                                     "epsilon": 0.0625, "fresh": True})
        assert answer.status_code == 201
        truth = _budget(jupyter_server)
        waited = k.run(
            "import time\nstarted = time.monotonic()\n"
            f"while m.panel._last[0]['releases'] != {truth['releases']} and time.monotonic() - started < 60:\n"
            "    time.sleep(0.1)\n"
            "print(m.panel._last[0]['releases'])"
        )
        assert waited["out"].strip() == str(truth["releases"])
        # the update went out over the widget protocol (from the poller thread)
        updates = dict(_widget_states(waited["messages"] + waited["others"]))
        assert updates[gauge]["value"] == pytest.approx(truth["epsilon_spent"])
        # one "label value" pair never wraps apart: each is a nowrap span
        assert re.search(r"<span style='white-space:nowrap[^']*'>last query ε 0.0625</span>", updates[label]["value"])


def test_nothing_is_spent_without_a_chosen_epsilon(jupyter_server: dict[str, str]) -> None:  # noqa: F811
    with kernel(jupyter_server) as k:
        before = _budget(jupyter_server)
        refused = k.run("%%dpquery penguins\nSELECT COUNT(*) AS n, AVG(bill_length_mm) AS m FROM penguins")
        # issue 24.3: not an error, one calm line on stdout, with what the AVG would actually be worth
        assert refused["err"] == "" and refused["out"].count("\n") == 1
        assert "No ε given, so nothing was spent" in refused["out"] and "LomasError" not in refused["out"]
        assert re.search(r"At ε=0\.5 this query would give n ±\d+, m about ±[\d.]+ for a group of 100 rows",
                         refused["out"]) and "--epsilon 0.5" in refused["out"]
        assert _budget(jupyter_server)["epsilon_spent"] == before["epsilon_spent"]

        assert "default ε for %%dpquery in this kernel: 0.2" in k.run("%lomas epsilon 0.2")["out"]
        used = k.run("%%dpquery penguins\nSELECT COUNT(*) AS n FROM penguins WHERE year = 2008")
        assert "charged ε=0.2" in used["html"] and "ε from your kernel default, %lomas epsilon" in used["html"]
        assert _budget(jupyter_server)["epsilon_spent"] == pytest.approx(before["epsilon_spent"] + 0.2)
        assert "no default ε" in k.run("%lomas epsilon off")["out"]
        assert "No ε given" in k.run("%%dpquery penguins\nSELECT COUNT(*) FROM penguins")["out"]
        assert "not a number" in k.run("%lomas epsilon lots")["err"]
        usage = k.run("print(get_ipython().find_cell_magic('dpquery').__doc__)")["out"]
        assert "%%dpquery [--epsilon EPSILON]" in usage and "%%%" not in usage and "zCDP" in usage


def test_a_failed_connect_keeps_the_previous_connection(jupyter_server: dict[str, str]) -> None:  # noqa: F811
    from .servers import free_port

    with kernel(jupyter_server) as k:
        assert "you are" in k.run("%lomas status")["out"]
        failed = k.run(f"%lomas connect http://127.0.0.1:{free_port()}/ badtoken")
        assert failed["err"].count("\n") == 1 and "could not connect" in failed["err"]
        assert f"still using {jupyter_server['url']}" in failed["err"]
        assert "you are" in k.run("%lomas status")["out"]  # still works, no %reload_ext
        again = k.run("%lomas connect")  # discovery again (LOMAS_URL here)
        assert "connected to" in again["out"] and "(LOMAS_URL)" in again["out"]


def test_tables_numbers_and_plots_read_well(jupyter_server: dict[str, str]) -> None:  # noqa: F811
    with kernel(jupyter_server) as k:
        described = k.run("%lomas describe penguins")
        for shown in (described["html"], described["text"]):
            assert "Adelie, Chinstrap, Gentoo" in shown and "Biscoe, Dream, Torgersen" in shown
            assert "shape:" not in shown and "…" not in shown and '""' not in shown
        assert "[30, 60]" in described["text"] and "may be null" in described["text"]
        datasets = k.run("%lomas datasets")
        assert "<table>" in datasets["html"] and "penguins" in datasets["text"] and "shape:" not in datasets["text"]

        sql = "SELECT species, SUM(body_mass_g) AS mass FROM penguins GROUP BY species"
        answer = k.run(f"%%dpquery penguins --epsilon 0.3 --plot\n{sql}")
        assert not re.search(r"\d[eE][+-]\d", answer["html"])  # no scientific notation in the table
        for number in re.findall(r"[\d,.]+(?= \[)", answer["html"]):
            assert re.fullmatch(r"\d{1,3}(,\d{3})*", number), number  # integer sums print as integers
        charts = [d[VEGA_LITE] for d in answer["data"] if VEGA_LITE in d]
        assert len(charts) == 1 and "DP estimate" in charts[0]["title"]
        points = charts[0]["data"]["values"]
        assert [p["group"] for p in points] == ["Adelie", "Chinstrap", "Gentoo"]
        assert all(p["low"] <= p["estimate"] <= p["high"] for p in points)

        archive = k.run("%lomas archive")
        assert sql in archive["text"] and "shape:" not in archive["text"]

        plotted = k.run(f"from lomas_jupyter import Client\nClient().query('penguins', '''{sql}''', epsilon=0.3).plot()")
        assert any(VEGA_LITE in d for d in plotted["data"])
        spending = k.run("%lomas budget plot")
        (chart,) = [d[VEGA_LITE] for d in spending["data"] if VEGA_LITE in d]
        spent = [p["spent"] for p in chart["data"]["values"] if p["dataset"] == "penguins"]
        assert spent == sorted(spent) and spent[-1] == pytest.approx(_budget(jupyter_server)["epsilon_spent"])


def test_slow_work_shows_that_it_is_running(jupyter_server: dict[str, str]) -> None:  # noqa: F811
    with kernel(jupyter_server) as k:
        ran = k.run("import time\nfrom lomas_jupyter.magics import run_with_progress\n"
                    "print(run_with_progress('a slow query', lambda: time.sleep(2.5) or 42))")
        shown = [m for m in ran["messages"] if m["msg_type"] == "display_data"]
        assert shown and "a slow query: running for" in shown[0]["content"]["data"]["text/html"]
        cleared = [m for m in ran["messages"] if m["msg_type"] == "update_display_data"]
        assert cleared and cleared[-1]["content"]["data"]["text/html"] == ""
        assert ran["out"].strip() == "42"
        quick = k.run("print(run_with_progress('quick', lambda: 7))")
        assert not [m for m in quick["messages"] if m["msg_type"] == "display_data"] and quick["out"].strip() == "7"


def test_the_embedded_server_takes_no_browser_quietly(jupyter_server: dict[str, str]) -> None:  # noqa: F811
    assert "not recognized by `LomasApp`" not in Path(jupyter_server["log"]).read_text()


def test_plain_text_front_ends_read_every_answer(jupyter_server: dict[str, str]) -> None:  # noqa: F811
    """Issue 24.1-2: a terminal or an exported notebook sees text/plain. Each answer, preview and dummy run has a
    readable text form (values, intervals, cost, footer), and integer group keys are labels (2007, not 2,007)."""
    with kernel(jupyter_server) as k:
        answer = k.run("%%dpquery penguins --epsilon 0.3\nSELECT year, COUNT(*) AS n FROM penguins GROUP BY year")
        text = answer["text"]
        assert "<IPython" not in text and "year" in text and "n" in text
        for year in ("2007", "2008", "2009"):
            assert re.search(rf"^{year}\s+[\d,]+ \[[\d,]+ – [\d,]+\]", text, re.M), text
        assert "2,007" not in text and "2,007" not in answer["html"] and ">2007<" in answer["html"]
        assert "charged ε=0.3" in text and "95% interval of the number of rows" in text
        preview = k.run("%%dpquery penguins --epsilon 0.3 --preview\nSELECT AVG(bill_depth_mm) AS d FROM penguins")
        assert "Preview (nothing spent): this query would cost ε=0.3" in preview["text"]
        assert "d: interval per group" in preview["text"]
        dummy = k.run("%%dpquery penguins --epsilon 0.3 --dummy\nSELECT COUNT(*) AS n FROM penguins")
        assert dummy["text"].startswith("DUMMY DATA") and "Nothing was charged" in dummy["text"]
        # issue 21.1: arithmetic on released aggregates, and post-processing, as the notebook shows them
        derived = k.run("%%dpquery penguins --epsilon 0.3 -o d\nSELECT species, AVG(bill_length_mm) * 10 AS a, "
                        "SUM(body_mass_g) / COUNT(*) AS r FROM penguins GROUP BY species ORDER BY a DESC LIMIT 2")
        text = derived["text"]
        assert re.search(r"^(Adelie|Chinstrap|Gentoo)\s+[\d,.]+ \[[\d,.]+ – [\d,.]+\]\s+[\d,.]+\s*$", text, re.M), text
        assert "no 95% interval" in text and "follows the arithmetic exactly" in text and "noisy values" in text
        assert k.run("print(d.shape, d.columns)")["out"].strip() == "(2, 3) ['species', 'a', 'r']"


def test_tokens_from_the_sidebar_work_in_a_kernel_and_a_wrong_one_is_named(jupyter_server: dict[str, str]  # noqa: F811
                                                                            ) -> None:
    """Issue 24.4-5, 9 as a notebook user meets them: a token issued on this (embedded) server connects from a
    kernel as its own user; a wrong token is 'not valid', not 'send your token'; a SUM of values >= 0 never
    shows an interval below 0."""
    owner = {"Authorization": f"token {jupyter_server['token']}"}
    api = jupyter_server["url"] + "lomas/api/"
    requests.post(api + "admin/users", json={"username": "tess"}, headers=owner, timeout=30)
    requests.put(api + "admin/grants", json={"username": "tess", "dataset": "penguins", "epsilon": 1.0},
                 headers=owner, timeout=30)
    token = requests.post(api + "admin/users/tess/tokens", json={}, headers=owner, timeout=30).json()["token"]
    with kernel(jupyter_server) as k:
        wrong = k.run(f"%lomas connect {jupyter_server['url']} lomas_wrongtoken")
        assert wrong["err"].count("\n") == 1 and "not valid" in wrong["err"] and "send your" not in wrong["err"]
        connected = k.run(f"%lomas connect {jupyter_server['url']} {token}")
        assert "tess" in connected["out"], connected
        sums = k.run("%%dpquery penguins --epsilon 0.05\nSELECT sex, SUM(body_mass_g) AS mass FROM penguins "
                     "GROUP BY sex")
        lows = re.findall(r"\[(-?[\d,.]+) – ", sums["text"])
        assert len(lows) == 3, sums["text"]  # female, male, NULL: each with its interval
        for low in lows:
            assert float(low.replace(",", "")) >= 0, sums["text"]
        assert requests.get(api + "budget/penguins", headers={"Authorization": f"token {token}"},
                            timeout=30).json()["epsilon_spent"] > 0
