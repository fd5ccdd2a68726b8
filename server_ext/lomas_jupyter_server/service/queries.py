"""Queries: check, price, reserve, run, commit (with the release archived) or refund; previews and dummy queries
(free, bounded); what an analyst may see of datasets, budgets and the archive."""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from .. import engine
from ..engine.builder import description_to_sql
from ..engine.metadata import parse_metadata
from ..engine.post import NOTE as POST_NOTE
from ..engine.post import apply_post
from ..engine.sql import DEFAULT_MAX_GROUPS, compile_sql
from ..engine.workers import WorkerPool
from ..errors import BadRequest, ChargedFailure, Forbidden, LomasError, NotFound
from ..receipts import KEY_FILE, ReceiptSigner
from ..store import AdminStore, DatasetRecord, ReleaseDraft, ReleaseRecord, UserRecord
from .importing import check_data_file, dummy_frame, dummy_parquet

PRICE_CACHE_SIZE = 2048


@dataclass(frozen=True)
class QueryRequest:
    dataset: str
    sql: str
    epsilon: float
    delta: float
    bounds: dict[str, Any] | None
    fresh: bool = False
    table: str | None = None  # the name FROM gives the dataset, when not its own (one query for several sites)

    @classmethod
    def parse(cls, body: dict[str, Any], max_epsilon: float) -> QueryRequest:
        allowed = {"dataset", "sql", "query", "epsilon", "delta", "bounds", "fresh", "table"}
        unknown = set(body) - allowed
        if unknown:
            raise BadRequest(f"unknown field(s) {sorted(unknown)}; a query takes {sorted(allowed)}")
        dataset = body.get("dataset")
        if not isinstance(dataset, str) or not dataset:
            raise BadRequest("'dataset' is required: the name of the dataset to query")
        if ("sql" in body) == ("query" in body):
            raise BadRequest("send either 'sql' (the SELECT query to run) or 'query' (its description as JSON)")
        table = body.get("table")
        if table is not None and (not isinstance(table, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,99}", table)):
            raise BadRequest("table must be a plain name (letters, digits, _): the name FROM uses for the dataset")
        # a description becomes SQL here, so that both forms go through the one compiler (engine.builder)
        sql = body["sql"] if "sql" in body else description_to_sql(body["query"], table or dataset)
        if not isinstance(sql, str) or not sql.strip():
            raise BadRequest("'sql' is required: the SELECT query to run")
        if "epsilon" not in body:
            raise BadRequest("'epsilon' is required: the privacy budget to spend on this query")
        epsilon = body["epsilon"]
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon):
            raise BadRequest("epsilon must be a number")
        if not 0 < epsilon <= max_epsilon:
            raise BadRequest(f"epsilon must be above 0 and at most {max_epsilon} per query")
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
        return cls(dataset, sql, float(epsilon), float(delta), bounds, fresh, table)

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


def _no_budget(user: UserRecord, dataset: str) -> str:
    if user.role == "admin":  # an admin who just imported a dataset has no grant on it either
        return (f"you have no budget on dataset '{dataset}' yet; as an admin, grant yourself one (the sidebar's "
                f"Grants part, PUT admin/grants, or lomas-admin grant {user.username} {dataset} --epsilon E)")
    return f"you have no budget on dataset '{dataset}'; ask an admin for a grant"


