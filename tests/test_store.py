"""The admin store, on SQLite and on PostgreSQL: migrations, an append-only ledger, atomic reservations (across
threads and processes), hashed tokens, class pools."""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from lomas_jupyter_server.demo import setup_demo
from lomas_jupyter_server.errors import BadRequest, Conflict, Forbidden, InsufficientBudget, NotFound
from lomas_jupyter_server.service.recovery import process_start, settle_abandoned, this_instance
from lomas_jupyter_server.store import InstanceRecord, SQLStore, StoreNeedsUpgrade, migrate, schema


@pytest.fixture
def store(db_url: str, tmp_path: Path) -> Iterator[SQLStore]:
    s = SQLStore(db_url)
    setup_demo(s, tmp_path, "alice", epsilon=10.0, role="analyst")
    yield s
    s.close()


def _url(store: SQLStore) -> str:
    """The store's URL for another process (with any password: these are throwaway test databases)."""
    return store.url.render_as_string(hide_password=False)


def test_the_pinned_head_is_alembics_head_and_a_store_at_it_opens_without_alembic(tmp_path: Path) -> None:
    """HEAD (read without importing Alembic on every start) must name the newest migration script; and a store at
    the head opens in a fresh process that never imports Alembic."""
    import subprocess
    import sys

    assert migrate.HEAD == migrate.alembic_head()
    SQLStore(str(tmp_path / "s.sqlite3")).close()
    code = ("import sys; from lomas_jupyter_server.store import SQLStore; SQLStore(sys.argv[1]).close(); "
            "assert 'alembic' not in sys.modules, 'alembic was imported'")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.sqlite3")], check=True, capture_output=True)


def test_a_new_store_is_at_the_head_revision_and_reopening_changes_nothing(db_url: str) -> None:
    first = SQLStore(db_url)
    assert first.schema_revision == migrate.head_revision()
    first.create_user("bob", "analyst", "test")
    first.close()
    again = SQLStore(db_url)  # re-opening applies nothing twice and keeps data
    assert again.schema_revision == migrate.head_revision() and again.get_user("bob") is not None
    with again.engine.connect() as conn:  # the migrations build exactly the tables that store.schema defines
        diff = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    assert diff == []
    again.close()


def test_ledger_is_append_only(store: SQLStore) -> None:
    rid = store.reserve("alice", "penguins", 0.5, 0.0)
    store.commit(rid)
    for statement in ("UPDATE ledger SET epsilon = 0", "DELETE FROM ledger"):
        with store.engine.connect() as conn, pytest.raises(sa.exc.DatabaseError, match="append-only"):
            conn.execute(sa.text(statement))
    kinds = [row["kind"] for row in store.ledger("alice")]
    assert kinds == ["commit", "reserve"]


def test_reserve_commit_refund(store: SQLStore) -> None:
    a = store.reserve("alice", "penguins", 3.0, 0.0)
    b = store.reserve("alice", "penguins", 2.0, 0.0)
    store.commit(a)
    store.refund(b)
    budget = store.budget("alice", "penguins")
    assert budget is not None
    assert budget.epsilon_spent == pytest.approx(3.0) and budget.releases == 1
    with pytest.raises(Conflict):
        store.refund(a)  # a committed reservation cannot be refunded
    with pytest.raises(Conflict):
        store.commit(b)


def test_insufficient_budget_names_cost_and_remaining_and_charges_nothing(store: SQLStore) -> None:
    store.commit(store.reserve("alice", "penguins", 9.5, 0.0))
    before = store.ledger("alice")
    with pytest.raises(InsufficientBudget) as info:
        store.reserve("alice", "penguins", 0.75, 0.0)
    assert "0.75" in info.value.message and "0.5" in info.value.message
    assert info.value.details["remaining"]["epsilon"] == pytest.approx(0.5)
    assert store.ledger("alice") == before


def test_threads_never_overspend(store: SQLStore) -> None:
    ok: list[str] = []
    refused: list[Exception] = []

    def worker() -> None:
        try:
            ok.append(store.reserve("alice", "penguins", 0.2, 0.0))
        except InsufficientBudget as err:
            refused.append(err)

    threads = [threading.Thread(target=worker) for _ in range(80)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ok) == 50 and len(refused) == 30
    budget = store.budget("alice", "penguins")
    assert budget is not None and budget.epsilon_spent <= 10.0
    assert math.isclose(budget.epsilon_spent, 10.0)


