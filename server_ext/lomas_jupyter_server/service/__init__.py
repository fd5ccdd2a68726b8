"""The domain room: what the DP service does, without HTTP. One class per concern (queries, admin, courses,
budget requests, datasets), plus dataset import, uploads and crash recovery; `DPService` holds one of each for a
service process.

May import: `engine`, `store`, `errors`, `receipts` (never `api` or `hub`). Everything here is testable without a server.
"""

from __future__ import annotations

from pathlib import Path

from ..engine.metadata import BackendSettings
from ..engine.sql import DEFAULT_MAX_GROUPS
from ..engine.workers import WorkerPool
from ..receipts import KEY_FILE, ReceiptSigner
from ..store import AdminStore
from .admin import AdminService, require_admin
from .courses import CourseService
from .datasets import DatasetAdmin
from .queries import QueryRequest, QueryService, TimingPadding
from .requests import BudgetRequestService

__all__ = ["AdminService", "BudgetRequestService", "CourseService", "DPService", "DatasetAdmin", "QueryRequest", "QueryService",
           "ReceiptSigner", "TimingPadding", "require_admin"]


class DPService:
    """The service's parts for one process, wired from one configuration (app.py passes its traits)."""

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
        dataset_url: str | None = None,
        backends: BackendSettings | None = None,
        receipt_key_file: str | Path | None = None,
    ) -> None:
        self.store = store
        self.pool = pool
        self.pricing_pool = pricing_pool or pool
        self.queries = QueryService(store, storage_dir, pool, max_epsilon_per_query, self.pricing_pool, max_groups,
                                    instance_id, padding, free_timeout, backends,
                                    ReceiptSigner.load_or_create(receipt_key_file or Path(storage_dir) / KEY_FILE))
        self.admin = AdminService(store, protect_admin_access)
        self.courses = CourseService(store)
        self.requests = BudgetRequestService(store)
        self.datasets = DatasetAdmin(store, storage_dir, self.pricing_pool, max_upload_bytes, import_dirs,
                                     dataset_url)