class QueryService:
    """The analyst's side of the service: one instance per service process, shared by all requests."""

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
        free_timeout: float = 20.0,
        backends: engine.BackendSettings | None = None,
        signer: ReceiptSigner | None = None,
    ) -> None:
        self.store = store
        # every answer from the data goes out signed (receipts.py), with this service's key
        self.signer = signer or ReceiptSigner.load_or_create(Path(storage_dir) / KEY_FILE)
        self.backends = backends or engine.BackendSettings()
        self.storage_dir = Path(storage_dir)
        self.pool = pool
        # previews never queue behind running queries: they get their own worker(s)
        self.pricing_pool = pricing_pool or pool
        self.max_epsilon_per_query = max_epsilon_per_query
        self.max_groups = max_groups
        self.instance_id = instance_id  # the service process that holds this service's reservations
        self.padding = padding or TimingPadding()
        # Free requests (previews, dummy queries) cost the service work but no budget: each user runs one at a
        # time (the next waits for it), each is stopped after `free_timeout` seconds, and pricing is bounded
        # by public information (accuracy.SUPPORT_BINS), so no user's free requests hold a worker for long.
        self.free_timeout = free_timeout
        self._free_slots: dict[str, asyncio.Lock] = {}
        # both caches are pure functions of their keys (dataset version included), so never stale
        self._prices: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._specs: OrderedDict[tuple[str, int, str], tuple[Any, Any]] = OrderedDict()
        # a store on the network (PostgreSQL) may wait: its calls on the charged path run off the event loop
        self._offload = bool(getattr(store, "on_network", False))

    async def _call_store(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        if self._offload:
            return await asyncio.to_thread(method, *args, **kwargs)
        return method(*args, **kwargs)

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
            raise NotFound(_no_budget(user, dataset))
        return budget.to_json()

    def archive(self, user: UserRecord, dataset: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        return [r.to_json() for r in self.store.list_releases(user.username, dataset, limit)]

    def _compile(self, request: QueryRequest) -> tuple[DatasetRecord, Any, Any]:
        """The dataset, the compiled spec and the parsed metadata (both cached per dataset version and SQL)."""
        record = self._dataset(request.dataset)
        key = (record.name, record.version, request.sql, request.table)
        cached = self._specs.get(key)
        if cached is None:
            metadata = parse_metadata(record.metadata)
            spec = compile_sql(request.sql, request.table or record.name, metadata, self.max_groups)
            self._specs[key] = cached = (metadata, spec)
            while len(self._specs) > PRICE_CACHE_SIZE:
                self._specs.popitem(last=False)
        metadata, spec = cached
        engine.effective_bounds(metadata, request.bounds)  # refuse bad bounds before any work
        return record, spec, metadata

    def _free_slot(self, user: UserRecord) -> asyncio.Lock:
        return self._free_slots.setdefault(user.username, asyncio.Lock())

    def _require_grant(self, user: UserRecord, record: DatasetRecord) -> None:
        if self.store.get_grant(user.username, record.name) is None:
            raise Forbidden(_no_budget(user, record.name))

    async def _price(self, record: DatasetRecord, spec: Any, request: QueryRequest) -> dict[str, Any]:
        """Noise scale, exact cost and accuracy, computed by a worker from metadata only (and remembered: the
        same query on the same dataset version at the same epsilon always prices the same)."""
        backend = self.backends.choose(record.metadata)
        key = json.dumps([record.name, record.version, spec.canonical(), request.epsilon, request.delta,
                          request.bounds, backend], sort_keys=True)
        if key in self._prices:
            self._prices.move_to_end(key)
            return self._prices[key]
        price = await self.pricing_pool.run(engine.PREVIEW_TASK, spec.to_json(), record.metadata, request.epsilon,
                                            request.delta, request.bounds, backend, timeout=self.free_timeout)
        self._prices[key] = price
        while len(self._prices) > PRICE_CACHE_SIZE:
            self._prices.popitem(last=False)
        return price

    async def preview(self, user: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        request = QueryRequest.parse(body, self.max_epsilon_per_query)
        record, spec, metadata = self._compile(request)
        self._require_grant(user, record)
        async with self._free_slot(user):
            preview = await self._price(record, spec, request)
        budget = self.store.budget(user.username, record.name)
        free = await self._answered_free(user, record, spec, request)
        return {
            **({"answered_free": free} if free else {}),
            "dataset": record.name,
            "dataset_version": record.version,
            "sql": request.sql,
            "columns": [o.name for o in spec.outputs],
            "keys": [o.name for o in spec.outputs if o.key is not None],
            "cost": {"epsilon": preview["epsilon"], "delta": preview["delta"]},
            "requested": {"epsilon": request.epsilon, "delta": request.delta},
            "aggregates": preview["plan"]["aggregates"],
            "plan": preview["plan"],
            "columns_used": spec.columns_used(metadata),
            **({"post_processing": {"applied": list(spec.post), "note": POST_NOTE}} if spec.post else {}),
            "budget": budget.to_json() if budget else None,
            "affordable": bool(
                budget
                and budget.epsilon_spent + preview["epsilon"] <= budget.epsilon_total
                and budget.delta_spent + preview["delta"] <= budget.delta_total
            ),
        }

    async def _earlier_answer(self, user: UserRecord, record: DatasetRecord, spec: Any, request: QueryRequest
                              ) -> tuple[ReleaseRecord, str | None] | None:
        """The release query() hands back free instead of a new one, with the course that shared it (None: the
        user's own). Asking again reveals nothing new; a classmate's release paid from this class's pool is
        post-processing of what the class already paid for."""
        if request.fresh:
            return None
        args = (record.name, record.version, spec.canonical(), request.params())
        earlier = await self._call_store(self.store.find_release, user.username, *args)
        if earlier is not None:
            return earlier, None
        return await self._call_store(self.store.find_class_release, user.username, *args)

    @staticmethod
    def _shared_note(course: str, release: ReleaseRecord) -> str:
        return (f"released to the class {course} on {release.created_at[:10]}: an answer the class already paid "
                "for, free to you")

    async def _answered_free(self, user: UserRecord, record: DatasetRecord, spec: Any, request: QueryRequest
                             ) -> dict[str, Any] | None:
        """The preview's word on a free answer, so that nobody pays for --fresh by accident."""
        found = await self._earlier_answer(user, record, spec, request)
        if found is None:
            return None
        release, course = found
        if course is None:
            return {"release_id": release.id, "released_at": release.created_at,
                    "note": f"you asked this before: your DP release #{release.id} is handed back, free "
                            "(--fresh pays for a new one)"}
        return {"release_id": release.id, "released_at": release.created_at, "course": course,
                "note": f"{self._shared_note(course, release)} (DP release #{release.id}; --fresh pays for your own)"}

    async def _release(self, record: DatasetRecord, spec: Any, request: QueryRequest, price: dict[str, Any],
                       parquet_path: str, timeout: float | None = None, backend: str | None = None
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run the priced query on a parquet file in a worker: (the worker's answer, the answer's public part)."""
        released = await self.pool.run(
            engine.RELEASE_TASK, spec.to_json(), record.metadata, request.bounds, parquet_path, price,
            backend or self.backends.choose(record.metadata), self.backends.spark_remote, timeout=timeout,
        )
        answer = {
            "dataset": record.name,
            "dataset_version": record.version,
            "sql": request.sql,
            "columns": released["columns"],
            "rows": released["rows"],
            "intervals": released["intervals"],
            "keys": released["keys"],
            "statistics": released["statistics"],
            **({"derived": released["derived"]} if "derived" in released else {}),
            "aggregates": released["aggregates"],
            "plan": released["plan"],
            "requested": {"epsilon": request.epsilon, "delta": request.delta},
        }
        return released, answer

    async def query(self, user: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        request = QueryRequest.parse(body, self.max_epsilon_per_query)
        record, spec, _ = self._compile(request)
        found = await self._earlier_answer(user, record, spec, request)
        if found is not None:
            earlier, course = found
            if course is None:
                return await self._from_archive(user, record, request, spec, earlier)
            self._require_grant(user, record)
            return await self._from_archive(user, record, request, spec, earlier, {
                "course": course, "release_id": earlier.id, "released_at": earlier.created_at,
                "note": self._shared_note(course, earlier)})
        self._require_grant(user, record)
        preview = await self._price(record, spec, request)
        data_path = check_data_file(self.storage_dir, record)  # a missing file is the service's fault: free
        started = time.monotonic()
        # Charge what the mechanism costs (its privacy map), not what was asked for.
        reservation = await self._call_store(self.store.reserve, user.username, record.name, preview["epsilon"],
                                             preview["delta"], owner=self.instance_id)
        try:
            released, answer = await self._release(record, spec, request, preview, data_path)
        except LomasError as err:
            if not err.data_accessed:
                self.store.refund(reservation, note=f"refunded: failed before reading the data ({err.code})")
                raise type(err)(f"{err.message}; nothing was charged", **err.details) from None
            # The failure can depend on the data (a time-out on a predicate that matches many rows, say):
            # refunding it would answer a question for free.
            await self._call_store(self.store.commit, reservation,
                                   note=f"charged: failed after reading the data ({err.code})")
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
        try:  # the charge and its answer, together
            archived = await self._call_store(self.store.commit_release, reservation, draft)
        except BaseException:
            # nothing is committed, nothing is released: the reservation goes back (on the loop: a cancelled
            # request must still refund)
            self.store.refund(reservation, note="refunded: the release could not be archived")
            raise
        await self.padding.pad(started)
        budget = await self._call_store(self.store.budget, user.username, record.name)
        return self._signed(user, {
            "release_id": archived.id,
            "created_at": archived.created_at,
            **apply_post(result, spec.post),  # the archive keeps the whole release: later post-processing is free
            "budget": budget.to_json() if budget else None,
            "replay": False,
        })

    async def _from_archive(self, user: UserRecord, record: DatasetRecord, request: QueryRequest, spec: Any,
                            earlier: ReleaseRecord, shared: dict[str, Any] | None = None) -> dict[str, Any]:
        """An archived release handed back for free: the user's own (a replay) or the class's (shared)."""
        budget = await self._call_store(self.store.budget, user.username, record.name)
        return self._signed(user, {
            "release_id": earlier.id,
            "created_at": earlier.created_at,
            **apply_post(earlier.result, spec.post),  # another HAVING/ORDER BY/LIMIT: still free
            "sql": request.sql,
            "cost": {"epsilon": 0.0, "delta": 0.0},
            "replay": True,
            "replay_of": {"release_id": earlier.id, "epsilon": earlier.epsilon, "delta": earlier.delta},
            **({"shared": shared} if shared else {}),
            "budget": budget.to_json() if budget else None,
        })

    def _signed(self, user: UserRecord, answer: dict[str, Any]) -> dict[str, Any]:
        """The answer as it goes out, naming whom it was released to, with the service's receipt for all of it."""
        answer = {**answer, "user": user.username}
        return {**answer, "receipt": self.signer.sign(answer)}

    def receipt_key(self) -> dict[str, str]:
        return self.signer.public_json()

    async def dummy_query(self, user: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        """The same query on dummy rows made from public metadata: free, never archived, clearly labelled."""
        request = QueryRequest.parse(body, self.max_epsilon_per_query)
        record, spec, _ = self._compile(request)
        self._require_grant(user, record)
        async with self._free_slot(user):
            preview = await self._price(record, spec, request)
            path = await asyncio.to_thread(dummy_parquet, self.storage_dir, record)
            # a few public rows on this machine: OpenDP's polars plan, whatever the dataset's own backend
            _, answer = await self._release(record, spec, request, preview, str(path), timeout=self.free_timeout,
                                            backend=engine.POLARS)
        budget = self.store.budget(user.username, record.name)
        return {
            "dummy": True,
            **apply_post(answer, spec.post),
            "cost": {"epsilon": 0.0, "delta": 0.0},
            "would_cost": {"epsilon": preview["epsilon"], "delta": preview["delta"]},
            "budget": budget.to_json() if budget else None,
        }

    def dummy_rows(self, name: str, rows: int) -> dict[str, Any]:
        record = self._dataset(name)
        frame = dummy_frame(parse_metadata(record.metadata), rows, seed=record.version)
        frame = frame.with_columns(pl.col(pl.Date).dt.to_string("%Y-%m-%d"))  # JSON has no dates: ISO text
        return {"dataset": name, "dummy": True, "columns": frame.columns, "rows": frame.to_dicts()}
