"""The `lomas` ExtensionApp: configuration (traitlets), wiring of store, workers and handlers."""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from jupyter_server.extension.application import ExtensionApp
from jupyter_server.serverapp import ServerApp
from jupyter_server.utils import url_path_join
from tornado import httpserver, web
from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.routing import AnyMatches, Rule
from tornado.web import _ApplicationRouter
from traitlets import Bool, Dict, Enum, Float, Integer, List, TraitError, Type, Unicode, default, validate

from .api import API_PREFIX, ROUTES
from .api.forward import ForwardToHubServiceHandler
from .api.identity import LomasTokenIdentityProvider
from .engine.locations import object_store_environment
from .engine.metadata import BackendSettings
from .engine.sql import DEFAULT_MAX_GROUPS
from .engine.workers import WorkerPool, die_with_parent
from .errors import Forbidden
from .paths import default_storage_dir
from .service import DPService, TimingPadding
from .service.recovery import settle_abandoned, this_instance
from .store import AdminStore, SQLStore, UserRecord


class NoSuchEndpointHandler(web.RequestHandler):
    """Every path of a standalone service that is not the DP API: one JSON 404, whatever the method."""

    def prepare(self) -> None:
        self.set_status(404)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": "not_found", "message": "no such endpoint: this service serves only "
                                "its DP API under lomas/api/"}))


def _access_log(handler: web.RequestHandler) -> None:
    """Method, path, status and time only: never a query string, header, token, SQL text or body."""
    status = handler.get_status()
    log = handler.log if hasattr(handler, "log") else logging.getLogger("lomas")  # type: ignore[attr-defined]
    level = logging.DEBUG if status < 400 else logging.INFO
    log.log(level, "%d %s %s %.1fms", status, handler.request.method, handler.request.path,
            1000 * handler.request.request_time())


class CappedHTTPServer(httpserver.HTTPServer):
    """tornado's HTTPServer with a cap on open connections: one over the cap is closed as soon as it is
    accepted, so idle or half-sent requests cannot take every file descriptor (they are also dropped after the
    header and body timeouts)."""

    def initialize(self, *args: Any, max_connections: int = 1000, **kwargs: Any) -> None:  # tornado's constructor
        super().initialize(*args, **kwargs)
        self.max_connections = max_connections

    def handle_stream(self, stream: Any, address: tuple) -> None:
        if len(self._connections) >= self.max_connections:
            stream.close()
            return
        super().handle_stream(stream, address)


