"""SQLite implementation of the admin store (the embedded default).

One connection guarded by a lock serves the service's threads; `BEGIN IMMEDIATE` makes each budget reservation
a single writer transaction, so separate processes on the same file cannot overspend either.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

from ..errors import BadRequest, Conflict, Forbidden, InsufficientBudget, NotFound
from .base import (
    ROLES,
    AdminStore,
    AuditEntry,
    Budget,
    ClassSpending,
    CourseDataset,
    CourseRecord,
    DatasetRecord,
    GrantRecord,
    InstanceRecord,
    ReleaseDraft,
    ReleaseRecord,
    UserRecord,
    hash_token,
    new_token,
    utcnow,
)


def _add_budget_totals(conn: sqlite3.Connection) -> None:
    """Running totals per (user, dataset), so budget reads and reservations do not rescan the ledger.
    Kept as exact fractions: the sum of many float charges is exact, and only rounded when compared or shown."""
    conn.execute(
        "CREATE TABLE budget_totals (username TEXT NOT NULL, dataset TEXT NOT NULL, epsilon_spent TEXT NOT NULL, "
        "delta_spent TEXT NOT NULL, releases INTEGER NOT NULL, last_cost REAL, PRIMARY KEY (username, dataset))"
    )
    totals: dict[tuple[str, str], list[Any]] = {}
    for row in conn.execute("SELECT username, dataset, kind, epsilon, delta FROM ledger ORDER BY id"):
        entry = totals.setdefault((row[0], row[1]), [Fraction(0), Fraction(0), 0, None])
        sign = {"reserve": 1, "refund": -1, "commit": 0}[row[2]]
        entry[0] += sign * Fraction(row[3])
        entry[1] += sign * Fraction(row[4])
        if row[2] == "commit":
            entry[2] += 1
            entry[3] = row[3]
    for (username, dataset), (eps, delta, releases, last) in totals.items():
        conn.execute("INSERT INTO budget_totals VALUES (?, ?, ?, ?, ?, ?)",
                     (username, dataset, str(eps), str(delta), releases, last))


def _add_ownership_and_pending(conn: sqlite3.Connection) -> None:
    """Reservations name the service instance that holds them (so a replica settles only what a dead owner
    left), ledger rows can say why, users can be removed, and budget totals carry what is still pending."""
    def add_column(table: str, column: str, definition: str) -> None:
        if column not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    add_column("users", "removed_at", "TEXT")
    add_column("ledger", "instance_id", "TEXT")
    add_column("ledger", "note", "TEXT NOT NULL DEFAULT ''")
    add_column("budget_totals", "epsilon_pending", "TEXT NOT NULL DEFAULT '0'")
    add_column("budget_totals", "delta_pending", "TEXT NOT NULL DEFAULT '0'")
    add_column("budget_totals", "pending", "INTEGER NOT NULL DEFAULT 0")
    conn.execute("CREATE TABLE IF NOT EXISTS instances (id TEXT PRIMARY KEY, hostname TEXT NOT NULL, "
                 "pid INTEGER NOT NULL, process_start TEXT NOT NULL, started_at TEXT NOT NULL, "
                 "heartbeat_at TEXT NOT NULL, stopped_at TEXT)")
    conn.execute("CREATE INDEX IF NOT EXISTS ledger_reservation ON ledger (reservation_id)")
    open_rows = conn.execute(
        "SELECT username, dataset, epsilon, delta FROM ledger r WHERE kind = 'reserve' AND NOT EXISTS "
        "(SELECT 1 FROM ledger s WHERE s.reservation_id = r.reservation_id AND s.kind != 'reserve')"
    ).fetchall()
    pending: dict[tuple[str, str], list[Any]] = {}
    for row in open_rows:
        entry = pending.setdefault((row[0], row[1]), [Fraction(0), Fraction(0), 0])
        entry[0] += Fraction(row[2])
        entry[1] += Fraction(row[3])
        entry[2] += 1
    for (username, dataset), (eps, delta, count) in pending.items():
        conn.execute("UPDATE budget_totals SET epsilon_pending = ?, delta_pending = ?, pending = ? "
                     "WHERE username = ? AND dataset = ?", (str(eps), str(delta), count, username, dataset))


def _add_courses(conn: sqlite3.Connection) -> None:
    """Courses bound to a Hub group, their datasets with per-student grants and a class-wide cap, and the class
    pools: running totals of everything charged to each (course, dataset). A reservation names the pools it
    charged, so a refund gives back to exactly those, whoever has joined or left since. Safe to re-run."""
    for statement in (
        "CREATE TABLE IF NOT EXISTS courses (name TEXT PRIMARY KEY, hub_group TEXT NOT NULL, "
        "created_at TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS course_datasets (course TEXT NOT NULL REFERENCES courses(name), "
        "dataset TEXT NOT NULL REFERENCES datasets(name), epsilon_per_student REAL NOT NULL, "
        "delta_per_student REAL NOT NULL, epsilon_cap REAL NOT NULL, delta_cap REAL NOT NULL, "
        "updated_at TEXT NOT NULL, PRIMARY KEY (course, dataset))",
        "CREATE TABLE IF NOT EXISTS course_members (course TEXT NOT NULL REFERENCES courses(name), "
        "username TEXT NOT NULL REFERENCES users(username), joined_at TEXT NOT NULL, "
        "PRIMARY KEY (course, username))",
        # every reservation looks up the student's classes
        "CREATE INDEX IF NOT EXISTS course_members_user ON course_members (username)",
        "CREATE TABLE IF NOT EXISTS pool_totals (course TEXT NOT NULL, dataset TEXT NOT NULL, "
        "epsilon_spent TEXT NOT NULL, delta_spent TEXT NOT NULL, PRIMARY KEY (course, dataset))",
    ):
        conn.execute(statement)
    if "pools" not in {row[1] for row in conn.execute("PRAGMA table_info(ledger)")}:
        conn.execute("ALTER TABLE ledger ADD COLUMN pools TEXT NOT NULL DEFAULT '[]'")


# Each entry upgrades the schema by one version; never edit a released entry, append a new one.
MIGRATIONS: list[str | Callable[[sqlite3.Connection], None]] = [
    """
    CREATE TABLE users (
        username TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('admin', 'analyst')),
        created_at TEXT NOT NULL
    );
    CREATE TABLE tokens (
        id INTEGER PRIMARY KEY,
        username TEXT NOT NULL REFERENCES users(username),
        token_hash TEXT NOT NULL UNIQUE,
        label TEXT NOT NULL DEFAULT '',
        revoked INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL
    );
    CREATE TABLE datasets (
        name TEXT PRIMARY KEY,
        description TEXT NOT NULL DEFAULT '',
        metadata_json TEXT NOT NULL,
        parquet_path TEXT NOT NULL,
        version INTEGER NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE grants (
        username TEXT NOT NULL REFERENCES users(username),
        dataset TEXT NOT NULL REFERENCES datasets(name),
        epsilon REAL NOT NULL CHECK (epsilon >= 0),
        delta REAL NOT NULL CHECK (delta >= 0 AND delta < 1),
        updated_at TEXT NOT NULL,
        PRIMARY KEY (username, dataset)
    );
    CREATE TABLE ledger (
        id INTEGER PRIMARY KEY,
        reservation_id TEXT NOT NULL,
        username TEXT NOT NULL,
        dataset TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('reserve', 'commit', 'refund')),
        epsilon REAL NOT NULL,
        delta REAL NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX ledger_user_dataset ON ledger (username, dataset);
    CREATE UNIQUE INDEX ledger_one_settlement ON ledger (reservation_id, kind);
    CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
        BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
    CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
        BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
    CREATE TABLE releases (
        id INTEGER PRIMARY KEY,
        username TEXT NOT NULL,
        dataset TEXT NOT NULL,
        dataset_version INTEGER NOT NULL,
        sql TEXT NOT NULL,
        canonical TEXT NOT NULL,
        params_json TEXT NOT NULL,
        epsilon REAL NOT NULL,
        delta REAL NOT NULL,
        result_json TEXT NOT NULL,
        reservation_id TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX releases_user ON releases (username, dataset);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        detail_json TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    """,
    """
    CREATE INDEX releases_replay ON releases (username, dataset, dataset_version, canonical);
    """,
    _add_budget_totals,
    _add_ownership_and_pending,
    _add_courses,
]


class SQLiteStore(AdminStore):
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self.migrate()

    # --- plumbing -----------------------------------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        with self._tx():
            current = self.schema_version
            for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                if callable(script):
                    script(self._conn)
                else:
                    for statement in _statements(script):
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {version}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def _audit(self, conn: sqlite3.Connection, actor: str, action: str, **detail: Any) -> None:
        conn.execute(
            "INSERT INTO audit (actor, action, detail_json, created_at) VALUES (?, ?, ?, ?)",
            (actor, action, json.dumps(detail), utcnow()),
        )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- users and tokens ---------------------------------------------------------------------------------

    def create_user(self, username: str, role: str, actor: str, revive: bool = True) -> UserRecord:
        _check_username(username)
        _check_role(role)
        with self._tx() as conn:
            row = conn.execute("SELECT removed_at, created_at FROM users WHERE username = ?", (username,)).fetchone()
            now = utcnow()
            if row is not None and row["removed_at"] is None:
                raise Conflict(f"user '{username}' already exists")
            if row is not None and not revive:
                raise Forbidden("your access to the DP service was removed by an admin")
            if row is not None:  # a removed user comes back with their history (their privacy loss is theirs)
                conn.execute("UPDATE users SET role = ?, removed_at = NULL WHERE username = ?", (role, username))
                now = row["created_at"]
            else:
                conn.execute("INSERT INTO users (username, role, created_at) VALUES (?, ?, ?)", (username, role, now))
            self._audit(conn, actor, "create_user", username=username, role=role)
        return UserRecord(username, role, now)

    def get_user(self, username: str) -> UserRecord | None:
        rows = self._read("SELECT username, role, created_at FROM users WHERE username = ? AND removed_at IS NULL",
                          (username,))
        return UserRecord(**dict(rows[0])) if rows else None

    def list_users(self) -> list[UserRecord]:
        rows = self._read("SELECT username, role, created_at FROM users WHERE removed_at IS NULL ORDER BY username")
        return [UserRecord(**dict(r)) for r in rows]

    def _check_admin_access_kept(self, conn: sqlite3.Connection, what: str) -> None:
        """Inside a change's transaction: refuse it if no admin could use the API afterwards."""
        row = conn.execute(
            "SELECT 1 FROM users u JOIN tokens t ON t.username = u.username "
            "WHERE u.role = 'admin' AND u.removed_at IS NULL AND t.revoked = 0 LIMIT 1"
        ).fetchone()
        if row is None:
            raise Conflict(f"refused: {what} would leave no admin with a valid token. Give another admin a token "
                           "first (an admin on the service's machine can always use `lomas-admin`).")

    def set_role(self, username: str, role: str, actor: str, keep_admin_access: bool = False) -> UserRecord:
        _check_role(role)
        with self._tx() as conn:
            updated = conn.execute("UPDATE users SET role = ? WHERE username = ? AND removed_at IS NULL",
                                   (role, username)).rowcount
            if updated == 0:
                raise NotFound(f"no user '{username}'")
            if keep_admin_access:
                self._check_admin_access_kept(conn, f"making '{username}' an {role}")
            self._audit(conn, actor, "set_role", username=username, role=role)
        user = self.get_user(username)
        assert user is not None
        return user

    def remove_user(self, username: str, actor: str, keep_admin_access: bool = False) -> int:
        with self._tx() as conn:
            now = utcnow()
            if conn.execute("UPDATE users SET removed_at = ? WHERE username = ? AND removed_at IS NULL",
                            (now, username)).rowcount == 0:
                raise NotFound(f"no user '{username}'")
            revoked = conn.execute("UPDATE tokens SET revoked = 1 WHERE username = ? AND revoked = 0",
                                   (username,)).rowcount
            if keep_admin_access:
                self._check_admin_access_kept(conn, f"removing '{username}'")
            self._audit(conn, actor, "remove_user", username=username, tokens_revoked=revoked)
        return revoked

    def issue_token(self, username: str, label: str, actor: str) -> str:
        token = new_token()
        with self._tx() as conn:
            if not conn.execute("SELECT 1 FROM users WHERE username = ? AND removed_at IS NULL", (username,)).fetchone():
                raise NotFound(f"no user '{username}'")
            conn.execute(
                "INSERT INTO tokens (username, token_hash, label, created_at) VALUES (?, ?, ?, ?)",
                (username, hash_token(token), label, utcnow()),
            )
            self._audit(conn, actor, "issue_token", username=username, label=label)
        return token

    def user_for_token(self, token: str) -> UserRecord | None:
        rows = self._read(
            "SELECT u.username, u.role, u.created_at FROM tokens t JOIN users u ON u.username = t.username "
            "WHERE t.token_hash = ? AND t.revoked = 0 AND u.removed_at IS NULL",
            (hash_token(token),),
        )
        return UserRecord(**dict(rows[0])) if rows else None

    def revoke_tokens(self, username: str, actor: str, keep_admin_access: bool = False) -> int:
        with self._tx() as conn:
            count = conn.execute(
                "UPDATE tokens SET revoked = 1 WHERE username = ? AND revoked = 0", (username,)
            ).rowcount
            if keep_admin_access and count:
                self._check_admin_access_kept(conn, f"revoking the tokens of '{username}'")
            self._audit(conn, actor, "revoke_tokens", username=username, count=count)
        return count

    # --- datasets -----------------------------------------------------------------------------------------

    def put_dataset(
        self, name: str, description: str, metadata: dict[str, Any], parquet_path: str, actor: str
    ) -> DatasetRecord:
        now = utcnow()
        with self._tx() as conn:
            row = conn.execute("SELECT version FROM datasets WHERE name = ?", (name,)).fetchone()
            version = (row["version"] + 1) if row else 1
            conn.execute(
                "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "description = excluded.description, metadata_json = excluded.metadata_json, "
                "parquet_path = excluded.parquet_path, version = excluded.version, created_at = excluded.created_at",
                (name, description, json.dumps(metadata), parquet_path, version, now),
            )
            self._audit(conn, actor, "put_dataset", dataset=name, version=version)
        return DatasetRecord(name, description, metadata, parquet_path, version, now)

    def get_dataset(self, name: str) -> DatasetRecord | None:
        rows = self._read("SELECT * FROM datasets WHERE name = ?", (name,))
        return _dataset(rows[0]) if rows else None

    def list_datasets(self) -> list[DatasetRecord]:
        return [_dataset(r) for r in self._read("SELECT * FROM datasets ORDER BY name")]

    # --- grants and ledger --------------------------------------------------------------------------------

    def set_grant(self, username: str, dataset: str, epsilon: float, delta: float, actor: str) -> GrantRecord:
        return self.set_grants([username], dataset, epsilon, delta, actor)[0]

    def set_grants(self, usernames: list[str], dataset: str, epsilon: float, delta: float,
                   actor: str) -> list[GrantRecord]:
        _check_amount(epsilon, "epsilon")
        _check_amount(delta, "delta")
        if delta >= 1:
            raise BadRequest("delta must be below 1")
        if not usernames:
            raise BadRequest("name at least one user")
        now = utcnow()
        with self._tx() as conn:  # all or nothing: one unknown user changes no grant
            if not conn.execute("SELECT 1 FROM datasets WHERE name = ?", (dataset,)).fetchone():
                raise NotFound(f"no dataset '{dataset}'")
            for username in usernames:
                if not conn.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone():
                    raise NotFound(f"no user '{username}'")
                conn.execute(
                    "INSERT INTO grants VALUES (?, ?, ?, ?, ?) ON CONFLICT (username, dataset) DO UPDATE SET "
                    "epsilon = excluded.epsilon, delta = excluded.delta, updated_at = excluded.updated_at",
                    (username, dataset, float(epsilon), float(delta), now),
                )
                self._audit(conn, actor, "set_grant", username=username, dataset=dataset, epsilon=epsilon,
                            delta=delta)
        return [GrantRecord(u, dataset, float(epsilon), float(delta), now) for u in usernames]

    def get_grant(self, username: str, dataset: str) -> GrantRecord | None:
        rows = self._read("SELECT * FROM grants WHERE username = ? AND dataset = ?", (username, dataset))
        return GrantRecord(**dict(rows[0])) if rows else None

    def list_grants(self, username: str | None = None) -> list[GrantRecord]:
        if username is None:
            rows = self._read("SELECT * FROM grants ORDER BY username, dataset")
        else:
            rows = self._read("SELECT * FROM grants WHERE username = ? ORDER BY dataset", (username,))
        return [GrantRecord(**dict(r)) for r in rows]

    def _totals(self, conn: sqlite3.Connection, username: str, dataset: str) -> _Totals:
        row = conn.execute(
            "SELECT * FROM budget_totals WHERE username = ? AND dataset = ?", (username, dataset)
        ).fetchone()
        if row is None:
            return _Totals()
        return _Totals(Fraction(row["epsilon_spent"]), Fraction(row["delta_spent"]), row["releases"],
                       row["last_cost"], Fraction(row["epsilon_pending"]), Fraction(row["delta_pending"]),
                       row["pending"])

    def _write_totals(self, conn: sqlite3.Connection, username: str, dataset: str, totals: _Totals) -> None:
        conn.execute(
            "INSERT INTO budget_totals (username, dataset, epsilon_spent, delta_spent, releases, last_cost, "
            "epsilon_pending, delta_pending, pending) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (username, dataset) DO UPDATE SET epsilon_spent = excluded.epsilon_spent, "
            "delta_spent = excluded.delta_spent, releases = excluded.releases, last_cost = excluded.last_cost, "
            "epsilon_pending = excluded.epsilon_pending, delta_pending = excluded.delta_pending, "
            "pending = excluded.pending",
            (username, dataset, str(totals.epsilon), str(totals.delta), totals.releases, totals.last_cost,
             str(totals.epsilon_pending), str(totals.delta_pending), totals.pending),
        )

    def budget(self, username: str, dataset: str) -> Budget | None:
        with self._lock:
            grant = self.get_grant(username, dataset)
            if grant is None:
                return None
            t = self._totals(self._conn, username, dataset)
        return Budget(username, dataset, grant.epsilon, grant.delta, float(t.epsilon), float(t.delta), t.releases,
                      t.last_cost, float(t.epsilon_pending), float(t.delta_pending), t.pending)

    def reserve(self, username: str, dataset: str, epsilon: float, delta: float, owner: str | None = None) -> str:
        _check_amount(epsilon, "epsilon")
        _check_amount(delta, "delta")
        reservation_id = uuid.uuid4().hex
        with self._tx() as conn:
            grant = conn.execute(
                "SELECT epsilon, delta FROM grants WHERE username = ? AND dataset = ?", (username, dataset)
            ).fetchone()
            if grant is None:
                raise InsufficientBudget(
                    f"you have no budget on dataset '{dataset}'; ask an admin for a grant",
                    cost={"epsilon": epsilon, "delta": delta},
                    remaining={"epsilon": 0.0, "delta": 0.0},
                )
            totals = self._totals(conn, username, dataset)
            spent_eps, spent_delta = float(totals.epsilon), float(totals.delta)
            # compare the correctly rounded exact sums: float noise in 0.1 + 0.2 never decides a refusal
            if (float(totals.epsilon + Fraction(epsilon)) > grant["epsilon"]
                    or float(totals.delta + Fraction(delta)) > grant["delta"]):
                remaining = {
                    "epsilon": max(grant["epsilon"] - spent_eps, 0.0),
                    "delta": max(grant["delta"] - spent_delta, 0.0),
                }
                raise InsufficientBudget(
                    f"not enough budget on '{dataset}': this query costs epsilon={epsilon:.6g}"
                    + (f", delta={delta:.3g}" if delta else "")
                    + f"; remaining epsilon={remaining['epsilon']:.6g}"
                    + (f", delta={remaining['delta']:.3g}" if grant["delta"] else "")
                    + (f" ({totals.pending} of your queries are still running)" if totals.pending else "")
                    + ". Nothing was charged.",
                    cost={"epsilon": epsilon, "delta": delta},
                    remaining=remaining,
                )
            pools = self._charge_pools(conn, username, dataset, Fraction(epsilon), Fraction(delta))
            conn.execute(
                "INSERT INTO ledger (reservation_id, username, dataset, kind, epsilon, delta, created_at, "
                "instance_id, pools) VALUES (?, ?, ?, 'reserve', ?, ?, ?, ?, ?)",
                (reservation_id, username, dataset, float(epsilon), float(delta), utcnow(), owner,
                 json.dumps(pools)),
            )
            totals.epsilon += Fraction(epsilon)
            totals.delta += Fraction(delta)
            totals.epsilon_pending += Fraction(epsilon)
            totals.delta_pending += Fraction(delta)
            totals.pending += 1
            self._write_totals(conn, username, dataset, totals)
        return reservation_id

    def _settle_in(self, conn: sqlite3.Connection, reservation_id: str, kind: str, note: str) -> None:
        row = conn.execute(
            "SELECT * FROM ledger WHERE reservation_id = ? AND kind = 'reserve'", (reservation_id,)
        ).fetchone()
        if row is None:
            raise NotFound("no such reservation")
        settled = conn.execute(
            "SELECT kind FROM ledger WHERE reservation_id = ? AND kind != 'reserve'", (reservation_id,)
        ).fetchone()
        if settled is not None:
            raise Conflict(f"reservation already settled ({settled['kind']})")
        conn.execute(
            "INSERT INTO ledger (reservation_id, username, dataset, kind, epsilon, delta, created_at, instance_id, "
            "note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (reservation_id, row["username"], row["dataset"], kind, row["epsilon"], row["delta"], utcnow(),
             row["instance_id"], note),
        )
        totals = self._totals(conn, row["username"], row["dataset"])
        totals.epsilon_pending -= Fraction(row["epsilon"])
        totals.delta_pending -= Fraction(row["delta"])
        totals.pending -= 1
        if kind == "refund":
            totals.epsilon -= Fraction(row["epsilon"])
            totals.delta -= Fraction(row["delta"])
            left_a_course = False
            for course in json.loads(row["pools"]):
                pool = self._pool(conn, course, row["dataset"])
                self._write_pool(conn, course, row["dataset"], pool[0] - Fraction(row["epsilon"]),
                                 pool[1] - Fraction(row["delta"]))
                left_a_course |= conn.execute("SELECT 1 FROM course_members WHERE course = ? AND username = ?",
                                              (course, row["username"])).fetchone() is None
            if left_a_course:
                # Their grant was cut to spent + pending when they left; the refunded part came from the class
                # and must not stay spendable outside it (pool and grant stay in step).
                self._lower_grant(conn, row["username"], row["dataset"], Fraction(row["epsilon"]),
                                  Fraction(row["delta"]), totals)
        else:
            totals.releases += 1
            totals.last_cost = row["epsilon"]
        self._write_totals(conn, row["username"], row["dataset"], totals)

    def _lower_grant(self, conn: sqlite3.Connection, username: str, dataset: str, epsilon: Fraction,
                     delta: Fraction, totals: _Totals) -> None:
        """Lower a grant by a refunded amount, never below what is spent or running."""
        grant = conn.execute("SELECT epsilon, delta FROM grants WHERE username = ? AND dataset = ?",
                             (username, dataset)).fetchone()
        if grant is None:
            return
        new_epsilon = max(float(Fraction(grant["epsilon"]) - epsilon), float(totals.epsilon))
        new_delta = max(float(Fraction(grant["delta"]) - delta), float(totals.delta))
        conn.execute("UPDATE grants SET epsilon = ?, delta = ?, updated_at = ? WHERE username = ? AND dataset = ?",
                     (new_epsilon, new_delta, utcnow(), username, dataset))

    def _pool(self, conn: sqlite3.Connection, course: str, dataset: str) -> tuple[Fraction, Fraction]:
        row = conn.execute("SELECT epsilon_spent, delta_spent FROM pool_totals WHERE course = ? AND dataset = ?",
                           (course, dataset)).fetchone()
        return (Fraction(row[0]), Fraction(row[1])) if row else (Fraction(0), Fraction(0))

    def _write_pool(self, conn: sqlite3.Connection, course: str, dataset: str, epsilon: Fraction,
                    delta: Fraction) -> None:
        conn.execute("INSERT INTO pool_totals VALUES (?, ?, ?, ?) ON CONFLICT (course, dataset) DO UPDATE SET "
                     "epsilon_spent = excluded.epsilon_spent, delta_spent = excluded.delta_spent",
                     (course, dataset, str(epsilon), str(delta)))

    def _charge_pools(self, conn: sqlite3.Connection, username: str, dataset: str, epsilon: Fraction,
                      delta: Fraction) -> list[str]:
        """Inside the reservation's transaction: every class the student is in that uses this dataset must have
        room under its cap; all are charged, or none and nothing is reserved."""
        classes = conn.execute(
            "SELECT d.course, d.epsilon_cap, d.delta_cap FROM course_datasets d JOIN course_members m "
            "ON m.course = d.course WHERE m.username = ? AND d.dataset = ? ORDER BY d.course", (username, dataset)
        ).fetchall()
        charged = []
        for course, epsilon_cap, delta_cap in classes:
            spent_eps, spent_delta = self._pool(conn, course, dataset)
            if float(spent_eps + epsilon) > epsilon_cap or float(spent_delta + delta) > delta_cap:
                raise InsufficientBudget(
                    f"the class '{course}' has reached its cap on '{dataset}': it may spend epsilon="
                    f"{epsilon_cap:.6g} in total and {float(spent_eps):.6g} is spent or running; this query "
                    f"costs epsilon={float(epsilon):.6g}. Nothing was charged; ask your instructor for a top-up.",
                    cost={"epsilon": float(epsilon), "delta": float(delta)},
                    remaining={"epsilon": max(epsilon_cap - float(spent_eps), 0.0),
                               "delta": max(delta_cap - float(spent_delta), 0.0)},
                )
            self._write_pool(conn, course, dataset, spent_eps + epsilon, spent_delta + delta)
            charged.append(course)
        return charged

    # --- courses -----------------------------------------------------------------------------------------

    def create_course(self, name: str, hub_group: str, actor: str) -> CourseRecord:
        _check_username(name)
        if not isinstance(hub_group, str) or not hub_group.strip():
            raise BadRequest("a course needs the Hub group its students are in")
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM courses WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"course '{name}' already exists")
            conn.execute("INSERT INTO courses VALUES (?, ?, ?)", (name, hub_group, utcnow()))
            self._audit(conn, actor, "create_course", course=name, hub_group=hub_group)
            return self._course(conn, name)

    def _course(self, conn: sqlite3.Connection, name: str) -> CourseRecord:
        row = conn.execute("SELECT * FROM courses WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no course '{name}'")
        members = tuple(r[0] for r in conn.execute(
            "SELECT username FROM course_members WHERE course = ? ORDER BY username", (name,)))
        datasets = tuple(
            CourseDataset(name, r["dataset"], r["epsilon_per_student"], r["delta_per_student"], r["epsilon_cap"],
                          r["delta_cap"])
            for r in conn.execute("SELECT * FROM course_datasets WHERE course = ? ORDER BY dataset", (name,)))
        return CourseRecord(name, row["hub_group"], row["created_at"], members, datasets)

    def get_course(self, name: str) -> CourseRecord | None:
        with self._lock:
            try:
                return self._course(self._conn, name)
            except NotFound:
                return None

    def list_courses(self) -> list[CourseRecord]:
        with self._lock:
            names = [r[0] for r in self._conn.execute("SELECT name FROM courses ORDER BY name")]
            return [self._course(self._conn, n) for n in names]

    def _raise_grant(self, conn: sqlite3.Connection, username: str, dataset: str, epsilon: float,
                     delta: float) -> None:
        conn.execute(
            "INSERT INTO grants VALUES (?, ?, ?, ?, ?) ON CONFLICT (username, dataset) DO UPDATE SET "
            "epsilon = max(epsilon, excluded.epsilon), delta = max(delta, excluded.delta), "
            "updated_at = excluded.updated_at", (username, dataset, float(epsilon), float(delta), utcnow()))

    def set_course_dataset(self, course: str, dataset: str, epsilon_per_student: float, delta_per_student: float,
                           epsilon_cap: float, delta_cap: float, actor: str) -> CourseRecord:
        for value, name in ((epsilon_per_student, "epsilon_per_student"), (delta_per_student, "delta_per_student"),
                            (epsilon_cap, "epsilon_cap"), (delta_cap, "delta_cap")):
            _check_amount(value, name)
        if delta_per_student >= 1 or delta_cap >= 1:
            raise BadRequest("delta must be below 1")
        with self._tx() as conn:
            self._course(conn, course)
            if not conn.execute("SELECT 1 FROM datasets WHERE name = ?", (dataset,)).fetchone():
                raise NotFound(f"no dataset '{dataset}'")
            conn.execute(
                "INSERT INTO course_datasets VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (course, dataset) DO UPDATE "
                "SET epsilon_per_student = excluded.epsilon_per_student, delta_per_student = "
                "excluded.delta_per_student, epsilon_cap = excluded.epsilon_cap, delta_cap = excluded.delta_cap, "
                "updated_at = excluded.updated_at",
                (course, dataset, float(epsilon_per_student), float(delta_per_student), float(epsilon_cap),
                 float(delta_cap), utcnow()))
            for (username,) in conn.execute("SELECT username FROM course_members WHERE course = ?", (course,)):
                self._raise_grant(conn, username, dataset, epsilon_per_student, delta_per_student)
            self._audit(conn, actor, "set_course_dataset", course=course, dataset=dataset,
                        epsilon_per_student=epsilon_per_student, delta_per_student=delta_per_student,
                        epsilon_cap=epsilon_cap, delta_cap=delta_cap)
            return self._course(conn, course)

    def _enrol(self, conn: sqlite3.Connection, record: CourseRecord, username: str, actor: str) -> None:
        conn.execute("INSERT OR IGNORE INTO course_members VALUES (?, ?, ?)", (record.name, username, utcnow()))
        for plan in record.datasets:
            self._raise_grant(conn, username, plan.dataset, plan.epsilon_per_student, plan.delta_per_student)
        self._audit(conn, actor, "add_course_member", course=record.name, username=username)

    def _unenrol(self, conn: sqlite3.Connection, record: CourseRecord, username: str, actor: str) -> None:
        conn.execute("DELETE FROM course_members WHERE course = ? AND username = ?", (record.name, username))
        for plan in record.datasets:
            totals = self._totals(conn, username, plan.dataset)
            conn.execute("UPDATE grants SET epsilon = ?, delta = ?, updated_at = ? WHERE username = ? AND "
                         "dataset = ?", (float(totals.epsilon), float(totals.delta), utcnow(), username,
                                         plan.dataset))
        self._audit(conn, actor, "remove_course_member", course=record.name, username=username)

    def add_course_member(self, course: str, username: str, actor: str) -> CourseRecord:
        with self._tx() as conn:
            record = self._course(conn, course)
            user = conn.execute("SELECT removed_at FROM users WHERE username = ?", (username,)).fetchone()
            if user is None or user["removed_at"]:
                raise NotFound(f"no user '{username}'")
            self._enrol(conn, record, username, actor)
            return self._course(conn, course)

    def remove_course_member(self, course: str, username: str, actor: str) -> CourseRecord:
        with self._tx() as conn:
            record = self._course(conn, course)
            if username not in record.members:
                raise NotFound(f"'{username}' is not in course '{course}'")
            self._unenrol(conn, record, username, actor)
            return self._course(conn, course)

    def _course_changes(self, conn: sqlite3.Connection, username: str,
                        hub_groups: Collection[str]) -> tuple[list[str], list[str]]:
        groups = set(hub_groups)
        wanted = {r[0] for r in conn.execute("SELECT name, hub_group FROM courses") if r[1] in groups}
        current = {r[0] for r in conn.execute("SELECT course FROM course_members WHERE username = ?", (username,))}
        return sorted(wanted - current), sorted(current - wanted)

    def sync_course_memberships(self, username: str, hub_groups: Collection[str],
                                actor: str) -> tuple[list[str], list[str]]:
        with self._lock:
            joins, leaves = self._course_changes(self._conn, username, hub_groups)
        if not joins and not leaves:
            return [], []  # the usual case: a read, no write lock
        with self._tx() as conn:
            joins, leaves = self._course_changes(conn, username, hub_groups)  # again, under the write lock
            for course in joins:
                self._enrol(conn, self._course(conn, course), username, actor)
            for course in leaves:
                self._unenrol(conn, self._course(conn, course), username, actor)
        return joins, leaves

    def class_spending(self, course: str, dataset: str) -> ClassSpending:
        with self._lock:
            record = self._course(self._conn, course)
            plan = next((d for d in record.datasets if d.dataset == dataset), None)
            if plan is None:
                raise NotFound(f"course '{course}' has no dataset '{dataset}'")
            epsilon, delta = self._pool(self._conn, course, dataset)
            per_student = {}
            for username in record.members:
                t = self._totals(self._conn, username, dataset)
                per_student[username] = {"epsilon_spent": float(t.epsilon), "delta_spent": float(t.delta),
                                         "releases": t.releases}
        return ClassSpending(course, dataset, plan.epsilon_cap, plan.delta_cap, float(epsilon), float(delta),
                             per_student)

    def commit(self, reservation_id: str, note: str = "") -> None:
        with self._tx() as conn:
            self._settle_in(conn, reservation_id, "commit", note)

    def commit_release(self, reservation_id: str, release: ReleaseDraft) -> ReleaseRecord:
        with self._tx() as conn:
            self._settle_in(conn, reservation_id, "commit", "")
            return self._archive_in(conn, release, reservation_id)

    def refund(self, reservation_id: str, note: str = "") -> None:
        with self._tx() as conn:
            self._settle_in(conn, reservation_id, "refund", note)

    # --- service instances (who holds which reservation) -------------------------------------------------

    def register_instance(self, instance: InstanceRecord) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO instances (id, hostname, pid, process_start, started_at, heartbeat_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (instance.id, instance.hostname, instance.pid, instance.process_start, instance.started_at,
                 instance.heartbeat_at),
            )

    def heartbeat(self, instance_id: str) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE instances SET heartbeat_at = ? WHERE id = ?", (utcnow(), instance_id))

    def running_instances(self) -> list[InstanceRecord]:
        rows = self._read("SELECT id, hostname, pid, process_start, started_at, heartbeat_at FROM instances "
                          "WHERE stopped_at IS NULL ORDER BY started_at")
        return [InstanceRecord(**dict(r)) for r in rows]

    def retire_instance(self, instance_id: str | None, note: str) -> int:
        with self._tx() as conn:
            if instance_id is None:
                owner_clause, args = "r.instance_id IS NULL", ()
            else:
                stopped = conn.execute("SELECT stopped_at FROM instances WHERE id = ?", (instance_id,)).fetchone()
                if stopped is not None and stopped["stopped_at"] is not None:
                    return 0  # another replica retired it first
                conn.execute("UPDATE instances SET stopped_at = ? WHERE id = ?", (utcnow(), instance_id))
                owner_clause, args = "r.instance_id = ?", (instance_id,)
            open_ids = [row[0] for row in conn.execute(
                f"SELECT reservation_id FROM ledger r WHERE kind = 'reserve' AND {owner_clause} AND NOT EXISTS "
                "(SELECT 1 FROM ledger s WHERE s.reservation_id = r.reservation_id AND s.kind != 'reserve')",
                args,
            )]
            for reservation_id in open_ids:
                self._settle_in(conn, reservation_id, "refund", note)
            if open_ids:
                self._audit(conn, "system", "settle_abandoned", instance=instance_id, refunded=len(open_ids))
        return len(open_ids)

    def ledger(self, username: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        if username is None:
            rows = self._read("SELECT * FROM ledger ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._read("SELECT * FROM ledger WHERE username = ? ORDER BY id DESC LIMIT ?", (username, limit))
        return [dict(r) | {"pools": json.loads(r["pools"])} for r in rows]

    # --- archive and audit --------------------------------------------------------------------------------

    def _archive_in(self, conn: sqlite3.Connection, release: ReleaseDraft, reservation_id: str) -> ReleaseRecord:
        now = utcnow()
        cur = conn.execute(
            "INSERT INTO releases (username, dataset, dataset_version, sql, canonical, params_json, epsilon, "
            "delta, result_json, reservation_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (release.username, release.dataset, release.dataset_version, release.sql, release.canonical,
             _params_key(release.params), release.epsilon, release.delta, json.dumps(release.result),
             reservation_id, now),
        )
        fields_of = {f.name: getattr(release, f.name) for f in fields(release)}  # no deep copy of the result
        return ReleaseRecord(id=int(cur.lastrowid or 0), created_at=now, **fields_of)

    def list_releases(
        self, username: str | None = None, dataset: str | None = None, limit: int = 200
    ) -> list[ReleaseRecord]:
        clauses, args = [], []
        if username is not None:
            clauses.append("username = ?")
            args.append(username)
        if dataset is not None:
            clauses.append("dataset = ?")
            args.append(dataset)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._read(f"SELECT * FROM releases {where} ORDER BY id DESC LIMIT ?", (*args, limit))
        return [_release_record(r) for r in rows]

    def find_release(
        self, username: str, dataset: str, dataset_version: int, canonical: str, params: dict[str, Any]
    ) -> ReleaseRecord | None:
        rows = self._read(
            "SELECT id FROM releases WHERE username = ? AND dataset = ? AND dataset_version = ? AND canonical = ? "
            "AND params_json = ? ORDER BY id DESC LIMIT 1",
            (username, dataset, dataset_version, canonical, _params_key(params)),
        )
        if not rows:
            return None
        return self._release(rows[0]["id"])

    def _release(self, release_id: int) -> ReleaseRecord:
        (r,) = self._read("SELECT * FROM releases WHERE id = ?", (release_id,))
        return _release_record(r)

    def audit(self, limit: int = 200) -> list[AuditEntry]:
        rows = self._read("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        return [
            AuditEntry(r["id"], r["actor"], r["action"], json.loads(r["detail_json"]), r["created_at"]) for r in rows
        ]


@dataclass
class _Totals:
    """One (user, dataset)'s running totals, exact; `epsilon`/`delta` include what is pending."""

    epsilon: Fraction = Fraction(0)
    delta: Fraction = Fraction(0)
    releases: int = 0
    last_cost: float | None = None
    epsilon_pending: Fraction = Fraction(0)
    delta_pending: Fraction = Fraction(0)
    pending: int = 0


def _statements(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies whole."""
    out, buf = [], []
    for line in script.strip().splitlines():
        buf.append(line)
        text = "\n".join(buf).strip()
        if text.endswith(";") and sqlite3.complete_statement(text):
            out.append(text)
            buf = []
    return out


def _params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def _release_record(r: sqlite3.Row) -> ReleaseRecord:
    return ReleaseRecord(
        r["id"],
        r["username"],
        r["dataset"],
        r["dataset_version"],
        r["sql"],
        r["canonical"],
        json.loads(r["params_json"]),
        r["epsilon"],
        r["delta"],
        json.loads(r["result_json"]),
        r["created_at"],
    )


def _dataset(row: sqlite3.Row) -> DatasetRecord:
    return DatasetRecord(
        row["name"],
        row["description"],
        json.loads(row["metadata_json"]),
        row["parquet_path"],
        row["version"],
        row["created_at"],
    )


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise BadRequest(f"role must be one of {list(ROLES)}")


def _check_username(username: str) -> None:
    if not isinstance(username, str) or not (1 <= len(username) <= 128) or not username.isprintable():
        raise BadRequest("username must be 1 to 128 printable characters")


def _check_amount(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BadRequest(f"{name} must be a non-negative number")
