"""Issue 22.3: a class pays once for an answer. With a course's shared answers on, a question a classmate already
had released (paid from the class's pool) is answered to the others from the archive, free and marked; off by
default. Against a real `jupyter lomas` over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from lomas_jupyter import Client, LomasError
from lomas_jupyter import receipts as kernel_receipts
from lomas_jupyter.certificate import Entry, totals
from lomas_jupyter.display import preview_text, release_text

from .servers import lomas_admin, running_server

SQL = "SELECT island, COUNT(*) AS n, AVG(bill_length_mm) AS bill FROM penguins GROUP BY island"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("shared")
    storage = root / "storage"
    lomas_admin(storage, "demo", "--user", "prof")
    env = {"JUPYTER_CONFIG_DIR": str(root / "config"), "JUPYTER_DATA_DIR": str(root / "data")}
    args = [f"--LomasApp.storage_dir={storage}", "--LomasApp.workers=1", "--LomasApp.pricing_workers=1"]
    with running_server("jupyter-lomas", args, root, env) as (url, _pid):
        prof = Client(url, lomas_admin(storage, "token", "issue", "prof"))
        students = {}
        for name in ("ann", "ben", "cat", "dan"):
            prof._call("POST", "admin/users", {"username": name, "role": "analyst"})
            students[name] = Client(url, prof.issue_token(name))
        prof.create_course("lab", hub_group="lab-students")
        prof.course_dataset("lab", "penguins", epsilon_per_student=2.0, epsilon_cap=4.0)
        for name in ("ann", "ben", "cat"):  # dan is not in the class, but has a grant of his own
            prof._call("POST", "admin/courses/lab/members", {"username": name})
        prof.grant("dan", "penguins", 2.0)
        yield {"url": url, "prof": prof, "storage": storage, **students}


def _spent(client: Client) -> float:
    return client.budget("penguins")["epsilon_spent"]


def _pool(service: dict[str, Any]) -> float:
    return service["prof"].class_spending("lab", "penguins")["epsilon_spent"]


def test_shared_answers_are_off_by_default_then_free_marked_and_counted_once(service: dict[str, Any]) -> None:
    prof, ann, ben, cat, dan = (service[n] for n in ("prof", "ann", "ben", "cat", "dan"))
    assert prof.course("lab")["share_answers"] is False
    paid = ann.query("penguins", SQL, epsilon=0.5)
    assert paid.cost["epsilon"] > 0 and _pool(service) == pytest.approx(paid.cost["epsilon"])
    own = ben.query("penguins", SQL, epsilon=0.5)  # off: ben pays for his own release
    assert own.cost["epsilon"] > 0 and own.release_id != paid.release_id and "shared" not in own.raw
    pool = _pool(service)

    assert "answered_free" not in cat.preview("penguins", SQL, epsilon=0.5)  # off: cat would pay
    mine = ann.preview("penguins", SQL, epsilon=0.5)["answered_free"]  # her own earlier answer, whatever the course
    assert mine["release_id"] == paid.release_id and "asked this before" in mine["note"]
    assert prof.share_answers("lab")["share_answers"] is True
    told = cat.preview("penguins", SQL, epsilon=0.5)
    assert told["answered_free"]["course"] == "lab" and told["answered_free"]["release_id"] == paid.release_id
    assert "Free: released to the class lab on" in preview_text(told) and "ann" not in preview_text(told)
    assert "answered_free" not in cat.preview("penguins", SQL, epsilon=0.4)  # another ε: a new release
    assert "answered_free" not in dan.preview("penguins", SQL, epsilon=0.5)  # not in the class
    before = _spent(cat)
    shared = cat.query("penguins", SQL, epsilon=0.5)
    # free, the classmate's very numbers (post-processing of a release the class already paid for), and marked
    assert shared.cost == {"epsilon": 0.0, "delta": 0.0} and shared.replay
    assert shared.raw["shared"]["course"] == "lab" and shared.raw["shared"]["release_id"] == paid.release_id
    assert shared.rows == paid.rows and shared.intervals == paid.intervals
    assert _spent(cat) == before and _pool(service) == pytest.approx(pool)  # the cap counts it once
    shown = release_text(shared)
    assert f"Shared answer: DP release #{paid.release_id}" in shown and "released to the class lab on" in shown
    assert "ann" not in shown  # who paid is not told
    # the receipt is cat's: a grader sees it was shared with her, not released to her
    check = kernel_receipts.check(*kernel_receipts.split(shared.raw))
    assert check.problem is None and shared.raw["user"] == "cat"
    entries = [Entry.of(*kernel_receipts.split(shared.raw)), Entry.of(*kernel_receipts.split(paid.raw))]
    (row,) = totals(entries)
    assert row["shared"] == 1 and row["releases"] == 1 and row["epsilon"] == pytest.approx(paid.cost["epsilon"])

    # not shared: another epsilon, another question, --fresh, someone outside the class
    other_eps = cat.query("penguins", SQL, epsilon=0.4)
    assert other_eps.cost["epsilon"] > 0 and "shared" not in other_eps.raw
    fresh = cat.query("penguins", SQL, epsilon=0.5, fresh=True)
    assert fresh.cost["epsilon"] > 0 and "shared" not in fresh.raw
    outsider = dan.query("penguins", SQL, epsilon=0.5)
    assert outsider.cost["epsilon"] > 0 and "shared" not in outsider.raw
    # dan's release was not paid from the class's pool: the class cannot have it for free
    dan_only = dan.query("penguins", "SELECT COUNT(*) AS n FROM penguins WHERE year = 2008", epsilon=0.3)
    from_dan = ann.query("penguins", "SELECT COUNT(*) AS n FROM penguins WHERE year = 2008", epsilon=0.3)
    assert dan_only.cost["epsilon"] > 0 and from_dan.cost["epsilon"] > 0 and "shared" not in from_dan.raw

    # a student who leaves no longer gets the class's answers; turning sharing off stops it for everyone
    prof._call("DELETE", "admin/courses/lab/members/cat")
    with pytest.raises(LomasError, match="budget"):
        cat.query("penguins", "SELECT COUNT(*) AS n FROM penguins WHERE year = 2009", epsilon=0.3)
    prof.share_answers("lab", False)
    again = ben.query("penguins", "SELECT COUNT(*) AS n FROM penguins WHERE year = 2008", epsilon=0.3)
    assert again.cost["epsilon"] > 0 and "shared" not in again.raw
    actions = [e["action"] for e in prof._call("GET", "admin/audit")]
    assert actions.count("set_course_sharing") == 2


def test_only_admins_switch_sharing_and_bad_input_changes_nothing(service: dict[str, Any]) -> None:
    prof, ann = service["prof"], service["ann"]
    with pytest.raises(LomasError, match="admin role"):
        ann.share_answers("lab")
    for body in ({"share_answers": "yes"}, {}, {"share_answers": 1}):
        with pytest.raises(LomasError, match="share_answers") as info:
            prof._call("PATCH", "admin/courses/lab", body)
        assert info.value.status == 400
    with pytest.raises(LomasError, match="no course 'nope'") as missing:
        prof.share_answers("nope")
    assert missing.value.status == 404
    assert prof.course("lab")["share_answers"] is False
    # from the command line too
    out = lomas_admin(service["storage"], "course", "share", "lab", "on")
    assert "share_answers  True" in out
    assert prof.course("lab")["share_answers"] is True
    lomas_admin(service["storage"], "course", "share", "lab", "off")
