"""The admin store on SQLAlchemy Core: one implementation for SQLite (the embedded default) and PostgreSQL
(several replicas on one ledger).

Every change is one transaction. Concurrent reservations are serialised by locking the rows they change: the
(user, dataset) running totals, then each class pool in course order (`SELECT ... FOR UPDATE` on PostgreSQL;
SQLite's `BEGIN IMMEDIATE` takes the one write lock instead). The same order everywhere means no deadlock, and
the database itself refuses a second settlement of a reservation (a partial unique index).
"""

from __future__ import annotations

import json
import math
import threading
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ..errors import BadRequest, Conflict, Forbidden, InsufficientBudget, NotFound
from . import migrate
from .base import (
    ROLES,
    AdminStore,
    AuditEntry,
    Budget,
    BudgetRequest,
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
from .schema import (
    audit,
    budget_requests,
    budget_totals,
    course_datasets,
    course_members,
    courses,
    datasets,
    grants,
    instances,
    ledger,
    pool_totals,
    releases,
    tokens,
    users,
)

Row = sa.RowMapping


def _p(name: str) -> Any:
    return sa.bindparam(name)


# The charged path's statements, built once: constructing a Core statement costs more than running it on a
# local database (compiled forms are cached by SQLAlchemy either way).
_USER_AND_DATASET = (budget_totals.c.username == _p("username"), budget_totals.c.dataset == _p("dataset"))
MAX_REQUEST_EPSILON = 100.0  # a typo guard: nobody needs more in one request
GRANT_ROW = sa.select(grants).where(grants.c.username == _p("username"), grants.c.dataset == _p("dataset"))
TOTALS_OF = sa.select(budget_totals).where(*_USER_AND_DATASET)
TOTALS_LOCKED = TOTALS_OF.with_for_update()
TOTALS_WRITE = sa.update(budget_totals).where(budget_totals.c.username == _p("key_username"),
                                               budget_totals.c.dataset == _p("key_dataset")).values(
    epsilon_spent=_p("new_epsilon_spent"), delta_spent=_p("new_delta_spent"), releases=_p("new_releases"),
    last_cost=_p("new_last_cost"), epsilon_pending=_p("new_epsilon_pending"), delta_pending=_p("new_delta_pending"),
    pending=_p("new_pending"))
BUDGET_OF = (
    sa.select(grants.c.epsilon.label("grant_epsilon"), grants.c.delta.label("grant_delta"), budget_totals)
    .select_from(grants.outerjoin(budget_totals, sa.and_(budget_totals.c.username == grants.c.username,
                                                         budget_totals.c.dataset == grants.c.dataset)))
    .where(grants.c.username == _p("username"), grants.c.dataset == _p("dataset")))
_CLASS_COUNT = (sa.select(sa.func.count()).select_from(
    course_datasets.join(course_members, course_members.c.course == course_datasets.c.course))
    .where(course_members.c.username == budget_totals.c.username, course_datasets.c.dataset == budget_totals.c.dataset)
    .scalar_subquery())
GRANT_AND_TOTALS_LOCKED = (  # the grant, the user's running totals (locked), and whether any class pool applies
    sa.select(grants.c.epsilon.label("grant_epsilon"), grants.c.delta.label("grant_delta"),
              _CLASS_COUNT.label("classes"), budget_totals)
    .select_from(budget_totals.join(grants, sa.and_(budget_totals.c.username == grants.c.username,
                                                    budget_totals.c.dataset == grants.c.dataset)))
    .where(*_USER_AND_DATASET).with_for_update(of=budget_totals))
CLASSES_OF = (
    sa.select(course_datasets.c.course, course_datasets.c.epsilon_cap, course_datasets.c.delta_cap)
    .select_from(course_datasets.join(course_members, course_members.c.course == course_datasets.c.course))
    .where(course_members.c.username == _p("username"), course_datasets.c.dataset == _p("dataset"))
    .order_by(course_datasets.c.course))
_POOL_KEY = (pool_totals.c.course == _p("course"), pool_totals.c.dataset == _p("dataset"))
POOL_OF = sa.select(pool_totals.c.epsilon_spent, pool_totals.c.delta_spent).where(*_POOL_KEY)
POOL_LOCKED = POOL_OF.with_for_update()
POOL_WRITE = sa.update(pool_totals).where(pool_totals.c.course == _p("key_course"),
                                         pool_totals.c.dataset == _p("key_dataset")).values(epsilon_spent=_p("new_epsilon"),
                                                               delta_spent=_p("new_delta"))
LEDGER_INSERT = sa.insert(ledger)
ZERO_TOTALS = {"epsilon_spent": "0", "delta_spent": "0", "releases": 0, "last_cost": None, "epsilon_pending": "0",
               "delta_pending": "0", "pending": 0}
RESERVE_ROW_AND_TOTALS_LOCKED = (  # a reservation, and its user's running totals, locked (the row exists)
    sa.select(ledger, *[c.label(f"t_{c.name}") for c in budget_totals.c])
    .select_from(ledger.join(budget_totals, sa.and_(budget_totals.c.username == ledger.c.username,
                                                    budget_totals.c.dataset == ledger.c.dataset)))
    .where(ledger.c.reservation_id == _p("reservation_id"), ledger.c.kind == "reserve")
    .with_for_update(of=budget_totals))
SETTLEMENT_KIND = sa.select(ledger.c.kind).where(ledger.c.reservation_id == _p("reservation_id"),
                                                 ledger.c.kind != "reserve")
RELEASE_INSERT = sa.insert(releases)
RELEASE_OF_RESERVATION = sa.select(releases).where(releases.c.reservation_id == _p("reservation_id"))
FIND_RELEASE = (sa.select(releases).where(
    releases.c.username == _p("username"), releases.c.dataset == _p("dataset"),
    releases.c.dataset_version == _p("dataset_version"), releases.c.canonical == _p("canonical"),
    releases.c.params_json == _p("params_json")).order_by(releases.c.id.desc()).limit(1))
# a sharing class's releases of one question: the reserve row says which class pools carried each one's cost
CLASS_RELEASES = (sa.select(releases, ledger.c.pools).select_from(releases.join(
    ledger, sa.and_(ledger.c.reservation_id == releases.c.reservation_id, ledger.c.kind == "reserve"))).where(
    releases.c.dataset == _p("dataset"), releases.c.dataset_version == _p("dataset_version"),
    releases.c.canonical == _p("canonical"), releases.c.params_json == _p("params_json")).order_by(releases.c.id))
SHARING_CLASSES_OF = (
    sa.select(courses.c.name)
    .select_from(courses.join(course_members, course_members.c.course == courses.c.name)
                 .join(course_datasets, course_datasets.c.course == courses.c.name))
    .where(course_members.c.username == _p("username"), course_datasets.c.dataset == _p("dataset"),
           courses.c.share_answers == 1))
DATASET_OF = sa.select(datasets).where(datasets.c.name == _p("name"))
USER_COLUMNS = sa.select(users.c.username, users.c.role, users.c.created_at)
USER_OF = USER_COLUMNS.where(users.c.username == _p("username"), users.c.removed_at.is_(None))
USER_OF_TOKEN = (USER_COLUMNS.select_from(tokens.join(users, users.c.username == tokens.c.username))
                 .where(tokens.c.token_hash == _p("token_hash"), tokens.c.revoked == 0, users.c.removed_at.is_(None)))


def database_url(db_url: str | Path | sa.URL) -> sa.URL:
    """A URL from `db_url`; a plain path is a SQLite file. `postgresql://` means the psycopg (3) driver."""
    if isinstance(db_url, sa.URL):
        return db_url
    text = str(db_url)
    if "://" not in text:
        Path(text).parent.mkdir(parents=True, exist_ok=True)
        return sa.URL.create("sqlite", database=str(Path(text).resolve()))
    url = sa.make_url(text)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise BadRequest("db_url must be a SQLite path or URL, or a postgresql+psycopg:// URL")
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    return url


def make_engine(url: sa.URL) -> sa.Engine:
    if url.get_backend_name() == "sqlite":
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                                  pool_size=8, max_overflow=8)

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we say when a transaction begins, and how
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=30000"):
                dbapi_connection.execute(f"PRAGMA {pragma}")

        @sa.event.listens_for(engine, "begin")
        def _on_begin(connection: sa.Connection) -> None:
            options = connection.get_execution_options()
            if options.get("lomas_single_read"):
                return  # one statement is its own transaction
            connection.exec_driver_sql("BEGIN IMMEDIATE" if options.get("lomas_write") else "BEGIN")

        return engine
    # No pre-ping (a round trip per call): a connection the database dropped fails one call, and SQLAlchemy then
    # discards the whole pool, so the next call reconnects.
    return sa.create_engine(url, pool_size=10, max_overflow=20, pool_recycle=1800)


