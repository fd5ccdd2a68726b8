"""The `lomas` ExtensionApp: configuration (traitlets), wiring of store, workers and handlers."""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_data_dir
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.serverapp import ServerApp
from jupyter_server.utils import url_path_join
from traitlets import Bool, Enum, Float, Integer, Type, Unicode, default

from .errors import Forbidden
from .handlers import API_PREFIX, ROUTES
from .identity import LomasTokenIdentityProvider
from .service import DPService
from .store import AdminStore, SQLiteStore, UserRecord
from .workers import WorkerPool


def default_storage_dir() -> str:
    return os.environ.get("LOMAS_STORAGE_DIR") or str(Path(jupyter_data_dir()) / "lomas")


class LomasServiceServerApp(ServerApp):
    """The server behind `jupyter lomas`: only the DP API, no contents, kernels or terminals."""

    default_services = ("api", "auth", "security")

    @default("identity_provider_class")
    def _default_identity_provider_class(self) -> type:
        return LomasTokenIdentityProvider

    def init_webapp(self) -> None:
        super().init_webapp()
        # tornado's own XSRF check runs before jupyter_server's prepare() knows the request carries a token;
        # jupyter_server still checks XSRF for cookie-authenticated requests.
        self.web_app.settings["xsrf_cookies"] = False


class LomasApp(ExtensionApp):
    """The DP service: owns datasets, the admin store and the ledger."""

    name = "lomas"
    description = "Differentially private queries over datasets the kernel never sees"
    extension_url = "/lomas/api/whoami"
    load_other_extensions = False  # only for `jupyter lomas`: serve the DP API and nothing else
    open_browser = False
    serverapp_class = LomasServiceServerApp

    storage_dir = Unicode(help="Folder for the admin store and the service's parquet copies of datasets").tag(
        config=True
    )
    store_class = Type(SQLiteStore, klass=AdminStore, help="AdminStore implementation").tag(config=True)
    store_url = Unicode(help="Where the store lives (a SQLite file path by default)").tag(config=True)
    workers = Integer(help="Worker processes that run OpenDP").tag(config=True)
    query_timeout = Float(120.0, help="Seconds a query may run before it is stopped (and refunded)").tag(
        config=True
    )
    pricing_workers = Integer(
        1, help="Worker processes that only price queries (previews), so previews never wait behind queries"
    ).tag(config=True)
    worker_memory_mb = Integer(
        help="Resident memory (MB) a worker may use; a query that needs more is stopped and refunded (0: no limit). "
        "Default: three quarters of the machine's memory shared among the query workers (a 100M-row grouped "
        "mean needs about 7 GB)"
    ).tag(config=True)
    max_epsilon_per_query = Float(10.0, help="Largest epsilon one query may ask for").tag(config=True)
    identity_mode = Enum(
        ["auto", "local", "token"],
        "auto",
        help="local: every user of this Jupyter server is `local_username` (admin); token: lomas API tokens; "
        "auto: token when the server authenticates lomas tokens, else local",
    ).tag(config=True)
    local_username = Unicode(help="The lomas user that the owner of an embedding Jupyter server is").tag(
        config=True
    )
    demo = Bool(False, help="Load the penguins demo dataset and grant the local user a budget at start").tag(
        config=True
    )
    demo_epsilon = Float(10.0, help="Epsilon granted to the local user on the demo dataset").tag(config=True)

    @default("storage_dir")
    def _default_storage_dir(self) -> str:
        return default_storage_dir()

    @default("store_url")
    def _default_store_url(self) -> str:
        return str(Path(self.storage_dir) / "lomas.sqlite3")

    @default("workers")
    def _default_workers(self) -> int:
        return os.cpu_count() or 1

    @default("worker_memory_mb")
    def _default_worker_memory_mb(self) -> int:
        try:
            total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
        except (ValueError, OSError):
            return 0
        return int(total_mb * 0.75 / self.workers)  # pricing workers never touch data

    @default("local_username")
    def _default_local_username(self) -> str:
        try:
            return getpass.getuser()
        except Exception:
            return "owner"

    def initialize_settings(self) -> None:
        store = self.store_class(self.store_url)
        pool = WorkerPool(self.workers, self.query_timeout, self.worker_memory_mb)
        pricing_pool = WorkerPool(self.pricing_workers, self.query_timeout, self.worker_memory_mb)
        pool.warm_up()
        pricing_pool.warm_up()
        self.service = DPService(store, self.storage_dir, pool, self.max_epsilon_per_query, pricing_pool)
        self.settings["lomas_service"] = self.service
        if self.demo:
            from .demo import setup_demo

            setup_demo(self.service.store, self.storage_dir, self.local_username, self.demo_epsilon)
        self.log.info("lomas: DP service ready (%s identity)", self.effective_identity_mode)

    def initialize_handlers(self) -> None:
        for route, handler in ROUTES:
            self.handlers.append((url_path_join("/", API_PREFIX, route), handler))

    @property
    def effective_identity_mode(self) -> str:
        if self.identity_mode != "auto":
            return self.identity_mode
        provider = getattr(self.serverapp, "identity_provider", None)
        return "token" if isinstance(provider, LomasTokenIdentityProvider) else "local"

    def resolve_user(self, current_user: Any) -> UserRecord:
        """The lomas user behind an authenticated Jupyter user."""
        if self.effective_identity_mode == "local":
            return self.service.ensure_user(self.local_username, "admin")
        record = self.service.store.get_user(current_user.username)
        if record is None:
            raise Forbidden("unknown user")
        return record

    async def stop_extension(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.pool.close()
            service.pricing_pool.close()
            service.store.close()


main = launch_new_instance = LomasApp.launch_instance
