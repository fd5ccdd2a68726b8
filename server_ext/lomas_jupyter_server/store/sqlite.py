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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

from ..errors import BadRequest, Conflict, InsufficientBudget, NotFound
from .base import (
    ROLES,
    AdminStore,
    AuditEntry,
    Budget,
    DatasetRecord,
    GrantRecord,
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

    def create_user(self, username: str, role: str, actor: str) -> UserRecord:
        _check_username(username)
        _check_role(role)
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone():
                raise Conflict(f"user '{username}' already exists")
            now = utcnow()
            conn.execute("INSERT INTO users VALUES (?, ?, ?)", (username, role, now))
            self._audit(conn, actor, "create_user", username=username, role=role)
        return UserRecord(username, role, now)

    def get_user(self, username: str) -> UserRecord | None:
        rows = self._read("SELECT * FROM users WHERE username = ?", (username,))
        return UserRecord(**dict(rows[0])) if rows else None

    def list_users(self) -> list[UserRecord]:
        return [UserRecord(**dict(r)) for r in self._read("SELECT * FROM users ORDER BY username")]

    def set_role(self, username: str, role: str, actor: str) -> UserRecord:
        _check_role(role)
        with self._tx() as conn:
            if conn.execute("UPDATE users SET role = ? WHERE username = ?", (role, username)).rowcount == 0:
                raise NotFound(f"no user '{username}'")
            self._audit(conn, actor, "set_role", username=username, role=role)
        user = self.get_user(username)
        assert user is not None
        return user

    def issue_token(self, username: str, label: str, actor: str) -> str:
        token = new_token()
        with self._tx() as conn:
            if not conn.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone():
                raise NotFound(f"no user '{username}'")
            conn.execute(
                "INSERT INTO tokens (username, token_hash, label, created_at) VALUES (?, ?, ?, ?)",
                (username, hash_token(token), label, utcnow()),
            )
            self._audit(conn, actor, "issue_token", username=username, label=label)
        return token

    def user_for_token(self, token: str) -> UserRecord | None:
        rows = self._read(
            "SELECT u.* FROM tokens t JOIN users u ON u.username = t.username "
            "WHERE t.token_hash = ? AND t.revoked = 0",
            (hash_token(token),),
        )
        return UserRecord(**dict(rows[0])) if rows else None

    def revoke_tokens(self, username: str, actor: str) -> int:
        with self._tx() as conn:
            count = conn.execute(
                "UPDATE tokens SET revoked = 1 WHERE username = ? AND revoked = 0", (username,)
            ).rowcount
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
        _check_amount(epsilon, "epsilon")
        _check_amount(delta, "delta")
        if delta >= 1:
            raise BadRequest("delta must be below 1")
        now = utcnow()
        with self._tx() as conn:
            if not conn.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone():
                raise NotFound(f"no user '{username}'")
            if not conn.execute("SELECT 1 FROM datasets WHERE name = ?", (dataset,)).fetchone():
                raise NotFound(f"no dataset '{dataset}'")
            conn.execute(
                "INSERT INTO grants VALUES (?, ?, ?, ?, ?) ON CONFLICT (username, dataset) DO UPDATE SET "
                "epsilon = excluded.epsilon, delta = excluded.delta, updated_at = excluded.updated_at",
                (username, dataset, float(epsilon), float(delta), now),
            )
            self._audit(conn, actor, "set_grant", username=username, dataset=dataset, epsilon=epsilon, delta=delta)
        return GrantRecord(username, dataset, float(epsilon), float(delta), now)

    def get_grant(self, username: str, dataset: str) -> GrantRecord | None:
        rows = self._read("SELECT * FROM grants WHERE username = ? AND dataset = ?", (username, dataset))
        return GrantRecord(**dict(rows[0])) if rows else None

    def list_grants(self, username: str | None = None) -> list[GrantRecord]:
        if username is None:
            rows = self._read("SELECT * FROM grants ORDER BY username, dataset")
        else:
            rows = self._read("SELECT * FROM grants WHERE username = ? ORDER BY dataset", (username,))
        return [GrantRecord(**dict(r)) for r in rows]

    def _totals(self, conn: sqlite3.Connection, username: str, dataset: str) -> tuple[Fraction, Fraction, int, float | None]:
        row = conn.execute(
            "SELECT * FROM budget_totals WHERE username = ? AND dataset = ?", (username, dataset)
        ).fetchone()
        if row is None:
            return Fraction(0), Fraction(0), 0, None
        return Fraction(row["epsilon_spent"]), Fraction(row["delta_spent"]), row["releases"], row["last_cost"]

    def _add_to_totals(self, conn: sqlite3.Connection, username: str, dataset: str, epsilon: Fraction,
                       delta: Fraction, release_cost: float | None = None) -> None:
        eps, dlt, releases, last = self._totals(conn, username, dataset)
        if release_cost is not None:
            releases, last = releases + 1, release_cost
        conn.execute(
            "INSERT INTO budget_totals VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (username, dataset) DO UPDATE SET "
            "epsilon_spent = excluded.epsilon_spent, delta_spent = excluded.delta_spent, "
            "releases = excluded.releases, last_cost = excluded.last_cost",
            (username, dataset, str(eps + epsilon), str(dlt + delta), releases, last),
        )

    def budget(self, username: str, dataset: str) -> Budget | None:
        with self._lock:
            grant = self.get_grant(username, dataset)
            if grant is None:
                return None
            eps, delta, releases, last = self._totals(self._conn, username, dataset)
        return Budget(username, dataset, grant.epsilon, grant.delta, float(eps), float(delta), releases, last)

    def reserve(self, username: str, dataset: str, epsilon: float, delta: float) -> str:
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
            exact_eps, exact_delta, _, _ = self._totals(conn, username, dataset)
            spent_eps, spent_delta = float(exact_eps), float(exact_delta)
            # compare the correctly rounded exact sums: float noise in 0.1 + 0.2 never decides a refusal
            if float(exact_eps + Fraction(epsilon)) > grant["epsilon"] or float(exact_delta + Fraction(delta)) > grant["delta"]:
                remaining = {
                    "epsilon": max(grant["epsilon"] - spent_eps, 0.0),
                    "delta": max(grant["delta"] - spent_delta, 0.0),
                }
                raise InsufficientBudget(
                    f"not enough budget on '{dataset}': this query costs epsilon={epsilon:.6g}"
                    + (f", delta={delta:.3g}" if delta else "")
                    + f"; remaining epsilon={remaining['epsilon']:.6g}"
                    + (f", delta={remaining['delta']:.3g}" if grant["delta"] else "")
                    + ". Nothing was charged.",
                    cost={"epsilon": epsilon, "delta": delta},
                    remaining=remaining,
                )
            conn.execute(
                "INSERT INTO ledger (reservation_id, username, dataset, kind, epsilon, delta, created_at) "
                "VALUES (?, ?, ?, 'reserve', ?, ?, ?)",
                (reservation_id, username, dataset, float(epsilon), float(delta), utcnow()),
            )
            self._add_to_totals(conn, username, dataset, Fraction(epsilon), Fraction(delta))
        return reservation_id

    def _settle(self, reservation_id: str, kind: str) -> None:
        with self._tx() as conn:
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
                "INSERT INTO ledger (reservation_id, username, dataset, kind, epsilon, delta, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (reservation_id, row["username"], row["dataset"], kind, row["epsilon"], row["delta"], utcnow()),
            )
            if kind == "refund":
                self._add_to_totals(conn, row["username"], row["dataset"], -Fraction(row["epsilon"]),
                                    -Fraction(row["delta"]))
            else:
                self._add_to_totals(conn, row["username"], row["dataset"], Fraction(0), Fraction(0), row["epsilon"])

    def commit(self, reservation_id: str) -> None:
        self._settle(reservation_id, "commit")

    def refund(self, reservation_id: str) -> None:
        self._settle(reservation_id, "refund")

    def ledger(self, username: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        if username is None:
            rows = self._read("SELECT * FROM ledger ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._read("SELECT * FROM ledger WHERE username = ? ORDER BY id DESC LIMIT ?", (username, limit))
        return [dict(r) for r in rows]

    # --- archive and audit --------------------------------------------------------------------------------

    def archive_release(
        self,
        username: str,
        dataset: str,
        dataset_version: int,
        sql: str,
        canonical: str,
        params: dict[str, Any],
        epsilon: float,
        delta: float,
        result: dict[str, Any],
        reservation_id: str,
    ) -> ReleaseRecord:
        now = utcnow()
        with self._tx() as conn:
            cur = conn.execute(
                "INSERT INTO releases (username, dataset, dataset_version, sql, canonical, params_json, epsilon, "
                "delta, result_json, reservation_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    username,
                    dataset,
                    dataset_version,
                    sql,
                    canonical,
                    _params_key(params),
                    epsilon,
                    delta,
                    json.dumps(result),
                    reservation_id,
                    now,
                ),
            )
            release_id = int(cur.lastrowid or 0)
        return ReleaseRecord(
            release_id, username, dataset, dataset_version, sql, canonical, params, epsilon, delta, result, now
        )

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