def _default_max_connections() -> int:
    """Half the process's file-descriptor limit (the rest: workers, the store, logs), at most 1,000."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return 500
    return max(16, min(1000, soft // 2)) if soft > 0 else 1000


class LomasServiceServerApp(ServerApp):
    """The server behind `jupyter lomas` (and the JupyterHub service): the DP API and nothing else.

    jupyter_server registers contents, files, kernels, login, static, metrics and more before extensions
    load; here every one of those routes is dropped (deny by default), so only routes the lomas extension adds
    afterwards exist. The request body limit is small: queries are short, and an unauthenticated client must
    not make the server buffer hundreds of MB before it is refused.
    """

    default_services = ()

    @default("identity_provider_class")
    def _default_identity_provider_class(self) -> type:
        return LomasTokenIdentityProvider

    header_timeout = Float(
        10.0, help="Seconds a client may take to send a request's headers (also how long an idle connection stays "
        "open); slower connections are closed"
    ).tag(config=True)
    body_timeout = Float(60.0, help="Seconds a client may take to send a request's body").tag(config=True)
    max_connections = Integer(
        help="Open connections the service accepts at once; more are closed on arrival (default: half the "
        "file-descriptor limit, at most 1,000)"
    ).tag(config=True)

    @default("max_connections")
    def _default_max_connections(self) -> int:
        return _default_max_connections()

    def init_httpserver(self) -> None:
        super().init_httpserver()  # binds later, from the event loop, whatever http_server is then
        self._http_server = CappedHTTPServer(
            self.web_app,
            ssl_options=self.ssl_options,
            xheaders=self.trust_xheaders,
            max_body_size=self.max_body_size,
            max_buffer_size=self.max_buffer_size,
            idle_connection_timeout=self.header_timeout,
            body_timeout=self.body_timeout,
            max_connections=self.max_connections,
        )

    @default("max_body_size")
    def _default_max_body_size(self) -> int:
        return 4 * 1024 * 1024

    @default("max_buffer_size")
    def _default_max_buffer_size(self) -> int:
        return 4 * 1024 * 1024

    @default("reraise_server_extension_failures")
    def _default_reraise(self) -> bool:
        # jupyter_server only logs a failed extension and serves on; here that would be a service that answers
        # every request with 404, or one that ignored its configuration. Stop instead, saying why.
        return True

    def init_webapp(self) -> None:
        super().init_webapp()
        app = self.web_app
        # No cookies identify anyone here (tokens come in a header), so tornado's XSRF cookie check has nothing
        # to protect.
        app.settings["xsrf_cookies"] = False
        app.settings["log_function"] = _access_log
        app.settings.pop("static_path", None)
        app.wildcard_router = _ApplicationRouter(app, [(r".*", NoSuchEndpointHandler)])
        app.default_router = _ApplicationRouter(app, [Rule(AnyMatches(), app.wildcard_router)])
        service_routes = getattr(self.identity_provider, "service_routes", None)
        if service_routes is not None:  # under JupyterHub: the OAuth callback and a landing page for browsers
            app.add_handlers(".*$", service_routes(self.base_url))


class LomasApp(ExtensionApp):
    """The DP service: owns datasets, the admin store and the ledger."""

    name = "lomas"
    description = "Differentially private queries over datasets the kernel never sees"
    extension_url = "/lomas/api/whoami"
    load_other_extensions = False  # only for `jupyter lomas`: serve the DP API and nothing else
    serverapp_class = LomasServiceServerApp
    aliases = {
        **ExtensionApp.aliases,
        "storage-dir": "LomasApp.storage_dir",
        "db-url": "LomasApp.db_url",
        "workers": "LomasApp.workers",
        "query-timeout": "LomasApp.query_timeout",
        "max-epsilon-per-query": "LomasApp.max_epsilon_per_query",
        "max-groups": "LomasApp.max_groups",
        "timing-padding": "LomasApp.timing_padding",
        "identity-mode": "LomasApp.identity_mode",
        "ip": "ServerApp.ip",
        "port": "ServerApp.port",
    }
    examples = """
    jupyter lomas --storage-dir /srv/lomas --port 8890     # the DP API only, tokens from lomas-admin
    lomas-admin --storage-dir /srv/lomas user add boss --role admin && \\
        lomas-admin --storage-dir /srv/lomas token issue boss
    jupyter lomas --help-all                               # every option, including Jupyter Server's
    """

    @default("open_browser")
    def _default_open_browser(self) -> bool:
        return False  # a DP API has no page to open (a trait, so `--no-browser` still configures it quietly)

    receipt_key_file = Unicode(
        help="The Ed25519 private key (PEM) that signs release receipts; made at first start if missing. Default: "
        "receipt-signing-key.pem in storage_dir. Replicas must all point at the same key",
    ).tag(config=True)
    storage_dir = Unicode(help="Folder for the admin store and the service's parquet copies of datasets").tag(
        config=True
    )
    store_class = Type(SQLStore, klass=AdminStore, help="AdminStore implementation").tag(config=True)
    db_url = Unicode(
        help="The store's database: a SQLite file (default: lomas.sqlite3 in storage_dir, or $LOMAS_DB_URL) or "
        "postgresql+psycopg://user@host/lomas, which several replicas of the service may share. Put a password in "
        "~/.pgpass or PGPASSWORD rather than here: it is never logged, but config files are often readable",
    ).tag(config=True)
    upgrade_db = Bool(
        False,
        help="Upgrade an older PostgreSQL schema at start (back it up first; `lomas-admin db upgrade` does the "
        "same by hand). A SQLite store is always upgraded, after a copy is kept beside it",
    ).tag(config=True)
    dataset_url = Unicode(
        None, allow_none=True,
        help="Write imported datasets under this object-store prefix (s3://bucket/prefix) instead of storage_dir. "
        "Several replicas need one place for datasets: a bucket, or a storage_dir they all mount",
    ).tag(config=True)
    embedded_from_rows = Integer(
        50_000_000,
        help="Datasets whose public max_rows is at least this run on the embedded out-of-core engine (DuckDB: an "
        "exact stage, then OpenDP's noise in the worker) unless their metadata names a backend; smaller ones on "
        "OpenDP's polars plan. 0: never by size",
    ).tag(config=True)
    spark_remote = Unicode(
        None, allow_none=True,
        help="The Spark cluster for datasets whose metadata says backend: spark. A master URL (spark://host:7077) "
        "runs a driver in each worker, or sc://host:15002 for Spark Connect. The cluster computes the exact "
        "stage only; the noise is added in the service",
    ).tag(config=True)
    object_store = Dict(
        per_key_traits={},
        help="Endpoint and credentials of the object store that holds datasets: endpoint_url, access_key_id, "
        "secret_access_key, session_token, region, allow_http. Given to the service's workers as AWS_* "
        "environment variables, never stored, logged or put in a plan. Better: set AWS_ENDPOINT_URL, "
        "AWS_ACCESS_KEY_ID, ... in the service's environment, or use the instance's role",
    ).tag(config=True)
    workers = Integer(help="Worker processes that run OpenDP").tag(config=True)
    query_timeout = Float(
        120.0,
        help="Seconds a query may run before it is stopped. A query stopped after it started reading the data is "
        "charged (its time-out can depend on the data); one stopped before is refunded",
    ).tag(config=True)
    free_timeout = Float(
        20.0,
        help="Seconds a free request (a preview's pricing, a dummy query) may hold a worker; each user runs one "
        "free request at a time",
    ).tag(config=True)
    pricing_workers = Integer(
        1, help="Worker processes that only price queries (previews), so previews never wait behind queries"
    ).tag(config=True)
    memory_share = Float(
        0.75, help="Share of the machine's memory that all workers together may use (query and pricing workers)"
    ).tag(config=True)
    pricing_memory_mb = Integer(
        1024, help="Resident memory (MB) each pricing worker may use (pricing reads metadata only)"
    ).tag(config=True)
    worker_memory_mb = Integer(
        help="Resident memory (MB) each query worker may use; the parent process kills a worker that goes over "
        "(0: no limit). Default: `memory_share` of the machine, less the pricing workers' limits, shared "
        "among the query workers (a 100M-row grouped mean needs about 7 GB)"
    ).tag(config=True)
    max_groups = Integer(
        DEFAULT_MAX_GROUPS,
        help="Most groups one query may release (the product of its GROUP BY columns' public category counts); "
        "larger queries are refused before any work",
    ).tag(config=True)
    timing_padding = Enum(
        ["off", "stall", "jitter"],
        "off",
        help="Pad the response time of answers computed from the data. stall: never answer sooner than "
        "`timing_padding_seconds` (every query takes at least that long); jitter: add a random delay of up to "
        "`timing_padding_seconds` (half of it on average)",
    ).tag(config=True)
    timing_padding_seconds = Float(1.0, help="Seconds used by `timing_padding`").tag(config=True)
    instance_stale_after = Float(
        120.0,
        help="Seconds without a heartbeat after which a service replica on another machine counts as dead, so "
        "that another replica refunds the reservations it left (on this machine death is checked directly)",
    ).tag(config=True)
    max_epsilon_per_query = Float(10.0, help="Largest epsilon one query may ask for").tag(config=True)
    max_upload_bytes = Integer(
        2 * 1024**3, help="Largest CSV or Parquet file an admin may upload (sent in chunks of 2 MiB)"
    ).tag(config=True)
    identity_mode = Enum(
        ["auto", "local", "token", "hub"],
        "auto",
        help="local: every user of this Jupyter server is `local_username` (admin); token: lomas API tokens; "
        "hub: JupyterHub users (set by `lomas-hub-service`); auto: token when the server authenticates lomas "
        "tokens, else local",
    ).tag(config=True)
    embed_under_hub = Bool(
        False,
        help="Run the embedded service in a JupyterHub single-user server too. Off by default: under a Hub the DP "
        "service is the Hub service, and a student's own server must offer no path around it",
    ).tag(config=True)
    local_username = Unicode(help="The lomas user that the owner of an embedding Jupyter server is").tag(
        config=True
    )
    import_dirs = List(
        Unicode(),
        default_value=None,
        allow_none=True,
        help="Folders an admin's API import or metadata draft may read a file from by `path` (the storage folder "
        "never). Default: none for a standalone or Hub service (admins upload, or use lomas-admin on the "
        "service's machine); the Jupyter server's root folder for an embedded one, whose owner can read it anyway",
    ).tag(config=True)
    demo = Bool(False, help="Load the penguins demo dataset and grant the local user a budget at start").tag(
        config=True
    )
    demo_epsilon = Float(10.0, help="Epsilon granted to the local user on the demo dataset").tag(config=True)

    @default("storage_dir")
    def _default_storage_dir(self) -> str:
        return default_storage_dir()

    @validate("object_store")
    def _valid_object_store(self, proposal: Any) -> dict[str, str]:
        try:
            object_store_environment(proposal["value"])
        except ValueError as err:
            raise TraitError(str(err)) from None
        return proposal["value"]

    @default("db_url")
    def _default_db_url(self) -> str:
        return os.environ.get("LOMAS_DB_URL") or str(Path(self.storage_dir) / "lomas.sqlite3")

    @default("workers")
    def _default_workers(self) -> int:
        return os.cpu_count() or 1

    @default("worker_memory_mb")
    def _default_worker_memory_mb(self) -> int:
        try:
            total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
        except (ValueError, OSError):
            return 0
        shared = total_mb * self.memory_share - self.pricing_workers * self.pricing_memory_mb
        return max(int(shared / self.workers), 256)

    @default("local_username")
    def _default_local_username(self) -> str:
        try:
            return getpass.getuser()
        except Exception:
            return "owner"

    @property
    def disabled_under_hub(self) -> bool:
        """An embedded service inside a JupyterHub single-user server: the class's service is the Hub's."""
        return (self.effective_identity_mode == "local" and "JUPYTERHUB_API_TOKEN" in os.environ
                and not self.embed_under_hub)

    def initialize_settings(self) -> None:
        if self.disabled_under_hub:
            self.log.info("lomas: not started in this JupyterHub server; kernels and the sidebar use the Hub service")
            return
        # before any worker starts: they inherit it (polars reads AWS_* itself; nothing reaches a plan)
        os.environ.update(object_store_environment(self.object_store))
        store = self.store_class(self.db_url, upgrade=self.upgrade_db or None)
        worker_log = str(Path(self.storage_dir) / "logs" / "workers.log")
        pool = WorkerPool(self.workers, self.query_timeout, self.worker_memory_mb, worker_log)
        pricing_pool = WorkerPool(self.pricing_workers, self.query_timeout, self.pricing_memory_mb, worker_log)
        # listen first: the workers start once the event loop runs, after the port is bound, so a health check
        # (the Hub's, at start-up) is answered while they import OpenDP
        IOLoop.current().add_callback(pool.warm_up)
        IOLoop.current().add_callback(pricing_pool.warm_up)
        self.instance = this_instance()
        store.register_instance(self.instance)
        settled = settle_abandoned(store, self.instance, self.instance_stale_after, at_start=True)
        if settled:
            self.log.warning("lomas: refunded %d reservation(s) that a stopped service left unsettled", settled)
        self.service = DPService(
            store,
            self.storage_dir,
            pool,
            self.max_epsilon_per_query,
            pricing_pool,
            max_groups=self.max_groups,
            instance_id=self.instance.id,
            padding=TimingPadding(self.timing_padding, self.timing_padding_seconds),
            protect_admin_access=self.effective_identity_mode == "token",
            max_upload_bytes=self.max_upload_bytes,
            import_dirs=self._import_dirs(),
            free_timeout=self.free_timeout,
            dataset_url=self.dataset_url,
            backends=BackendSettings(self.embedded_from_rows, self.spark_remote),
            receipt_key_file=self.receipt_key_file or None,
        )
        self.settings["lomas_service"] = self.service
        self._heartbeat = PeriodicCallback(self._beat, max(self.instance_stale_after / 4, 1.0) * 1000)
        self._heartbeat.start()
        if self.demo:
            from .demo import setup_demo

            setup_demo(self.service.store, self.storage_dir, self.local_username, self.demo_epsilon)
        self.log.info("lomas: DP service ready (%s identity)", self.effective_identity_mode)

    def _import_dirs(self) -> list[str]:
        if self.import_dirs is not None:
            return list(self.import_dirs)
        return [self.serverapp.root_dir] if self.effective_identity_mode == "local" else []

    async def _beat(self) -> None:
        """Say this instance is alive, and settle what dead replicas left (off the event loop: SQLite may wait
        for another process's write)."""
        store, me = self.service.store, self.instance
        try:
            await asyncio.to_thread(store.heartbeat, me.id)
            settled = await asyncio.to_thread(settle_abandoned, store, me, self.instance_stale_after)
        except Exception:
            self.log.warning("lomas: heartbeat failed", exc_info=True)
            return
        if settled:
            self.log.warning("lomas: refunded %d reservation(s) that a stopped replica left unsettled", settled)

    def initialize_handlers(self) -> None:
        if self.disabled_under_hub:  # the sidebar's calls go on to the Hub's service, as this server's user
            self.handlers.append((url_path_join("/", API_PREFIX, "(?P<path>.*)"), ForwardToHubServiceHandler))
            return
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
        if self.effective_identity_mode == "hub":
            return current_user.lomas_record  # resolved, with the Hub's groups and scopes, by the identity provider
        if self.effective_identity_mode == "local":
            token_user = getattr(current_user, "lomas_username", "")
            if not token_user:  # the server's owner
                return self.service.admin.ensure_user(self.local_username, "admin")
            record = self.service.store.get_user(token_user)  # a lomas token's own user, never the owner
            if record is None:
                raise Forbidden("unknown user")
            return record
        record = self.service.store.get_user(current_user.username)
        if record is None:
            raise Forbidden("unknown user")
        return record

    async def stop_extension(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            self._heartbeat.stop()
            service.pool.close()
            service.pricing_pool.close()
            service.store.retire_instance(self.instance.id, "refunded: the service was stopped during the query")
            service.store.close()


main = launch_new_instance = LomasApp.launch_instance


def _stop_with_the_hub() -> None:
    """The Hub started this process: if the Hub dies (a failed start, a kill -9), the service must not live on
    without it. SIGTERM then: a clean stop, reservations refunded."""
    die_with_parent(signal.SIGTERM)


def hub_service() -> None:
    """`lomas-hub-service`: the command a Hub runs. The Hub's environment says where to listen."""
    os.umask(0o077)  # the store, the parquet copies and the logs are the service user's alone
    _stop_with_the_hub()
    url = urlparse(os.environ["JUPYTERHUB_SERVICE_URL"])
    argv = [
        f"--ServerApp.ip={url.hostname}",
        f"--ServerApp.port={url.port}",
        f"--ServerApp.base_url={os.environ['JUPYTERHUB_SERVICE_PREFIX']}",
        "--ServerApp.identity_provider_class=lomas_jupyter_server.hub.LomasHubIdentityProvider",
        "--LomasApp.identity_mode=hub",
    ]
    if os.geteuid() == 0:
        argv.append("--ServerApp.allow_root=True")  # discouraged: run the service as its own OS user
    LomasApp.launch_instance(argv=argv + sys.argv[1:])