def make_read_engine(url: sa.URL) -> sa.Engine | None:
    """PostgreSQL: a pool of autocommit connections for single-statement reads (one round trip each, and no
    switching of a connection's mode at every checkout). SQLite reads use the main engine."""
    if url.get_backend_name() != "postgresql":
        return None
    return sa.create_engine(url, pool_size=10, max_overflow=20, pool_recycle=1800, isolation_level="AUTOCOMMIT")


class SQLStore(AdminStore):
    """`db_url`: a SQLite file path or URL, or `postgresql+psycopg://user@host/db`. `upgrade`: migrate an older
    schema on open (default: yes for SQLite, which is backed up first; no for PostgreSQL, where
    `lomas-admin db upgrade` does it once for all replicas)."""

    def __init__(self, db_url: str | Path | sa.URL, upgrade: bool | None = None) -> None:
        self.url = database_url(db_url)
        self.engine = make_engine(self.url)
        self._read_engine = make_read_engine(self.url)
        self.dialect = self.engine.dialect.name
        self.on_network = self.dialect != "sqlite"  # its calls may wait on the network: keep them off the loop
        # in-process writers queue here instead of in SQLite's busy handler, which sleeps in steps
        self._write_lock: Any = threading.Lock() if self.dialect == "sqlite" else nullcontext()
        self._ensure_totals = self._insert(budget_totals).on_conflict_do_nothing()
        self._ensure_pool = self._insert(pool_totals).on_conflict_do_nothing()
        migrate.upgrade(self.engine, allow=(self.dialect == "sqlite") if upgrade is None else upgrade)

    @property
    def path(self) -> str:
        """The SQLite file (for tools that open it directly)."""
        return self.url.database or ""

    @property
    def schema_revision(self) -> str | None:
        with self.engine.connect() as conn:
            return migrate.current_revision(conn)

    # --- plumbing -----------------------------------------------------------------------------------------

    @contextmanager
    def _tx(self, durable: bool = True) -> Iterator[sa.Connection]:
        """A write transaction. `durable=False` (reserve, refund) lets PostgreSQL acknowledge the commit before
        its WAL is flushed: safe, because a release leaves only after its own durable commit, which flushes all
        earlier WAL, this reservation's included; and a lost reservation or refund can only over-count."""
        with self._write_lock, self.engine.connect() as conn:
            conn.execution_options(lomas_write=True)
            with conn.begin():
                if not durable and self.dialect == "postgresql":
                    conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                yield conn

    @contextmanager
    def _reading(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def _rows(self, statement: sa.Executable, params: dict[str, Any] | None = None) -> list[Row]:
        """One statement: on PostgreSQL without BEGIN and COMMIT (one round trip, not three)."""
        with (self._read_engine or self.engine).connect() as conn:
            if self._read_engine is None:
                conn.execution_options(lomas_single_read=True)
            return list(conn.execute(statement, params).mappings())

    def _insert(self, table: sa.Table) -> Any:
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    def _greatest(self, a: Any, b: Any) -> Any:
        return sa.func.greatest(a, b) if self.dialect == "postgresql" else sa.func.max(a, b)

    def _audit(self, conn: sa.Connection, actor: str, action: str, **detail: Any) -> None:
        conn.execute(sa.insert(audit).values(actor=actor, action=action, detail_json=json.dumps(detail),
                                             created_at=utcnow()))

    def close(self) -> None:
        self.engine.dispose()
        if self._read_engine is not None:
            self._read_engine.dispose()

    # --- users and tokens ---------------------------------------------------------------------------------

    def create_user(self, username: str, role: str, actor: str, revive: bool = True) -> UserRecord:
        _check_username(username)
        _check_role(role)
        with self._tx() as conn:
            row = conn.execute(sa.select(users.c.removed_at, users.c.created_at)
                               .where(users.c.username == username).with_for_update()).mappings().first()
            now = utcnow()
            if row is not None and row["removed_at"] is None:
                raise Conflict(f"user '{username}' already exists")
            if row is not None and not revive:
                raise Forbidden("your access to the DP service was removed by an admin")
            if row is not None:  # a removed user comes back with their history (their privacy loss is theirs)
                conn.execute(sa.update(users).where(users.c.username == username).values(role=role, removed_at=None))
                now = row["created_at"]
            elif not conn.execute(self._insert(users).values(username=username, role=role, created_at=now)
                                  .on_conflict_do_nothing()).rowcount:
                raise Conflict(f"user '{username}' already exists")  # created by another replica just now
            self._audit(conn, actor, "create_user", username=username, role=role)
        return UserRecord(username, role, now)

    def get_user(self, username: str) -> UserRecord | None:
        rows = self._rows(USER_OF, {"username": username})
        return UserRecord(**rows[0]) if rows else None

    def list_users(self) -> list[UserRecord]:
        return [UserRecord(**r) for r in self._rows(USER_COLUMNS.where(users.c.removed_at.is_(None))
                                                    .order_by(users.c.username))]

    def _check_admin_access_kept(self, conn: sa.Connection, what: str) -> None:
        """Inside a change's transaction: refuse it if no admin could use the API afterwards."""
        found = conn.execute(
            sa.select(sa.literal(1)).select_from(users.join(tokens, tokens.c.username == users.c.username))
            .where(users.c.role == "admin", users.c.removed_at.is_(None), tokens.c.revoked == 0).limit(1)
        ).first()
        if found is None:
            raise Conflict(f"refused: {what} would leave no admin with a valid token. Give another admin a token "
                           "first (an admin on the service's machine can always use `lomas-admin`).")

    def set_role(self, username: str, role: str, actor: str, keep_admin_access: bool = False) -> UserRecord:
        _check_role(role)
        with self._tx() as conn:
            updated = conn.execute(sa.update(users).where(users.c.username == username, users.c.removed_at.is_(None))
                                   .values(role=role)).rowcount
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
            removed = conn.execute(sa.update(users).where(users.c.username == username, users.c.removed_at.is_(None))
                                   .values(removed_at=utcnow())).rowcount
            if removed == 0:
                raise NotFound(f"no user '{username}'")
            revoked = self._revoke(conn, username)
            if keep_admin_access:
                self._check_admin_access_kept(conn, f"removing '{username}'")
            self._audit(conn, actor, "remove_user", username=username, tokens_revoked=revoked)
        return revoked

    def _revoke(self, conn: sa.Connection, username: str) -> int:
        return conn.execute(sa.update(tokens).where(tokens.c.username == username, tokens.c.revoked == 0)
                            .values(revoked=1)).rowcount

    def issue_token(self, username: str, label: str, actor: str) -> str:
        token = new_token()
        with self._tx() as conn:
            if conn.execute(sa.select(users.c.username).where(users.c.username == username,
                                                              users.c.removed_at.is_(None))).first() is None:
                raise NotFound(f"no user '{username}'")
            conn.execute(sa.insert(tokens).values(username=username, token_hash=hash_token(token), label=label,
                                                  created_at=utcnow()))
            self._audit(conn, actor, "issue_token", username=username, label=label)
        return token

    def user_for_token(self, token: str) -> UserRecord | None:
        rows = self._rows(USER_OF_TOKEN, {"token_hash": hash_token(token)})
        return UserRecord(**rows[0]) if rows else None

    def revoke_tokens(self, username: str, actor: str, keep_admin_access: bool = False) -> int:
        with self._tx() as conn:
            count = self._revoke(conn, username)
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
            version = conn.execute(sa.select(datasets.c.version).where(datasets.c.name == name)
                                   .with_for_update()).scalar()
            version = (version or 0) + 1
            values = {"description": description, "metadata_json": json.dumps(metadata),
                      "parquet_path": parquet_path, "version": version, "created_at": now}
            conn.execute(self._insert(datasets).values(name=name, **values)
                         .on_conflict_do_update(index_elements=[datasets.c.name], set_=values))
            self._audit(conn, actor, "put_dataset", dataset=name, version=version)
        return DatasetRecord(name, description, metadata, parquet_path, version, now)

    def get_dataset(self, name: str) -> DatasetRecord | None:
        rows = self._rows(DATASET_OF, {"name": name})
        return _dataset(rows[0]) if rows else None

    def list_datasets(self) -> list[DatasetRecord]:
        return [_dataset(r) for r in self._rows(sa.select(datasets).order_by(datasets.c.name))]

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
            if conn.execute(sa.select(datasets.c.name).where(datasets.c.name == dataset)).first() is None:
                raise NotFound(f"no dataset '{dataset}'")
            for username in usernames:
                if conn.execute(sa.select(users.c.username).where(users.c.username == username)).first() is None:
                    raise NotFound(f"no user '{username}'")
                values = {"epsilon": float(epsilon), "delta": float(delta), "updated_at": now}
                conn.execute(self._insert(grants).values(username=username, dataset=dataset, **values)
                             .on_conflict_do_update(index_elements=[grants.c.username, grants.c.dataset],
                                                    set_=values))
                self._audit(conn, actor, "set_grant", username=username, dataset=dataset, epsilon=epsilon,
                            delta=delta)
        return [GrantRecord(u, dataset, float(epsilon), float(delta), now) for u in usernames]

    def get_grant(self, username: str, dataset: str) -> GrantRecord | None:
        rows = self._rows(GRANT_ROW, {"username": username, "dataset": dataset})
        return GrantRecord(**rows[0]) if rows else None

    def list_grants(self, username: str | None = None) -> list[GrantRecord]:
        query = sa.select(grants).order_by(grants.c.username, grants.c.dataset)
        if username is not None:
            query = query.where(grants.c.username == username)
        return [GrantRecord(**r) for r in self._rows(query)]

    def _totals(self, conn: sa.Connection, username: str, dataset: str, lock: bool = False) -> _Totals:
        """One (user, dataset)'s running totals; with `lock`, the row is created if missing and locked until the
        transaction ends (every change to a user's spending on a dataset takes this lock first)."""
        key = {"username": username, "dataset": dataset}
        if lock:
            conn.execute(self._ensure_totals, key | ZERO_TOTALS)
        row = conn.execute(TOTALS_LOCKED if lock else TOTALS_OF, key).mappings().first()
        return _Totals() if row is None else _totals_of(row)

    def _write_totals(self, conn: sa.Connection, username: str, dataset: str, totals: _Totals) -> None:
        conn.execute(TOTALS_WRITE, {
            "key_username": username, "key_dataset": dataset, "new_epsilon_spent": str(totals.epsilon),
            "new_delta_spent": str(totals.delta), "new_releases": totals.releases, "new_last_cost": totals.last_cost,
            "new_epsilon_pending": str(totals.epsilon_pending), "new_delta_pending": str(totals.delta_pending),
            "new_pending": totals.pending})

    def budget(self, username: str, dataset: str) -> Budget | None:
        # one statement: the grant and its running totals, as of one moment
        rows = self._rows(BUDGET_OF, {"username": username, "dataset": dataset})
        if not rows:
            return None
        grant = rows[0]
        t = _totals_of(grant) if grant["epsilon_spent"] is not None else _Totals()
        return Budget(username, dataset, grant["grant_epsilon"], grant["grant_delta"], float(t.epsilon),
                      float(t.delta), t.releases, t.last_cost, float(t.epsilon_pending), float(t.delta_pending),
                      t.pending)

    def reserve(self, username: str, dataset: str, epsilon: float, delta: float, owner: str | None = None) -> str:
        _check_amount(epsilon, "epsilon")
        _check_amount(delta, "delta")
        reservation_id = uuid.uuid4().hex
        with self._tx(durable=False) as conn:
            key = {"username": username, "dataset": dataset}
            row = conn.execute(GRANT_AND_TOTALS_LOCKED, key).mappings().first()  # the grant, and the user's lock
            if row is None:  # a first reservation (no totals yet), or no grant
                conn.execute(self._ensure_totals, key | ZERO_TOTALS)
                row = conn.execute(GRANT_AND_TOTALS_LOCKED, key).mappings().first()
            if row is None:
                raise InsufficientBudget(
                    f"you have no budget on dataset '{dataset}'; ask an admin for a grant",
                    cost={"epsilon": epsilon, "delta": delta},
                    remaining={"epsilon": 0.0, "delta": 0.0},
                )
            totals = _totals_of(row)
            grant_epsilon, grant_delta = row["grant_epsilon"], row["grant_delta"]
            # compare the correctly rounded exact sums: float noise in 0.1 + 0.2 never decides a refusal
            if (float(totals.epsilon + Fraction(epsilon)) > grant_epsilon
                    or float(totals.delta + Fraction(delta)) > grant_delta):
                remaining = {
                    "epsilon": max(grant_epsilon - float(totals.epsilon), 0.0),
                    "delta": max(grant_delta - float(totals.delta), 0.0),
                }
                raise InsufficientBudget(
                    f"not enough budget on '{dataset}': this query costs epsilon={epsilon:.6g}"
                    + (f", delta={delta:.3g}" if delta else "")
                    + f"; remaining epsilon={remaining['epsilon']:.6g}"
                    + (f", delta={remaining['delta']:.3g}" if grant_delta else "")
                    + (f" ({totals.pending} of your queries are still running)" if totals.pending else "")
                    + ". Nothing was charged.",
                    cost={"epsilon": epsilon, "delta": delta},
                    remaining=remaining,
                )
            pools = self._charge_pools(conn, username, dataset, Fraction(epsilon), Fraction(delta)) if row["classes"] else []
            conn.execute(LEDGER_INSERT, {
                "reservation_id": reservation_id, "username": username, "dataset": dataset, "kind": "reserve",
                "epsilon": float(epsilon), "delta": float(delta), "created_at": utcnow(), "instance_id": owner,
                "note": "", "pools": json.dumps(pools)})
            totals.epsilon += Fraction(epsilon)
            totals.delta += Fraction(delta)
            totals.epsilon_pending += Fraction(epsilon)
            totals.delta_pending += Fraction(delta)
            totals.pending += 1
            self._write_totals(conn, username, dataset, totals)
        return reservation_id

    def _settle_in(self, conn: sa.Connection, reservation_id: str, kind: str, note: str) -> bool:
        """Settle a reservation; False when it already was, the same way (commit and refund are idempotent)."""
        row = conn.execute(RESERVE_ROW_AND_TOTALS_LOCKED, {"reservation_id": reservation_id}).mappings().first()
        if row is None:
            raise NotFound("no such reservation")
        totals = _totals_of({c.name: row[f"t_{c.name}"] for c in budget_totals.c})
        # locked, then look: another replica may have settled it meanwhile
        settled = conn.execute(SETTLEMENT_KIND, {"reservation_id": reservation_id}).scalar()
        if settled == kind:
            return False
        if settled is not None:
            raise Conflict(f"reservation already settled ({settled})")
        conn.execute(LEDGER_INSERT, {
            "reservation_id": reservation_id, "username": row["username"], "dataset": row["dataset"], "kind": kind,
            "epsilon": row["epsilon"], "delta": row["delta"], "created_at": utcnow(), "instance_id": row["instance_id"],
            "note": note, "pools": "[]"})
        epsilon, delta = Fraction(row["epsilon"]), Fraction(row["delta"])
        totals.epsilon_pending -= epsilon
        totals.delta_pending -= delta
        totals.pending -= 1
        if kind == "refund":
            totals.epsilon -= epsilon
            totals.delta -= delta
            left_a_course = False
            for course in json.loads(row["pools"]):
                spent_eps, spent_delta = self._pool(conn, course, row["dataset"], lock=True)
                self._write_pool(conn, course, row["dataset"], spent_eps - epsilon, spent_delta - delta)
                left_a_course |= conn.execute(sa.select(course_members.c.course).where(
                    course_members.c.course == course, course_members.c.username == row["username"])).first() is None
            if left_a_course:
                # Their grant was cut to spent + pending when they left; the refunded part came from the class
                # and must not stay spendable outside it (pool and grant stay in step).
                self._lower_grant(conn, row["username"], row["dataset"], epsilon, delta, totals)
        else:
            totals.releases += 1
            totals.last_cost = row["epsilon"]
        self._write_totals(conn, row["username"], row["dataset"], totals)
        return True

    def _lower_grant(self, conn: sa.Connection, username: str, dataset: str, epsilon: Fraction,
                     delta: Fraction, totals: _Totals) -> None:
        """Lower a grant by a refunded amount, never below what is spent or running."""
        where = (grants.c.username == username, grants.c.dataset == dataset)
        grant = conn.execute(sa.select(grants.c.epsilon, grants.c.delta).where(*where)).first()
        if grant is None:
            return
        conn.execute(sa.update(grants).where(*where).values(
            epsilon=max(float(Fraction(grant.epsilon) - epsilon), float(totals.epsilon)),
            delta=max(float(Fraction(grant.delta) - delta), float(totals.delta)), updated_at=utcnow()))

    def _pool(self, conn: sa.Connection, course: str, dataset: str, lock: bool = False) -> tuple[Fraction, Fraction]:
        key = {"course": course, "dataset": dataset}
        if lock:
            conn.execute(self._ensure_pool, key | {"epsilon_spent": "0", "delta_spent": "0"})
        row = conn.execute(POOL_LOCKED if lock else POOL_OF, key).first()
        return (Fraction(row[0]), Fraction(row[1])) if row else (Fraction(0), Fraction(0))

    def _write_pool(self, conn: sa.Connection, course: str, dataset: str, epsilon: Fraction,
                    delta: Fraction) -> None:
        conn.execute(POOL_WRITE, {"key_course": course, "key_dataset": dataset, "new_epsilon": str(epsilon),
                                  "new_delta": str(delta)})

    def _charge_pools(self, conn: sa.Connection, username: str, dataset: str, epsilon: Fraction,
                      delta: Fraction) -> list[str]:
        """Inside the reservation's transaction: every class the student is in that uses this dataset must have
        room under its cap; all are charged, or none and nothing is reserved."""
        classes = conn.execute(CLASSES_OF, {"username": username, "dataset": dataset}).all()
        charged = []
        for course, epsilon_cap, delta_cap in classes:
            spent_eps, spent_delta = self._pool(conn, course, dataset, lock=True)
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
            inserted = conn.execute(self._insert(courses).values(name=name, hub_group=hub_group, created_at=utcnow())
                                    .on_conflict_do_nothing()).rowcount
            if not inserted:
                raise Conflict(f"course '{name}' already exists")
            self._audit(conn, actor, "create_course", course=name, hub_group=hub_group)
            return self._course(conn, name)

    def _course(self, conn: sa.Connection, name: str) -> CourseRecord:
        row = conn.execute(sa.select(courses).where(courses.c.name == name)).mappings().first()
        if row is None:
            raise NotFound(f"no course '{name}'")
        members = tuple(conn.execute(sa.select(course_members.c.username).where(course_members.c.course == name)
                                     .order_by(course_members.c.username)).scalars())
        datasets_of = tuple(
            CourseDataset(name, r["dataset"], r["epsilon_per_student"], r["delta_per_student"], r["epsilon_cap"],
                          r["delta_cap"])
            for r in conn.execute(sa.select(course_datasets).where(course_datasets.c.course == name)
                                  .order_by(course_datasets.c.dataset)).mappings())
        return CourseRecord(name, row["hub_group"], row["created_at"], members, datasets_of,
                            bool(row["share_answers"]))

    def get_course(self, name: str) -> CourseRecord | None:
        with self._reading() as conn:
            try:
                return self._course(conn, name)
            except NotFound:
                return None

    def list_courses(self) -> list[CourseRecord]:
        with self._reading() as conn:
            names = conn.execute(sa.select(courses.c.name).order_by(courses.c.name)).scalars().all()
            return [self._course(conn, n) for n in names]

    def _raise_grant(self, conn: sa.Connection, username: str, dataset: str, epsilon: float,
                     delta: float) -> None:
        statement = self._insert(grants).values(username=username, dataset=dataset, epsilon=float(epsilon),
                                                delta=float(delta), updated_at=utcnow())
        conn.execute(statement.on_conflict_do_update(
            index_elements=[grants.c.username, grants.c.dataset],
            set_={"epsilon": self._greatest(grants.c.epsilon, statement.excluded.epsilon),
                  "delta": self._greatest(grants.c.delta, statement.excluded.delta),
                  "updated_at": statement.excluded.updated_at}))

    def set_course_dataset(self, course: str, dataset: str, epsilon_per_student: float, delta_per_student: float,
                           epsilon_cap: float, delta_cap: float, actor: str) -> CourseRecord:
        for value, name in ((epsilon_per_student, "epsilon_per_student"), (delta_per_student, "delta_per_student"),
                            (epsilon_cap, "epsilon_cap"), (delta_cap, "delta_cap")):
            _check_amount(value, name)
        if delta_per_student >= 1 or delta_cap >= 1:
            raise BadRequest("delta must be below 1")
        with self._tx() as conn:
            self._course(conn, course)
            if conn.execute(sa.select(datasets.c.name).where(datasets.c.name == dataset)).first() is None:
                raise NotFound(f"no dataset '{dataset}'")
            values = {"epsilon_per_student": float(epsilon_per_student),
                      "delta_per_student": float(delta_per_student), "epsilon_cap": float(epsilon_cap),
                      "delta_cap": float(delta_cap), "updated_at": utcnow()}
            conn.execute(self._insert(course_datasets).values(course=course, dataset=dataset, **values)
                         .on_conflict_do_update(index_elements=[course_datasets.c.course, course_datasets.c.dataset],
                                                set_=values))
            for username in conn.execute(sa.select(course_members.c.username)
                                         .where(course_members.c.course == course)).scalars().all():
                self._raise_grant(conn, username, dataset, epsilon_per_student, delta_per_student)
            self._audit(conn, actor, "set_course_dataset", course=course, dataset=dataset,
                        epsilon_per_student=epsilon_per_student, delta_per_student=delta_per_student,
                        epsilon_cap=epsilon_cap, delta_cap=delta_cap)
            return self._course(conn, course)

    def _enrol(self, conn: sa.Connection, record: CourseRecord, username: str, actor: str) -> None:
        conn.execute(self._insert(course_members).values(course=record.name, username=username, joined_at=utcnow())
                     .on_conflict_do_nothing())
        for plan in record.datasets:
            self._raise_grant(conn, username, plan.dataset, plan.epsilon_per_student, plan.delta_per_student)
        self._audit(conn, actor, "add_course_member", course=record.name, username=username)

    def _unenrol(self, conn: sa.Connection, record: CourseRecord, username: str, actor: str) -> None:
        conn.execute(sa.delete(course_members).where(course_members.c.course == record.name,
                                                     course_members.c.username == username))
        for plan in record.datasets:
            totals = self._totals(conn, username, plan.dataset, lock=True)
            conn.execute(sa.update(grants).where(grants.c.username == username, grants.c.dataset == plan.dataset)
                         .values(epsilon=float(totals.epsilon), delta=float(totals.delta), updated_at=utcnow()))
        self._audit(conn, actor, "remove_course_member", course=record.name, username=username)

    def add_course_member(self, course: str, username: str, actor: str) -> CourseRecord:
        with self._tx() as conn:
            record = self._course(conn, course)
            removed = conn.execute(sa.select(users.c.removed_at).where(users.c.username == username)).first()
            if removed is None or removed[0]:
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

    def _course_changes(self, conn: sa.Connection, username: str,
                        hub_groups: Collection[str]) -> tuple[list[str], list[str]]:
        groups = set(hub_groups)
        wanted = {name for name, group in conn.execute(sa.select(courses.c.name, courses.c.hub_group))
                  if group in groups}
        current = set(conn.execute(sa.select(course_members.c.course)
                                   .where(course_members.c.username == username)).scalars())
        return sorted(wanted - current), sorted(current - wanted)

    def sync_course_memberships(self, username: str, hub_groups: Collection[str],
                                actor: str) -> tuple[list[str], list[str]]:
        with self._reading() as conn:
            joins, leaves = self._course_changes(conn, username, hub_groups)
        if not joins and not leaves:
            return [], []  # the usual case: a read, no write lock
        with self._tx() as conn:
            # again, under the user's lock: two replicas syncing the same user change it once
            conn.execute(sa.select(users.c.username).where(users.c.username == username).with_for_update())
            joins, leaves = self._course_changes(conn, username, hub_groups)
            for course in joins:
                self._enrol(conn, self._course(conn, course), username, actor)
            for course in leaves:
                self._unenrol(conn, self._course(conn, course), username, actor)
        return joins, leaves

    # --- budget requests ---------------------------------------------------------------------------------

    def request_budget(self, username: str, dataset: str, epsilon: float, delta: float,
                       reason: str) -> BudgetRequest:
        _check_amount(epsilon, "epsilon")
        _check_amount(delta, "delta")
        if epsilon == 0 and delta == 0:
            raise BadRequest("ask for some epsilon (or delta): both are 0")
        if epsilon > MAX_REQUEST_EPSILON or delta >= 1:
            raise BadRequest(f"a request may ask for at most epsilon={MAX_REQUEST_EPSILON:g} (and delta below 1)")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
            raise BadRequest("say why in a reason of 1 to 500 characters (the instructor reads it)")
        with self._tx() as conn:
            if conn.execute(GRANT_ROW, {"username": username, "dataset": dataset}).first() is None:
                raise Forbidden(f"you have no budget on '{dataset}' to add to: ask an admin for access first")
            pending = conn.execute(sa.select(budget_requests.c.id).where(
                budget_requests.c.username == username, budget_requests.c.dataset == dataset,
                budget_requests.c.status == "pending")).first()
            if pending is not None:
                raise Conflict(f"your request #{pending[0]} on '{dataset}' is still waiting for an answer")
            course = conn.execute(CLASSES_OF, {"username": username, "dataset": dataset}).first()
            new_id = conn.execute(sa.insert(budget_requests).values(
                username=username, dataset=dataset, course=course[0] if course else None, epsilon=float(epsilon),
                delta=float(delta), reason=reason.strip(), status="pending", note="", created_at=utcnow())
            ).inserted_primary_key[0]
            self._audit(conn, username, "request_budget", request=int(new_id), dataset=dataset,
                        epsilon=epsilon, delta=delta, course=course[0] if course else None)
            return self._budget_request(conn, int(new_id))

    def _budget_request(self, conn: sa.Connection, request_id: int, lock: bool = False) -> BudgetRequest:
        query = sa.select(budget_requests).where(budget_requests.c.id == request_id)
        row = conn.execute(query.with_for_update() if lock else query).mappings().first()
        if row is None:
            raise NotFound(f"no budget request #{request_id}")
        return BudgetRequest(**row)

    def list_budget_requests(self, username: str | None = None, status: str | None = None,
                             limit: int = 200) -> list[BudgetRequest]:
        query = sa.select(budget_requests).order_by(budget_requests.c.id.desc()).limit(limit)
        if username is not None:
            query = query.where(budget_requests.c.username == username)
        if status is not None:
            query = query.where(budget_requests.c.status == status)
        return [BudgetRequest(**r) for r in self._rows(query)]

    def decide_budget_request(self, request_id: int, approve: bool, actor: str, epsilon: float | None = None,
                              delta: float | None = None, note: str = "", raise_cap: bool = False) -> BudgetRequest:
        if not isinstance(note, str) or len(note) > 500:
            raise BadRequest("a note is text of at most 500 characters")
        with self._tx() as conn:
            asked = self._budget_request(conn, request_id, lock=True)
            if asked.status != "pending":
                raise Conflict(f"request #{request_id} was already {asked.status}")
            now = utcnow()
            if not approve:
                conn.execute(sa.update(budget_requests).where(budget_requests.c.id == request_id).values(
                    status="declined", decided_by=actor, note=note, decided_at=now))
                self._audit(conn, actor, "decline_budget_request", request=request_id, username=asked.username,
                            dataset=asked.dataset, note=note)
                return self._budget_request(conn, request_id)
            epsilon = asked.epsilon if epsilon is None else epsilon
            delta = asked.delta if delta is None else delta
            _check_amount(epsilon, "epsilon")
            _check_amount(delta, "delta")
            if epsilon > asked.epsilon or delta > asked.delta:
                raise BadRequest(f"approve at most what was asked for (epsilon={asked.epsilon:g}, "
                                 f"delta={asked.delta:g}); decline and ask them to file another for more")
            if asked.course is not None:
                self._room_in_class(conn, asked, epsilon, delta, raise_cap, actor)
            totals = self._totals(conn, asked.username, asked.dataset, lock=True)  # the user's spending lock
            grant = conn.execute(GRANT_ROW, {"username": asked.username, "dataset": asked.dataset}).mappings().first()
            base_eps, base_delta = (grant["epsilon"], grant["delta"]) if grant else (float(totals.epsilon),
                                                                                       float(totals.delta))
            self._set_grant_in(conn, asked.username, asked.dataset, base_eps + epsilon, base_delta + delta, now)
            conn.execute(sa.update(budget_requests).where(budget_requests.c.id == request_id).values(
                status="approved", granted_epsilon=float(epsilon), granted_delta=float(delta), decided_by=actor,
                note=note, decided_at=now))
            self._audit(conn, actor, "approve_budget_request", request=request_id, username=asked.username,
                        dataset=asked.dataset, epsilon=epsilon, delta=delta, note=note)
            return self._budget_request(conn, request_id)

    def _set_grant_in(self, conn: sa.Connection, username: str, dataset: str, epsilon: float, delta: float,
                      now: str) -> None:
        if delta >= 1:
            raise BadRequest("the grant's delta would reach 1: approve less delta")
        values = {"epsilon": float(epsilon), "delta": float(delta), "updated_at": now}
        conn.execute(self._insert(grants).values(username=username, dataset=dataset, **values)
                     .on_conflict_do_update(index_elements=[grants.c.username, grants.c.dataset], set_=values))

    def _room_in_class(self, conn: sa.Connection, asked: BudgetRequest, epsilon: float, delta: float,
                       raise_cap: bool, actor: str) -> None:
        """What the approval grants must fit under the class's cap (spent and running included), or the cap is
        raised just enough, explicitly."""
        plan = conn.execute(sa.select(course_datasets).where(course_datasets.c.course == asked.course,
                                                             course_datasets.c.dataset == asked.dataset)
                            ).mappings().first()
        if plan is None:
            return  # the course no longer has this dataset: the grant is the student's own
        spent_eps, spent_delta = self._pool(conn, asked.course, asked.dataset, lock=True)  # type: ignore[arg-type]
        need_eps, need_delta = float(spent_eps) + epsilon, float(spent_delta) + delta
        if need_eps <= plan["epsilon_cap"] + 1e-12 and need_delta <= plan["delta_cap"] + 1e-15:
            return
        if not raise_cap:
            room = max(plan["epsilon_cap"] - float(spent_eps), 0.0)
            raise Conflict(
                f"the class '{asked.course}' has epsilon={room:.6g} left under its cap of {plan['epsilon_cap']:.6g} "
                f"on '{asked.dataset}' (delta: {max(plan['delta_cap'] - float(spent_delta), 0.0):.3g}): approve at "
                "most that, or raise the cap with this approval (raise_cap)")
        cap_eps, cap_delta = max(plan["epsilon_cap"], need_eps), max(plan["delta_cap"], need_delta)
        if cap_delta >= 1:
            raise BadRequest("the class's delta cap would reach 1: approve less delta")
        conn.execute(sa.update(course_datasets).where(course_datasets.c.course == asked.course,
                                                      course_datasets.c.dataset == asked.dataset)
                     .values(epsilon_cap=cap_eps, delta_cap=cap_delta, updated_at=utcnow()))
        self._audit(conn, actor, "raise_class_cap", course=asked.course, dataset=asked.dataset,
                    epsilon_cap=cap_eps, delta_cap=cap_delta, request=asked.id)

    def set_course_sharing(self, course: str, share_answers: bool, actor: str) -> CourseRecord:
        if not isinstance(share_answers, bool):
            raise BadRequest("share_answers must be true or false")
        with self._tx() as conn:
            self._course(conn, course)
            conn.execute(sa.update(courses).where(courses.c.name == course)
                         .values(share_answers=int(share_answers)))
            self._audit(conn, actor, "set_course_sharing", course=course, share_answers=share_answers)
            return self._course(conn, course)

    def find_class_release(
        self, username: str, dataset: str, dataset_version: int, canonical: str, params: dict[str, Any]
    ) -> tuple[ReleaseRecord, str] | None:
        with self._reading() as conn:
            sharing = set(conn.execute(SHARING_CLASSES_OF, {"username": username, "dataset": dataset}).scalars())
            if not sharing:
                return None  # the usual case: one small read
            for row in conn.execute(CLASS_RELEASES, {
                    "dataset": dataset, "dataset_version": dataset_version, "canonical": canonical,
                    "params_json": _params_key(params)}).mappings():
                paid_by = sorted(sharing.intersection(json.loads(row["pools"])))
                if paid_by:
                    return _release_record(row), paid_by[0]
        return None

    def class_spending(self, course: str, dataset: str) -> ClassSpending:
        with self._reading() as conn:
            record = self._course(conn, course)
            plan = next((d for d in record.datasets if d.dataset == dataset), None)
            if plan is None:
                raise NotFound(f"course '{course}' has no dataset '{dataset}'")
            epsilon, delta = self._pool(conn, course, dataset)
            per_student = {}
            for username in record.members:
                t = self._totals(conn, username, dataset)
                per_student[username] = {"epsilon_spent": float(t.epsilon), "delta_spent": float(t.delta),
                                         "releases": t.releases}
        return ClassSpending(course, dataset, plan.epsilon_cap, plan.delta_cap, float(epsilon), float(delta),
                             per_student)

    def commit(self, reservation_id: str, note: str = "") -> None:
        with self._tx() as conn:
            self._settle_in(conn, reservation_id, "commit", note)

    def commit_release(self, reservation_id: str, release: ReleaseDraft) -> ReleaseRecord:
        with self._tx() as conn:
            if not self._settle_in(conn, reservation_id, "commit", ""):
                earlier = conn.execute(RELEASE_OF_RESERVATION, {"reservation_id": reservation_id}).mappings().first()
                if earlier is None:
                    raise Conflict("reservation already settled (commit) without a release")
                return _release_record(earlier)  # the same call again: the same release, charged once
            return self._archive_in(conn, release, reservation_id)

    def refund(self, reservation_id: str, note: str = "") -> None:
        with self._tx(durable=False) as conn:
            self._settle_in(conn, reservation_id, "refund", note)

    # --- service instances (who holds which reservation) -------------------------------------------------

    def register_instance(self, instance: InstanceRecord) -> None:
        with self._tx() as conn:
            conn.execute(sa.insert(instances).values(
                id=instance.id, hostname=instance.hostname, pid=instance.pid, process_start=instance.process_start,
                started_at=instance.started_at, heartbeat_at=instance.heartbeat_at))

    def heartbeat(self, instance_id: str) -> None:
        with self._tx() as conn:
            conn.execute(sa.update(instances).where(instances.c.id == instance_id).values(heartbeat_at=utcnow()))

    def running_instances(self) -> list[InstanceRecord]:
        rows = self._rows(sa.select(instances).where(instances.c.stopped_at.is_(None))
                          .order_by(instances.c.started_at))
        return [InstanceRecord(**{k: v for k, v in r.items() if k != "stopped_at"}) for r in rows]

    def retire_instance(self, instance_id: str | None, note: str) -> int:
        with self._tx() as conn:
            if instance_id is None:
                owned = ledger.c.instance_id.is_(None)
            else:
                # the lock makes a second replica wait, then see the instance already stopped
                row = conn.execute(sa.select(instances.c.stopped_at).where(instances.c.id == instance_id)
                                   .with_for_update()).first()
                if row is not None and row[0] is not None:
                    return 0  # another replica retired it first
                conn.execute(sa.update(instances).where(instances.c.id == instance_id).values(stopped_at=utcnow()))
                owned = ledger.c.instance_id == instance_id
            settlement = ledger.alias("s")
            open_ids = conn.execute(
                sa.select(ledger.c.reservation_id).where(
                    ledger.c.kind == "reserve", owned,
                    ~sa.exists().where(settlement.c.reservation_id == ledger.c.reservation_id,
                                       settlement.c.kind != "reserve"))
                .order_by(ledger.c.id)).scalars().all()
            settled = sum(self._settle_in(conn, rid, "refund", note) for rid in open_ids)
            if settled:
                self._audit(conn, "system", "settle_abandoned", instance=instance_id, refunded=settled)
        return settled

    def ledger(self, username: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        query = sa.select(ledger).order_by(ledger.c.id.desc()).limit(limit)
        if username is not None:
            query = query.where(ledger.c.username == username)
        return [dict(r) | {"pools": json.loads(r["pools"])} for r in self._rows(query)]

    # --- archive and audit --------------------------------------------------------------------------------

    def _archive_in(self, conn: sa.Connection, release: ReleaseDraft, reservation_id: str) -> ReleaseRecord:
        now = utcnow()
        result = conn.execute(RELEASE_INSERT, {
            "username": release.username, "dataset": release.dataset, "dataset_version": release.dataset_version,
            "sql": release.sql, "canonical": release.canonical, "params_json": _params_key(release.params),
            "epsilon": release.epsilon, "delta": release.delta, "result_json": json.dumps(release.result),
            "reservation_id": reservation_id, "created_at": now})
        fields_of = {f.name: getattr(release, f.name) for f in fields(release)}  # no deep copy of the result
        return ReleaseRecord(id=int(result.inserted_primary_key[0]), created_at=now, **fields_of)

    def list_releases(
        self, username: str | None = None, dataset: str | None = None, limit: int = 200
    ) -> list[ReleaseRecord]:
        query = sa.select(releases).order_by(releases.c.id.desc()).limit(limit)
        if username is not None:
            query = query.where(releases.c.username == username)
        if dataset is not None:
            query = query.where(releases.c.dataset == dataset)
        return [_release_record(r) for r in self._rows(query)]

    def find_release(
        self, username: str, dataset: str, dataset_version: int, canonical: str, params: dict[str, Any]
    ) -> ReleaseRecord | None:
        rows = self._rows(FIND_RELEASE, {"username": username, "dataset": dataset, "dataset_version": dataset_version,
                                         "canonical": canonical, "params_json": _params_key(params)})
        return _release_record(rows[0]) if rows else None

    def audit(self, limit: int = 200) -> list[AuditEntry]:
        rows = self._rows(sa.select(audit).order_by(audit.c.id.desc()).limit(limit))
        return [AuditEntry(r["id"], r["actor"], r["action"], json.loads(r["detail_json"]), r["created_at"])
                for r in rows]


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


def _totals_of(row: Row) -> _Totals:
    return _Totals(Fraction(row["epsilon_spent"]), Fraction(row["delta_spent"]), row["releases"], row["last_cost"],
                   Fraction(row["epsilon_pending"]), Fraction(row["delta_pending"]), row["pending"])


def _params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def _release_record(r: Row) -> ReleaseRecord:
    return ReleaseRecord(r["id"], r["username"], r["dataset"], r["dataset_version"], r["sql"], r["canonical"],
                         json.loads(r["params_json"]), r["epsilon"], r["delta"], json.loads(r["result_json"]),
                         r["created_at"])


def _dataset(row: Row) -> DatasetRecord:
    return DatasetRecord(row["name"], row["description"], json.loads(row["metadata_json"]), row["parquet_path"],
                         row["version"], row["created_at"])


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise BadRequest(f"role must be one of {list(ROLES)}")


def _check_username(username: str) -> None:
    if not isinstance(username, str) or not (1 <= len(username) <= 128) or not username.isprintable():
        raise BadRequest("username must be 1 to 128 printable characters")


def _check_amount(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BadRequest(f"{name} must be a non-negative number")