def _reserve_many(path: str, count: int, results: multiprocessing.Queue) -> None:
    s = SQLStore(path)
    granted = 0
    for _ in range(count):
        try:
            s.reserve("alice", "penguins", 0.25, 0.0)
            granted += 1
        except InsufficientBudget:
            pass
    results.put(granted)


def test_processes_sharing_the_database_never_overspend(store: SQLStore) -> None:
    ctx = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_reserve_many, args=(_url(store), 30, results)) for _ in range(3)]
    for p in procs:
        p.start()
    granted = sum(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert granted == 40  # 10 / 0.25, across three processes racing on one file
    budget = store.budget("alice", "penguins")
    assert budget is not None and budget.epsilon_spent == pytest.approx(10.0) and budget.epsilon_spent <= 10.0


def test_tokens_are_stored_hashed(store: SQLStore) -> None:
    token = store.issue_token("alice", "laptop", "test")
    assert store.user_for_token(token).username == "alice"  # type: ignore[union-attr]
    assert store.user_for_token(token + "x") is None
    with store.engine.connect() as conn:
        stored = [str(value) for row in conn.execute(sa.text("SELECT * FROM tokens")) for value in row]
    assert stored and not any(token in value for value in stored)
    if store.dialect == "sqlite":
        assert token.encode() not in Path(store.path).read_bytes()
    store.revoke_tokens("alice", "test")
    assert store.user_for_token(token) is None


def test_admin_actions_are_audited(store: SQLStore) -> None:
    store.set_grant("alice", "penguins", 2.0, 0.0, actor="carol")
    entry = store.audit()[0]
    assert entry.actor == "carol" and entry.action == "set_grant" and entry.detail["epsilon"] == 2.0


def _ledger_sum(store: SQLStore, username: str) -> float:
    rows = store.ledger(username, 100_000)
    return math.fsum(r["epsilon"] * {"reserve": 1, "refund": -1, "commit": 0}[r["kind"]] for r in rows)


def test_running_totals_match_the_ledger(store: SQLStore) -> None:
    for i in range(30):
        rid = store.reserve("alice", "penguins", 0.1 + i * 1e-3, 0.0)
        (store.refund if i % 3 == 0 else store.commit)(rid)
    budget = store.budget("alice", "penguins")
    assert budget is not None
    assert budget.epsilon_spent == _ledger_sum(store, "alice") and budget.releases == 20


def test_a_replica_settles_only_what_a_dead_owner_left(store: SQLStore) -> None:
    """Replicas share one store: a live owner's reservations are left alone, a dead one's are refunded once."""
    me = this_instance()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # a real process that has exited: its pid is gone (or reused with another start time)
    now = datetime.now(timezone.utc)
    fresh, stale = now.isoformat(), (now - timedelta(seconds=600)).isoformat()
    owners = {
        "live here": InstanceRecord("live", me.hostname, os.getpid(), process_start(os.getpid()) or "", fresh, fresh),
        "dead here": InstanceRecord("dead", me.hostname, finished.pid, "1", fresh, fresh),
        "elsewhere, beating": InstanceRecord("far-live", "other-host", 1, "1", fresh, fresh),
        "elsewhere, silent": InstanceRecord("far-dead", "other-host", 1, "1", stale, stale),
    }
    reservations = {}
    for label, owner in [("me", me), *owners.items()]:
        store.register_instance(owner)
        reservations[label] = store.reserve("alice", "penguins", 0.25, 0.0, owner=owner.id)
    assert store.budget("alice", "penguins").pending == 5

    assert settle_abandoned(store, me, stale_after=120) == 2
    assert settle_abandoned(store, me, stale_after=120) == 0  # settled once only
    settled = {r["reservation_id"]: r for r in store.ledger("alice") if r["kind"] == "refund"}
    assert set(settled) == {reservations["dead here"], reservations["elsewhere, silent"]}
    assert all("stopped before the release left it" in r["note"] for r in settled.values())
    budget = store.budget("alice", "penguins")
    assert budget.pending == 3 and budget.epsilon_spent == pytest.approx(0.75)
    assert {i.id for i in store.running_instances()} == {me.id, "live", "far-live"}


# --- courses: per-student grants and a class-wide cap, checked in one step ---------------------------------


def _class(store: SQLStore, students: list[str], per_student: float, cap: float) -> None:
    store.create_course("stats101", "stats101-students", "prof")
    store.set_course_dataset("stats101", "penguins", per_student, 0.0, cap, 0.0, "prof")
    for name in students:
        store.create_user(name, "analyst", "hub")
        store.add_course_member("stats101", name, "hub")


def _reserve_as_students(path: str, students: list[str], tries: int, cost: float,
                         results: multiprocessing.Queue) -> None:
    s = SQLStore(path)
    granted = 0
    for i in range(tries):
        try:
            s.reserve(students[i % len(students)], "penguins", cost, 0.0)
            granted += 1
        except InsufficientBudget:
            pass
    results.put(granted)


def test_students_get_their_grant_and_concurrent_students_stop_exactly_at_the_class_cap(store: SQLStore) -> None:
    students = [f"s{i}" for i in range(6)]
    _class(store, students, per_student=1.0, cap=2.5)
    assert all(store.get_grant(s, "penguins").epsilon == 1.0 for s in students)  # type: ignore[union-attr]
    ctx = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = ctx.Queue()
    # three processes, each cycling through all six students: 60 attempts at 0.25 for a class cap of 2.5
    procs = [ctx.Process(target=_reserve_as_students, args=(_url(store), students, 20, 0.25, results))
             for _ in range(3)]
    for p in procs:
        p.start()
    granted = sum(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert granted == 10  # exactly 2.5 / 0.25: never over, never short
    spending = store.class_spending("stats101", "penguins")
    assert spending.epsilon_spent == pytest.approx(2.5) and spending.epsilon_spent <= 2.5
    assert sum(s["epsilon_spent"] for s in spending.per_student.values()) == pytest.approx(2.5)
    assert all(s["epsilon_spent"] <= 1.0 for s in spending.per_student.values())
    with pytest.raises(InsufficientBudget, match="class 'stats101' has reached its cap"):
        store.reserve("s0", "penguins", 0.01, 0.0)


def test_a_refund_gives_back_to_the_pool_and_a_top_up_raises_cap_and_grants(store: SQLStore) -> None:
    _class(store, ["ann", "ben"], per_student=1.0, cap=1.0)
    first = store.reserve("ann", "penguins", 0.75, 0.0)
    with pytest.raises(InsufficientBudget, match="cap"):
        store.reserve("ben", "penguins", 0.5, 0.0)  # ben has grant left, the class has not
    assert store.get_grant("ben", "penguins").epsilon == 1.0  # type: ignore[union-attr]
    store.refund(first)
    second = store.reserve("ben", "penguins", 0.5, 0.0)
    store.commit(second)
    assert store.class_spending("stats101", "penguins").epsilon_spent == pytest.approx(0.5)
    store.set_course_dataset("stats101", "penguins", 2.0, 0.0, 3.0, 0.0, "prof")
    assert store.get_grant("ann", "penguins").epsilon == 2.0  # type: ignore[union-attr]
    store.commit(store.reserve("ann", "penguins", 1.5, 0.0))
    assert [row["pools"] for row in store.ledger("ann")][:2] == [[], ["stats101"]]  # commit row, reserve row


def test_a_student_who_leaves_loses_access_and_their_spending_stays_in_the_pool(store: SQLStore) -> None:
    _class(store, ["ann", "ben"], per_student=1.0, cap=1.5)
    store.commit(store.reserve("ann", "penguins", 0.75, 0.0))
    course = store.remove_course_member("stats101", "ann", "hub")
    assert course.members == ("ben",)
    with pytest.raises(InsufficientBudget):
        store.reserve("ann", "penguins", 0.1, 0.0)
    spending = store.class_spending("stats101", "penguins")
    assert spending.epsilon_spent == pytest.approx(0.75) and set(spending.per_student) == {"ben"}
    with pytest.raises(InsufficientBudget, match="cap"):
        store.reserve("ben", "penguins", 1.0, 0.0)  # 0.75 + 1.0 > 1.5: the leaver's releases still count
    store.commit(store.reserve("ben", "penguins", 0.75, 0.0))


def test_hub_groups_are_course_rosters(store: SQLStore) -> None:
    _class(store, [], per_student=1.0, cap=3.0)
    store.create_course("stats102", "stats102-group", "prof")
    store.create_user("cat", "analyst", "hub")
    assert store.sync_course_memberships("cat", ["stats101-students", "other"], "hub") == (["stats101"], [])
    assert store.get_grant("cat", "penguins").epsilon == 1.0  # type: ignore[union-attr]
    audit_rows = len(store.audit(10_000))
    assert store.sync_course_memberships("cat", ["stats101-students"], "hub") == ([], [])  # nothing changed: nothing written
    assert len(store.audit(10_000)) == audit_rows
    store.commit(store.reserve("cat", "penguins", 0.25, 0.0))
    assert store.sync_course_memberships("cat", ["stats102-group"], "hub") == (["stats102"], ["stats101"])
    assert store.get_grant("cat", "penguins").epsilon == pytest.approx(0.25)  # down to what was spent
    assert store.get_course("stats101").members == () and store.get_course("stats102").members == ("cat",)
    assert store.class_spending("stats101", "penguins").epsilon_spent == pytest.approx(0.25)


def test_first_use_creation_does_not_undo_an_admins_removal(store: SQLStore) -> None:
    store.create_user("dan", "analyst", "hub", revive=False)
    store.remove_user("dan", "prof")
    with pytest.raises(Forbidden, match="removed by an admin"):
        store.create_user("dan", "analyst", "hub", revive=False)
    assert store.get_user("dan") is None
    assert store.create_user("dan", "analyst", "prof").username == "dan"  # an admin may bring them back


def test_a_refund_after_leaving_a_class_does_not_leave_spendable_budget_outside_its_cap(store: SQLStore) -> None:
    """Issue 17.7: a student with a running query is removed (grant cut to spent + pending), the running query
    is refunded (a service killed mid-query, say); the refunded amount came from the class and goes back to
    it, so the student cannot spend it any more, charged to no pool."""
    _class(store, ["ann", "ben"], per_student=1.0, cap=1.5)
    store.commit(store.reserve("ann", "penguins", 0.25, 0.0))
    running = store.reserve("ann", "penguins", 0.5, 0.0)
    store.remove_course_member("stats101", "ann", "hub")
    assert store.get_grant("ann", "penguins").epsilon == pytest.approx(0.75)  # type: ignore[union-attr]
    store.refund(running, note="refunded: its service instance died")
    assert store.get_grant("ann", "penguins").epsilon == pytest.approx(0.25)  # type: ignore[union-attr]
    with pytest.raises(InsufficientBudget):
        store.reserve("ann", "penguins", 0.1, 0.0)
    assert store.class_spending("stats101", "penguins").epsilon_spent == pytest.approx(0.25)
    # a student still in the class keeps their grant through a refund
    other = store.reserve("ben", "penguins", 0.5, 0.0)
    store.refund(other)
    assert store.get_grant("ben", "penguins").epsilon == 1.0  # type: ignore[union-attr]


def test_a_shared_answer_is_one_a_sharing_class_paid_for(store: SQLStore) -> None:
    """Issue 22.3: a release is found for a classmate only when the course shares answers, the asker is in it now,
    and the release's reservation was charged to that class's pool (same question, same dataset version)."""
    from lomas_jupyter_server.store import ReleaseDraft

    _class(store, ["ann", "ben"], per_student=1.0, cap=3.0)
    store.create_user("out", "analyst", "prof")
    store.set_grant("out", "penguins", 1.0, 0.0, "prof")

    def release(user: str, canonical: str) -> int:
        draft = ReleaseDraft(user, "penguins", 1, "SELECT ...", canonical, {"epsilon": 0.5}, 0.5, 0.0, {"rows": [1]})
        return store.commit_release(store.reserve(user, "penguins", 0.5, 0.0), draft).id

    ask = ("penguins", 1, "q1", {"epsilon": 0.5})
    by_ann = release("ann", "q1")
    assert store.find_class_release("ben", *ask) is None  # off by default
    course = store.set_course_sharing("stats101", True, "prof")
    assert course.share_answers and course.to_json()["share_answers"] is True
    found = store.find_class_release("ben", *ask)
    assert found is not None and found[0].id == by_ann and found[0].username == "ann" and found[1] == "stats101"
    assert store.find_class_release("out", *ask) is None  # not in the class
    assert store.find_class_release("ben", "penguins", 2, "q1", {"epsilon": 0.5}) is None  # another version
    assert store.find_class_release("ben", "penguins", 1, "q1", {"epsilon": 0.6}) is None  # other parameters
    release("out", "q2")  # paid by someone outside the class: never the class's to share
    assert store.find_class_release("ben", "penguins", 1, "q2", {"epsilon": 0.5}) is None
    store.remove_course_member("stats101", "ben", "prof")
    assert store.find_class_release("ben", *ask) is None  # a student who left no longer shares
    store.add_course_member("stats101", "ben", "prof")
    store.set_course_sharing("stats101", False, "prof")
    assert store.find_class_release("ben", *ask) is None
    assert [e.action for e in store.audit(50)].count("set_course_sharing") == 2
    with pytest.raises(BadRequest):
        store.set_course_sharing("stats101", "yes", "prof")  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        store.set_course_sharing("nope", True, "prof")


def test_a_budget_request_is_approved_in_part_or_declined_once_and_the_class_cap_bounds_it(store: SQLStore) -> None:
    """Issue 22.1: one pending request per student and dataset; approving raises the grant by what was approved
    (at most what was asked), within what the class may still spend, or with the cap raised explicitly."""
    _class(store, ["ann", "ben"], per_student=1.0, cap=1.5)
    store.commit(store.reserve("ann", "penguins", 1.0, 0.0))
    asked = store.request_budget("ann", "penguins", 0.8, 0.0, "  for exercise 3 ")
    assert (asked.status, asked.course, asked.reason) == ("pending", "stats101", "for exercise 3")
    with pytest.raises(Conflict, match=f"#{asked.id} .* still waiting"):
        store.request_budget("ann", "penguins", 0.1, 0.0, "again")
    for bad in ((0.0, 0.0, "x"), (-1.0, 0.0, "x"), (0.5, 0.0, ""), (0.5, 0.0, "x" * 501), (1e6, 0.0, "x")):
        with pytest.raises(BadRequest):
            store.request_budget("ben", "penguins", *bad)
    with pytest.raises(Forbidden, match="no budget on 'penguins'"):
        store.request_budget("nobody", "penguins", 0.5, 0.0, "x")
    # the class has 0.5 left under its cap of 1.5: approving 0.8 is refused, nothing changes
    with pytest.raises(Conflict, match="class 'stats101' has epsilon=0.5 left under its cap"):
        store.decide_budget_request(asked.id, True, "prof")
    assert store.get_grant("ann", "penguins").epsilon == 1.0  # type: ignore[union-attr]
    assert store.list_budget_requests(status="pending")[0].id == asked.id
    with pytest.raises(BadRequest, match="at most what was asked"):
        store.decide_budget_request(asked.id, True, "prof", epsilon=0.9)
    part = store.decide_budget_request(asked.id, True, "prof", epsilon=0.5, note="half now")
    assert (part.status, part.granted_epsilon, part.note, part.decided_by) == ("approved", 0.5, "half now", "prof")
    assert store.get_grant("ann", "penguins").epsilon == pytest.approx(1.5)  # type: ignore[union-attr]
    with pytest.raises(Conflict, match="already approved"):
        store.decide_budget_request(asked.id, False, "prof")
    # the cap raised explicitly with an approval
    more = store.request_budget("ann", "penguins", 0.4, 0.0, "exercise 4")
    store.commit(store.reserve("ann", "penguins", 0.5, 0.0))
    store.decide_budget_request(more.id, True, "prof", raise_cap=True)
    course = store.get_course("stats101")
    assert course is not None and course.datasets[0].epsilon_cap == pytest.approx(1.9)
    store.commit(store.reserve("ann", "penguins", 0.4, 0.0))  # the grant and the class both allow it now
    declined = store.decide_budget_request(store.request_budget("ben", "penguins", 0.3, 0.0, "why not").id, False,
                                           "prof", note="use the dummy data first")
    assert declined.status == "declined" and declined.granted_epsilon is None
    assert store.get_grant("ben", "penguins").epsilon == 1.0  # type: ignore[union-attr]
    assert [r.id for r in store.list_budget_requests("ann")] == [more.id, asked.id]
    with pytest.raises(NotFound):
        store.decide_budget_request(9999, True, "prof")
    actions = [e.action for e in store.audit(100)]
    assert actions.count("request_budget") == 3 and "raise_class_cap" in actions
    assert actions.count("approve_budget_request") == 2 and actions.count("decline_budget_request") == 1


def test_commit_and_archive_are_one_transaction(store: SQLStore) -> None:
    """Issue 17.4: if the release cannot be archived, the charge is not committed either (the reservation stays
    pending, and the service refunds it)."""
    from lomas_jupyter_server.store import ReleaseDraft

    def draft(result: dict) -> ReleaseDraft:
        return ReleaseDraft("alice", "penguins", 1, "SELECT COUNT(*) FROM penguins", "c", {"epsilon": 0.5}, 0.5,
                            0.0, result)

    rid = store.reserve("alice", "penguins", 0.5, 0.0)
    with pytest.raises(TypeError):
        store.commit_release(rid, draft({"rows": {object()}}))  # not JSON: the archive insert fails
    budget = store.budget("alice", "penguins")
    assert budget is not None and budget.pending == 1 and budget.releases == 0
    assert store.list_releases("alice") == [] and [r["kind"] for r in store.ledger("alice")] == ["reserve"]
    store.refund(rid)
    assert store.budget("alice", "penguins").epsilon_spent == 0  # type: ignore[union-attr]
    ok = store.reserve("alice", "penguins", 0.5, 0.0)
    archived = store.commit_release(ok, draft({"rows": [1]}))
    assert [r.id for r in store.list_releases("alice")] == [archived.id]
    assert [r["kind"] for r in store.ledger("alice")][0] == "commit"


def test_commit_and_refund_are_idempotent_and_a_reservation_is_settled_once(store: SQLStore) -> None:
    from lomas_jupyter_server.store import ReleaseDraft

    rid = store.reserve("alice", "penguins", 0.5, 0.0)
    draft = ReleaseDraft("alice", "penguins", 1, "SELECT COUNT(*) FROM penguins", "c", {}, 0.5, 0.0, {"rows": [1]})
    first = store.commit_release(rid, draft)
    assert store.commit_release(rid, draft) == first  # a retry returns the same release, charged once
    store.commit(rid)
    with pytest.raises(Conflict):
        store.refund(rid)
    other = store.reserve("alice", "penguins", 0.25, 0.0)
    store.refund(other)
    store.refund(other)
    budget = store.budget("alice", "penguins")
    assert budget.epsilon_spent == pytest.approx(0.5) and budget.releases == 1 and budget.pending == 0
    assert len(store.list_releases("alice")) == 1
    # racing settlements of one reservation: exactly one lands, whatever the interleaving
    racing = [store.reserve("alice", "penguins", 0.01, 0.0) for _ in range(10)]
    outcomes: list[str] = []

    def settle(rid: str, how: str) -> None:
        try:
            getattr(store, how)(rid)
            outcomes.append(how)
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=settle, args=(rid, how)) for rid in racing for how in ("commit", "refund")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("conflict") == 10
    settlements = [r for r in store.ledger("alice") if r["reservation_id"] in racing and r["kind"] != "reserve"]
    assert sorted(r["reservation_id"] for r in settlements) == sorted(racing)
    assert store.budget("alice", "penguins").pending == 0
    assert store.budget("alice", "penguins").epsilon_spent == pytest.approx(_ledger_sum(store, "alice"))


FIXTURE = Path(__file__).parent / "fixtures" / "store-0.1.0.sqlite3"


def test_a_store_made_by_0_1_0_upgrades_in_place_with_nothing_lost(tmp_path: Path) -> None:
    """tests/fixtures/store-0.1.0.sqlite3 was written by lomas-jupyter 0.1.0's SQLiteStore (its hand-written
    migrations, schema 5): users (one removed), tokens (one revoked), two dataset versions, grants, a release, a
    refund, a reservation left pending by a dead instance, a course with a charged class pool."""
    path = tmp_path / "lomas.sqlite3"
    shutil.copy(FIXTURE, path)
    tokens = dict(line.split() for line in (FIXTURE.parent / "store-0.1.0.tokens.txt").read_text().splitlines())
    store = SQLStore(path)
    assert store.schema_revision == migrate.head_revision()
    assert len(list(tmp_path.glob("lomas.sqlite3.0001-*.bak"))) == 1  # a copy of the old file, kept aside
    assert [u.username for u in store.list_users()] == ["admin", "alice", "bob"]
    assert store.user_for_token(tokens["admin"]).username == "admin"  # type: ignore[union-attr]
    assert store.user_for_token(tokens["carol"]) is None
    dataset = store.get_dataset("penguins")
    assert dataset is not None and dataset.version == 2 and dataset.description == "Palmer penguins v2"
    alice, bob = store.budget("alice", "penguins"), store.budget("bob", "penguins")
    assert (alice.epsilon_spent, alice.releases, alice.pending) == (0.5, 1, 0)
    assert (bob.epsilon_spent, bob.pending, bob.delta_pending) == (pytest.approx(0.3), 1, 1e-7)
    (release,) = store.list_releases("alice")
    assert release.result == {"columns": ["n"], "rows": [[345]]}
    assert store.find_release("alice", "penguins", 2, release.canonical, release.params) == release
    assert store.class_spending("stats101", "penguins").epsilon_spent == pytest.approx(0.2)
    assert store.get_course("stats101").share_answers is False  # type: ignore[union-attr]  # 0003: off
    assert len(store.ledger()) == 7 and len(store.audit(1000)) >= 15
    # what 0.1.0 left pending is settled the same way as before, exactly once
    assert store.retire_instance("deadbeef", "refunded: test") == 1
    assert store.retire_instance("deadbeef", "refunded: test") == 0
    assert store.budget("bob", "penguins").epsilon_spent == pytest.approx(0.2)
    # and the upgraded store takes new work, the settle-once rule included
    rid = store.reserve("alice", "penguins", 1.0, 0.0)
    store.commit(rid)
    with pytest.raises(Conflict):
        store.refund(rid)
    store.close()
    SQLStore(path).close()
    assert len(list(tmp_path.glob("lomas.sqlite3.*.bak"))) == 1  # nothing to upgrade the second time


def test_lomas_admin_db_upgrade_and_a_postgresql_store_behind_is_refused_until_upgraded(
        postgres: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from alembic import command

    from lomas_jupyter_server import cli

    legacy = tmp_path / "legacy.sqlite3"
    shutil.copy(FIXTURE, legacy)
    assert cli.run(["--db-url", str(legacy), "db", "revision"]) == 0
    assert "0001" in capsys.readouterr().out
    assert cli.run(["--db-url", str(legacy), "db", "upgrade"]) == 0
    assert f"at revision {migrate.head_revision()} (upgraded from 0001)" in capsys.readouterr().out

    url = postgres.new_database()  # type: ignore[attr-defined]
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # a PostgreSQL store at the baseline, as 0.1.0's schema
        config = migrate._config(conn)
        command.upgrade(config, "0001")
    engine.dispose()
    with pytest.raises(StoreNeedsUpgrade, match="lomas-admin db upgrade"):
        SQLStore(url)
    assert cli.run(["--db-url", url, "db", "upgrade"]) == 0
    assert "(upgraded from 0001)" in capsys.readouterr().out
    store = SQLStore(url)
    assert store.schema_revision == migrate.head_revision()
    store.close()
    for words in (["db", "upgrade"], ["user", "list"]):
        assert cli.run(["--db-url", "postgresql://nobody:pw@127.0.0.1:1/none", *words]) == 2
        err = capsys.readouterr().err
        assert "cannot reach the store's database" in err
        assert "127.0.0.1" not in err and "nobody" not in err and "pw" not in err
