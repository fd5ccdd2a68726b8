"""Issue 22.1: a student asks for more budget from the notebook (`%lomas request`, the widget's "Ask for more…"),
the instructor approves all or part within the class cap, or declines with a note, and the student's widget
shows the answer without a rerun. A real `jupyter lomas` and a real kernel."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from lomas_jupyter import Client, LomasError

from .servers import lomas_admin, running_server
from .test_notebook_ux import _widget_states, kernel

LAB_ORIGIN = "http://lab.example:8888"  # a JupyterLab elsewhere whose sidebar calls this service


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("requests")
    storage = root / "storage"
    lomas_admin(storage, "demo", "--user", "prof")
    env = {"JUPYTER_CONFIG_DIR": str(root / "config"), "JUPYTER_DATA_DIR": str(root / "data")}
    args = [f"--LomasApp.storage_dir={storage}", "--LomasApp.workers=1", "--LomasApp.pricing_workers=1",
            f"--ServerApp.allow_origin={LAB_ORIGIN}"]
    with running_server("jupyter-lomas", args, root, env) as (url, _pid):
        prof = Client(url, lomas_admin(storage, "token", "issue", "prof"))
        prof._call("POST", "admin/users", {"username": "stu", "role": "analyst"})
        token = prof.issue_token("stu")
        prof.create_course("lab", hub_group="lab-students")
        prof.course_dataset("lab", "penguins", epsilon_per_student=1.0, epsilon_cap=1.6)
        prof._call("POST", "admin/courses/lab/members", {"username": "stu"})
        yield {"url": url, "token": token, "prof": prof, "stu": Client(url, token)}


def _wait(k: Any, condition: str) -> dict[str, Any]:
    """Run in the kernel until `condition` holds (the panel's poller updates it), at most 60 s."""
    return k.run("import time\nstarted = time.monotonic()\n"
                 f"while not ({condition}) and time.monotonic() - started < 60:\n    time.sleep(0.1)\n"
                 f"print(bool({condition}))")


def test_a_student_asks_from_the_notebook_and_sees_the_answer_live(service: dict[str, Any]) -> None:
    prof, stu = service["prof"], service["stu"]
    with kernel({"url": service["url"], "token": service["token"]}) as k:
        bad = k.run("%lomas request lots penguins why")
        assert bad["err"].count("\n") == 1 and "usage: %lomas request EPSILON DATASET" in bad["err"]
        assert prof.budget_requests() == []
        asked = k.run('%lomas request 0.5 penguins "for exercise 3"')
        assert "(class lab) is waiting for your instructor" in asked["out"], asked
        (pending,) = prof.budget_requests()
        assert (pending["username"], pending["epsilon"], pending["reason"]) == ("stu", 0.5, "for exercise 3")
        again = k.run('%lomas request 0.2 penguins "and more"')
        assert f"request #{pending['id']} on 'penguins' is still waiting" in again["err"]

        k.run("import lomas_jupyter.widget as w\nw.POLL_SECONDS = 0.3")
        opened = k.run("%lomas budget\nm = get_ipython().magics_manager.registry['LomasMagics']")
        assert any(s.get("description") == "Ask for more…" for _, s in _widget_states(opened["messages"]))
        assert _wait(k, "'waiting for your instructor' in m.panel._request_lines['penguins'].value")["out"].strip() \
            == "True"

        # the class has 1.6 - 0 left: all 0.5 fits; the instructor approves part of it, with a note
        prof.decide_request(pending["id"], True, epsilon=0.3, note="0.3 is enough for exercise 3")
        done = _wait(k, "'approved' in m.panel._request_lines['penguins'].value and "
                        "m.panel._last[0]['epsilon_total'] == 1.3")
        assert done["out"].strip() == "True"
        line = k.run("print(m.panel._request_lines['penguins'].value)")["out"]
        assert "ε 0.3 added: 0.3 is enough for exercise 3" in line
        gauge = [s for _, s in _widget_states(done["messages"] + done["others"]) if s.get("max") == 1.3]
        assert gauge, "the gauge's total went up over the widget protocol, without a rerun"
        assert stu.budget("penguins")["epsilon_total"] == pytest.approx(1.3)

        # the widget's own button: fill the form and click Send
        k.run("amount, reason, send = m.panel._forms['penguins'].children\n"
              "amount.value = 0.5\nreason.value = 'exercise 4'\nsend.click()")
        (second,) = prof.budget_requests()
        assert (second["epsilon"], second["reason"], second["course"]) == (0.5, "exercise 4", "lab")
        # the class spends 1.3 (stu's whole grant), so 0.3 is left under its cap: approving 0.5 is refused
        stu.query("penguins", "SELECT COUNT(*) FROM penguins", epsilon=1.0)
        stu.query("penguins", "SELECT COUNT(*) FROM penguins WHERE year = 2008", epsilon=0.3)
        with pytest.raises(LomasError, match="class 'lab' has epsilon=0.3 left under its cap") as refused:
            prof.decide_request(second["id"], True)
        assert refused.value.status == 409
        assert stu.budget("penguins")["epsilon_total"] == pytest.approx(1.3)  # nothing changed
        prof.decide_request(second["id"], False, note="try the dummy data first")
        declined = _wait(k, "'declined' in m.panel._request_lines['penguins'].value")
        assert declined["out"].strip() == "True"
        assert "try the dummy data first" in k.run("print(m.panel._request_lines['penguins'].value)")["out"]

        listed = k.run("%lomas requests")
        assert "approved" in listed["text"] and "declined" in listed["text"] and "exercise 4" in listed["text"]
        k.run("m.panel.close()")
    # the student sees only their own requests; the audit log has every step
    assert [r["status"] for r in stu.my_requests()] == ["declined", "approved"]
    actions = [e["action"] for e in prof._call("GET", "admin/audit")]
    assert actions.count("request_budget") == 2 and "approve_budget_request" in actions
    assert "decline_budget_request" in actions


def test_errors_reach_a_sidebar_on_another_origin(service: dict[str, Any]) -> None:
    """Tornado clears the headers when it writes an error: without CORS on it, the browser hides the message and
    the sidebar can only say "cannot be reached"."""
    import requests

    headers = {"Origin": LAB_ORIGIN, "Authorization": f"token {service['token']}"}
    for method, path, body in (("POST", "requests", {"dataset": "penguins", "epsilon": -1, "reason": "x"}),
                               ("POST", "admin/requests/999", {"decision": "approve"}),
                               ("GET", "datasets/nope", None)):
        r = requests.request(method, f"{service['url']}lomas/api/{path}", json=body, headers=headers, timeout=60)
        assert 400 <= r.status_code < 500 and r.json()["message"], (path, r.status_code, r.text)
        assert r.headers.get("Access-Control-Allow-Origin") == LAB_ORIGIN, (path, dict(r.headers))
