"""The DP service's domain logic: who may do what, and the check-reserve-run-commit flow of a query.

Handlers call these methods and only translate HTTP; everything here is testable without a server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import engine
from .datasets import (
    check_data_file,
    check_dataset_name,
    dummy_frame,
    dummy_parquet,
    import_dataset,
    propose_metadata,
)
from .errors import BadRequest, ChargedFailure, Conflict, Forbidden, LomasError, NotFound
from .metadata import parse_metadata
from .sql import DEFAULT_MAX_GROUPS, compile_sql
from .store import AdminStore, DatasetRecord, ReleaseDraft, UserRecord
from .uploads import CHUNK_BYTES, UploadArea
from .workers import WorkerPool

PRICE_CACHE_SIZE = 2048


@dataclass(frozen=True)
class QueryRequest:
    dataset: str
    sql: str
    epsilon: float
    delta: float
    bounds: dict[str, Any] | None
    fresh: bool = False

    @classmethod
    def parse(cls, body: dict[str, Any], max_epsilon: float) -> QueryRequest:
        allowed = {"dataset", "sql", "epsilon", "delta", "bounds", "fresh"}
        unknown = set(body) - allowed
        if unknown:
            raise BadRequest(f"unknown field(s) {sorted(unknown)}; a query takes {sorted(allowed)}")
        dataset = body.get("dataset")
        if not isinstance(dataset, str) or not dataset:
            raise BadRequest("'dataset' is required: the name of the dataset to query")
        sql = body.get("sql")
        if not isinstance(sql, str) or not sql.strip():
            raise BadRequest("'sql' is required: the SELECT query to run")
        if "epsilon" not in body:
            raise BadRequest("'epsilon' is required: the privacy budget to spend on this query")
        epsilon = engine.check_epsilon(body["epsilon"], max_epsilon)
        delta = body.get("delta", 0.0)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta):
            raise BadRequest("delta must be a number")
        if not 0 <= delta < 1:
            raise BadRequest("delta must be at least 0 and below 1")
        bounds = body.get("bounds")
        if bounds is not None and not isinstance(bounds, dict):
            raise BadRequest("bounds must be an object mapping column names to [lower, upper]")
        fresh = body.get("fresh", False)
        if not isinstance(fresh, bool):
            raise BadRequest("fresh must be true or false")
        return cls(dataset, sql, epsilon, float(delta), bounds, fresh)

    def params(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "delta": self.delta, "bounds": self.bounds}


@dataclass(frozen=True)
class TimingPadding:
    """Response-time padding for answers computed from the data (Lomas calls it stall/jitter).

    `stall`: no such answer comes back sooner than `seconds` after the request arrived, so run times below
    that say nothing. `jitter`: a uniform random delay of up to `seconds` is added. Both cost latency: stall
    makes every query take at least `seconds`, jitter adds `seconds / 2` on average.
    """

    method: str = "off"  # off | stall | jitter
    seconds: float = 0.0

    async def pad(self, started: float) -> None:
        if self.method == "stall":
            delay = self.seconds - (time.monotonic() - started)
        elif self.method == "jitter":
            delay = secrets.SystemRandom().uniform(0, self.seconds)
        else:
            return
        if delay > 0:
            await asyncio.sleep(delay)


class DPService:
    def __init__(
        self,
        store: AdminStore,
        storage_dir: str | Path,
        pool: WorkerPool,
        max_epsilon_per_query: float = 10.0,
        pricing_pool: WorkerPool | None = None,
        max_groups: int = DEFAULT_MAX_GROUPS,
        instance_id: str | None = None,
        padding: TimingPadding | None = None,
        protect_admin_access: bool = False,
        max_upload_bytes: int = 2 * 1024**3,
        import_dirs: list[str | Path] | None = None,
        free_timeout: float = 20.0,
    ) -> None:
        self.store = store
        self.storage_dir = Path(storage_dir)
        self.pool = pool
        # previews never queue behind running queries: they get their own worker(s)
        self.pricing_pool = pricing_pool or pool
        self.max_epsilon_per_query = max_epsilon_per_query
        self.max_groups = max_groups
        self.instance_id = instance_id  # the service process that holds this service's reservations
        self.padding = padding or TimingPadding()
        # with token identity, the API must never lock every admin out (lomas-admin can always recover)
        self.protect_admin_access = protect_admin_access
        self.uploads = UploadArea(self.storage_dir / "uploads", max_upload_bytes)
        # the only folders an admin's `path` import or draft may read from (none: path imports are off)
        self.import_dirs = [Path(d).resolve() for d in import_dirs or []]
        # Free requests (previews, dummy queries) cost the service work but no budget: each user runs one at a
        # time (the next waits for it), each is stopped after `free_timeout` seconds, and pricing is bounded
        # by public information (accuracy.SUPPORT_BINS), so no user's free requests hold a worker for long.
        self.free_timeout = free_timeout
        self._free_slots: dict[str, asyncio.Lock] = {}
        # both caches are pure functions of their keys (dataset version included), so never stale
        self._prices: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._specs: OrderedDict[tuple[str, int, str], tuple[Any, Any]] = OrderedDict()

    # --- identity -----------------------------------------------------------------------------------------

    def ensure_user(self, username: str, role: str) -> UserRecord:
        user = self.store.get_user(username)
        if user is None:
            try:
                user = self.store.create_user(username, role, actor="system")
            except LomasError:
                user = self.store.get_user(username)  # created concurrently
                assert user is not None
        return user

    def hub_user(self, username: str, hub_groups: list[str], instructor: bool) -> UserRecord:
        """The lomas user behind a JupyterHub identity: created as an analyst on first use, enrolled in exactly
        the courses of their Hub groups, and an admin for this request when the Hub grants the instructor
        scope (the Hub, not this store, decides who teaches)."""
        user = self.store.get_user(username)
        if user is None:
            try:
                user = self.store.create_user(username, "analyst", actor="hub", revive=False)
            except Conflict:
                user = self.store.get_user(username)  # created by a concurrent first request
                assert user is not None
        self.store.sync_course_memberships(username, hub_groups, actor="hub")
        return replace(user, role="admin") if instructor and user.role != "admin" else user

    @staticmethod
    def require_admin(user: UserRecord) -> None:
        if user.role != "admin":
            raise Forbidden("this needs the admin role")

    # --- analyst side -------------------------------------------------------------------------------------

    def _dataset(self, name: str) -> DatasetRecord:
        record = self.store.get_dataset(name) if isinstance(name, str) else None
        if record is None:
            known = ", ".join(d.name for d in self.store.list_datasets()) or "none yet"
            raise NotFound(f"no dataset '{name}'. Available: {known}")
        return record

    def list_datasets(self, user: UserRecord) -> list[dict[str, Any]]:
        out = []
        for record in self.store.list_datasets():
            budget = self.store.budget(user.username, record.name)
            out.append(
                {
                    "name": record.name,
                    "description": record.description,
                    "version": record.version,
                    "budget": budget.to_json() if budget else None,
                }
            )
        return out

    def describe(self, name: str) -> dict[str, Any]:
        return self._dataset(name).to_public_json()

    def budgets(self, user: UserRecord) -> list[dict[str, Any]]:
        out = []
        for grant in self.store.list_grants(user.username):
            budget = self.store.budget(user.username, grant.dataset)
            if budget is not None:
                out.append(budget.to_json())
        return out

    def budget(self, user: UserRecord, dataset: str) -> dict[str, Any]:
        self._dataset(dataset)
        budget = self.store.budget(user.username, dataset)
        if budget is None:
            raise NotFound(f"you have no budget on dataset '{dataset}'; ask an admin for a grant")
        return budget.to_json()

    def archive(self, user: UserRecord, dataset: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        return [r.to_json() for r in self.store.list_releases(user.username, dataset, limit)]

    def _compile(self, request: QueryRequest) -> tuple[DatasetRecord, Any]:
        record = self._dataset(request.dataset)
        key = (record.name, record.version, request.sql)
        cached = self._specs.get(key)
        if cached is None:
            metadata = parse_metadata(record.metadata)
            spec = compile_sql(request.sql, record.name, metadata, self.max_groups)
            self._specs[key] = cached = (metadata, spec)
            while len(self._specs) > PRICE_CACHE_SIZE:
                self._specs.popitem(last=False)
        metadata, spec = cached
        engine.effective_bounds(metadata, request.bounds)  # refuse bad bounds before any work
        return record, spec

    def _free_slot(self, user: UserRecord) -> asyncio.Lock:
        return self._free_slots.setdefault(user.username, asyncio.Lock())

    def _require_grant(self, user: UserRecord, record: DatasetRecord) -> None:
        if self.store.get_grant(user.username, record.name) is None:
            raise Forbidden(f"you have no budget on dataset '{record.name}'; ask an admin for a grant")

    async def _price(self, record: DatasetRecord, spec: Any, request: QueryRequest) -> dict[str, Any]:
        """Noise scale, exact cost and accuracy, computed by a worker from metadata only (and remembered: the
        same query on the same dataset version at the same epsilon always prices the same)."""
        key = json.dumps([record.name, record.version, spec.canonical(), request.epsilon, request.delta,
                          request.bounds], sort_keys=True)
        if key in self._prices:
            self._prices.move_to_end(key)
            return self._prices[key]
        price = await self.pricing_pool.run(engine.preview_task, spec.to_json(), record.metadata, request.epsilon,
                                            request.delta, request.bounds, timeout=self.free_timeout)
        self._prices[key] = price
        while len(self._prices) > PRICE_CACHE_SIZE:
            self._prices.popitem(last=False)
        return price

    async def preview(self, user: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        request = QueryRequest.parse(body, self.max_epsilon_per_query)
        record, spec = self._compile(request)
        self._require_grant(user, record)
        async with self._free_slot(user):
            preview = await self._price(record, spec, request)
        budget = self.store.budget(user.username, record.name)
        return {
            "dataset": record.name,
            "dataset_version": record.version,
            "sql": request.sql,
            "columns": [o.name for o in spec.outputs],
            "cost": {"epsilon": preview["epsilon"], "delta": preview["delta"]},
            "requested": {"epsilon": request.epsilon, "delta": request.delta},
            "aggregates": preview["plan"]["aggregates"],
            "plan": preview["plan"],
            "budget": budget.to_json() if budget else None,
            "affordable": bool(
                budget
                and budget.epsilon_spent + preview["epsilon"] <= budget.epsilon_total
                and budget.delta_spent + preview["delta"] <= budget.delta_total
            ),
        }

    async def _release(self, record: DatasetRecord, spec: Any, request: QueryRequest, price: dict[str, Any],
                       parquet_path: str, timeout: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run the priced query on a parquet file in a worker: (the worker's answer, the answer's public part)."""
        released = await self.pool.run(
            engine.release_task, spec.to_json(), record.metadata, request.bounds, parquet_path, price,
            timeout=timeout,
        )
        answer = {
            "dataset": record.name,
            "dataset_version": record.version,
            "sql": request.sql,
            "columns": released["columns"],
            "rows": released["rows"],
            "intervals": released["intervals"],
            "aggregates": released["aggregates"],
            "plan": released["plan"],
            "requested": {"epsilon": request.epsilon, "delta": request.delta},
        }
        return released, answer

    async def query(self, user: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        request = QueryRequest.parse(body, self.max_epsilon_per_query)
        record, spec = self._compile(request)
        if not request.fresh:
            earlier = self.store.find_release(
                user.username, record.name, record.version, spec.canonical(), request.params()
            )
            if earlier is not None:  # asking again reveals nothing new: hand back the same answer, free
                budget = self.store.budget(user.username, record.name)
                return {
                    "release_id": earlier.id,
                    "created_at": earlier.created_at,
                    **earlier.result,
                    "sql": request.sql,
                    "cost": {"epsilon": 0.0, "delta": 0.0},
                    "replay": True,
                    "replay_of": {"release_id": earlier.id, "epsilon": earlier.epsilon, "delta": earlier.delta},
                    "budget": budget.to_json() if budget else None,
                }
        self._require_grant(user, record)
        preview = await self._price(record, spec, request)
        data_path = check_data_file(self.storage_dir, record)  # a missing file is the service's fault: free
        started = time.monotonic()
        # Charge what the mechanism costs (its privacy map), not what was asked for.
        reservation = self.store.reserve(user.username, record.name, preview["epsilon"], preview["delta"],
                                         owner=self.instance_id)
        try:
            released, answer = await self._release(record, spec, request, preview, data_path)
        except LomasError as err:
            if not err.data_accessed:
                self.store.refund(reservation, note=f"refunded: failed before reading the data ({err.code})")
                raise type(err)(f"{err.message}; nothing was charged", **err.details) from None
            # The failure can depend on the data (a time-out on a predicate that matches many rows, say):
            # refunding it would answer a question for free.
            self.store.commit(reservation, note=f"charged: failed after reading the data ({err.code})")
            await self.padding.pad(started)
            cost = f"epsilon={preview['epsilon']:.6g}" + (f", delta={preview['delta']:.3g}" if preview["delta"] else "")
            raise ChargedFailure(
                f"{err.message}. This attempt was charged ({cost}) because it failed after the engine had "
                "started reading the data, and such a failure can itself reveal something about the data",
                charged={"epsilon": preview["epsilon"], "delta": preview["delta"]},
            ) from None
        except BaseException:
            self.store.refund(reservation, note="refunded: the request was cancelled before the release")
            raise
        result = {**answer, "cost": {"epsilon": released["epsilon"], "delta": released["delta"]}}
        draft = ReleaseDraft(user.username, record.name, record.version, request.sql, spec.canonical(),
                             request.params(), released["epsilon"], released["delta"], result)
        try:
            archived = self.store.commit_release(reservation, draft)  # the charge and its answer, together
        except BaseException:
            # nothing is committed, nothing is released: the reservation goes back
            self.store.refund(reservation, note="refunded: the release could not be archived")
            raise
        await self.padding.pad(started)
        budget = self.store.budget(user.username, record.name)
        return {
            "release_id": archived.id,
            "created_at": archived.created_at,
            **result,
            "budget": budget.to_json() if budget else None,
            "replay": False,
        }

    async def dummy_query(self, user: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        """The same query on dummy rows made from public metadata: free, never archived, clearly labelled."""
        request = QueryRequest.parse(body, self.max_epsilon_per_query)
        record, spec = self._compile(request)
        self._require_grant(user, record)
        async with self._free_slot(user):
            preview = await self._price(record, spec, request)
            path = await asyncio.to_thread(dummy_parquet, self.storage_dir, record)
            _, answer = await self._release(record, spec, request, preview, str(path), timeout=self.free_timeout)
        budget = self.store.budget(user.username, record.name)
        return {
            "dummy": True,
            **answer,
            "cost": {"epsilon": 0.0, "delta": 0.0},
            "would_cost": {"epsilon": preview["epsilon"], "delta": preview["delta"]},
            "budget": budget.to_json() if budget else None,
        }

    def dummy_rows(self, name: str, rows: int) -> dict[str, Any]:
        record = self._dataset(name)
        frame = dummy_frame(parse_metadata(record.metadata), rows, seed=record.version)
        return {"dataset": name, "dummy": True, "columns": frame.columns, "rows": frame.to_dicts()}

    # --- admin side ---------------------------------------------------------------------------------------

    def _data_source(self, admin: UserRecord, body: dict[str, Any]) -> tuple[str | bytes | Path, str | None, Any]:
        """Where an import or a draft reads its data: an upload, inline base64, or a file on this machine."""
        if isinstance(body.get("upload"), str):
            upload = self.uploads.complete_file(admin.username, body["upload"])
            return upload.path, upload.fmt, upload
        if "data_base64" in body:
            try:
                return base64.b64decode(body["data_base64"], validate=True), body.get("format"), None
            except (binascii.Error, TypeError, ValueError):
                raise BadRequest("data_base64 is not valid base64") from None
        if isinstance(body.get("path"), str):
            return self._import_path(body["path"]), body.get("format"), None
        raise BadRequest("give the data as an 'upload', as 'data_base64' (with 'format') or as a 'path' on the "
                         "service's machine")

    def _import_path(self, raw: str) -> Path:
        """A file an admin names on this machine: only inside `import_dirs`, never in the storage folder (polars
        opening the store's own SQLite file inside this process would drop its locks). Links are followed
        first, so none leads around either rule. The messages never echo the path."""
        if not self.import_dirs:
            raise BadRequest("imports from a path on the service's machine are off here (LomasApp.import_dirs is "
                             "empty): upload the file instead, or use lomas-admin dataset import")
        path = Path(raw).expanduser()
        path = (path if path.is_absolute() else self.import_dirs[0] / path).resolve()
        storage = self.storage_dir.resolve()
        if path == storage or path.is_relative_to(storage):
            raise BadRequest("the service's own storage folder cannot be imported from")
        if not any(path.is_relative_to(folder) for folder in self.import_dirs):
            raise BadRequest("that path is outside the service's import folders (LomasApp.import_dirs)")
        return path

    async def import_dataset(self, admin: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        self.require_admin(admin)
        allowed = {"name", "description", "metadata", "data_base64", "format", "path", "upload"}
        unknown = set(body) - allowed
        if unknown:
            raise BadRequest(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        name = check_dataset_name(body.get("name"))
        if "metadata" not in body:
            raise BadRequest("'metadata' is required: the dataset's public metadata")
        source, fmt, upload = self._data_source(admin, body)
        progress = self.uploads.progress(upload) if upload is not None else None
        try:
            record = await asyncio.to_thread(
                import_dataset,
                self.store,
                self.storage_dir,
                name,
                source,
                body["metadata"],
                body.get("description"),
                fmt,
                admin.username,
                progress,
            )
        except LomasError as err:
            if progress is not None:
                progress(f"refused: {err.message}")
            raise
        if upload is not None:
            self.uploads.discard(admin.username, upload.upload_id)
        warnings = await self.pricing_pool.run(engine.metadata_warnings, record.metadata)
        return record.to_public_json() | {"warnings": warnings}

    async def draft_metadata(self, admin: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        """A proposal for the admin to review; it is returned, never stored."""
        self.require_admin(admin)
        unknown = set(body) - {"data_base64", "format", "path", "upload"}
        if unknown:
            raise BadRequest(f"unknown field(s) {sorted(unknown)}; give the data as for an import")
        source, fmt, _upload = self._data_source(admin, body)
        return await asyncio.to_thread(propose_metadata, source, fmt)

    def create_upload(self, admin: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        self.require_admin(admin)
        upload = self.uploads.create(admin.username, body.get("size"), body.get("format"))
        return upload.to_json() | {"chunk_bytes": CHUNK_BYTES}

    def upload_status(self, admin: UserRecord, upload_id: str) -> dict[str, Any]:
        self.require_admin(admin)
        return self.uploads.get(admin.username, upload_id).to_json()

    def upload_chunk(self, admin: UserRecord, upload_id: str, offset: int, chunk: bytes) -> dict[str, Any]:
        self.require_admin(admin)
        return self.uploads.append(admin.username, upload_id, offset, chunk).to_json()

    def discard_upload(self, admin: UserRecord, upload_id: str) -> dict[str, Any]:
        self.require_admin(admin)
        self.uploads.discard(admin.username, upload_id)
        return {"upload": upload_id, "discarded": True}

    def create_user(self, admin: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        self.require_admin(admin)
        username = body.get("username")
        if not isinstance(username, str):
            raise BadRequest("'username' is required")
        return self.store.create_user(username, body.get("role", "analyst"), admin.username).to_json()

    def set_role(self, admin: UserRecord, username: str, body: dict[str, Any]) -> dict[str, Any]:
        self.require_admin(admin)
        return self.store.set_role(username, body.get("role", ""), admin.username,
                                   keep_admin_access=self.protect_admin_access).to_json()

    def remove_user(self, admin: UserRecord, username: str) -> dict[str, Any]:
        self.require_admin(admin)
        revoked = self.store.remove_user(username, admin.username, keep_admin_access=self.protect_admin_access)
        return {"username": username, "removed": True, "tokens_revoked": revoked}

    def issue_token(self, admin: UserRecord, username: str, body: dict[str, Any]) -> dict[str, Any]:
        self.require_admin(admin)
        label = body.get("label", "")
        if not isinstance(label, str):
            raise BadRequest("label must be text")
        return {"username": username, "token": self.store.issue_token(username, label, admin.username)}

    def revoke_tokens(self, admin: UserRecord, username: str) -> dict[str, Any]:
        self.require_admin(admin)
        if self.store.get_user(username) is None:
            raise NotFound(f"no user '{username}'")
        revoked = self.store.revoke_tokens(username, admin.username, keep_admin_access=self.protect_admin_access)
        return {"username": username, "revoked": revoked}

    # --- courses: a class shares one cap per dataset; each student has their own grant ----------------------

    def create_course(self, admin: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        self.require_admin(admin)
        name, group = body.get("name"), body.get("hub_group")
        if not isinstance(name, str) or not isinstance(group, str):
            raise BadRequest("'name' and 'hub_group' (the Hub group of its students) are required")
        return self.store.create_course(name, group, admin.username).to_json()

    def course(self, admin: UserRecord, name: str) -> dict[str, Any]:
        self.require_admin(admin)
        record = self.store.get_course(name)
        if record is None:
            raise NotFound(f"no course '{name}'")
        return record.to_json()

    def set_course_dataset(self, admin: UserRecord, course: str, body: dict[str, Any]) -> dict[str, Any]:
        self.require_admin(admin)
        dataset = body.get("dataset")
        if not isinstance(dataset, str):
            raise BadRequest("'dataset' is required")
        amounts = [_amount(body, name) for name in ("epsilon_per_student", "delta_per_student", "epsilon_cap",
                                                     "delta_cap")]
        return self.store.set_course_dataset(course, dataset, *amounts, admin.username).to_json()

    def add_course_member(self, admin: UserRecord, course: str, body: dict[str, Any]) -> dict[str, Any]:
        self.require_admin(admin)
        username = body.get("username")
        if not isinstance(username, str):
            raise BadRequest("'username' is required")
        return self.store.add_course_member(course, username, admin.username).to_json()

    def remove_course_member(self, admin: UserRecord, course: str, username: str) -> dict[str, Any]:
        self.require_admin(admin)
        return self.store.remove_course_member(course, username, admin.username).to_json()

    def class_spending(self, admin: UserRecord, course: str, dataset: str) -> dict[str, Any]:
        self.require_admin(admin)
        return self.store.class_spending(course, dataset).to_json()

    def set_grant(self, admin: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        self.require_admin(admin)
        usernames, dataset = body.get("usernames"), body.get("dataset")
        if usernames is None:
            usernames = [body.get("username")]
        if (not isinstance(usernames, list) or not all(isinstance(u, str) for u in usernames)
                or not isinstance(dataset, str)):
            raise BadRequest("'username' (or a list 'usernames') and 'dataset' are required")
        epsilon, delta = _amount(body, "epsilon"), _amount(body, "delta")
        grants = self.store.set_grants(usernames, dataset, epsilon, delta, admin.username)
        return grants[0].to_json() if "usernames" not in body else {"grants": [g.to_json() for g in grants]}


def _amount(body: dict[str, Any], name: str) -> float:
    """A budget amount from a request body (delta defaults to 0): a finite, non-negative number."""
    value = body.get(name, 0.0 if name.startswith("delta") else None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BadRequest(f"'{name}' must be a non-negative number")
    return float(value)
