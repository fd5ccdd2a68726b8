"""The kernel's only way to the DP service: HTTP with a token. It never imports server code and never
receives a row of private data."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import requests
import yaml

from . import federation
from .builder import Query
from .charts import Chart, plot_spec
from .errors import LomasError
from .federation import FederatedPreview, FederatedRelease
from .sites import Sites

API = "lomas/api/"

# Everything in this kernel that shows budgets (the magics' panel) hears of every release any Client here makes.
_RELEASE_LISTENERS: list[Callable[[Release], None]] = []


def on_release(listener: Callable[[Release], None]) -> None:
    """Call `listener(release)` after every charged release made from this process."""
    _RELEASE_LISTENERS.append(listener)


def _announce(release: Release) -> None:
    for listener in list(_RELEASE_LISTENERS):
        try:
            listener(release)
        except Exception:  # noqa: BLE001 - a display hook must never break a query
            pass


@dataclass(frozen=True)
class Connection:
    url: str  # base URL of the server, ending with "/"
    token: str
    source: str  # how it was found, for `%lomas status`


def discover() -> Connection:
    """Find the service: LOMAS_URL (with LOMAS_TOKEN, or under JupyterHub the server's own Hub token), then the
    local Jupyter server that started this kernel."""
    hub_token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if os.environ.get("LOMAS_URL"):
        url = os.environ["LOMAS_URL"].rstrip("/") + "/"
        if os.environ.get("LOMAS_TOKEN"):
            return Connection(url, os.environ["LOMAS_TOKEN"], "LOMAS_URL")
        return Connection(url, hub_token, "JupyterHub" if hub_token else "LOMAS_URL")
    if hub_token:
        raise LomasError(
            "no DP service found: under JupyterHub the service is a Hub service, and this Hub sets no LOMAS_URL "
            "(ask the Hub's admin to add it with lomas_jupyter_server.hub.configure_hub, or use %lomas connect URL)"
        )
    try:
        from jupyter_server.serverapp import list_running_servers

        servers = list(list_running_servers())
    except Exception:
        servers = []
    parent = os.environ.get("JPY_PARENT_PID")
    for server in servers:
        if parent and str(server.get("pid")) == parent:
            return Connection(server["url"], server.get("token", ""), "the Jupyter server running this kernel")
    if len(servers) == 1 and not parent:
        return Connection(servers[0]["url"], servers[0].get("token", ""), "the only running Jupyter server")
    raise LomasError(
        "no DP service found: run this in JupyterLab with lomas-jupyter installed, "
        "or set LOMAS_URL and LOMAS_TOKEN (or use %lomas connect URL)"
    )


@dataclass
class Release:
    """A DP answer: values, their 95% intervals, and what it cost."""

    dataset: str
    sql: str
    columns: list[str]
    rows: list[dict[str, Any]]
    intervals: list[dict[str, Any]]
    aggregates: list[dict[str, Any]]
    cost: dict[str, float]
    budget: dict[str, Any] | None = None
    release_id: int | None = None
    dummy: bool = False
    replay: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Release:
        return cls(doc["dataset"], doc["sql"], doc["columns"], doc["rows"], doc["intervals"], doc["aggregates"],
                   doc["cost"], doc.get("budget"), doc.get("release_id"), bool(doc.get("dummy")), bool(doc.get("replay")), doc)

    @property
    def df(self) -> pl.DataFrame:
        return pl.DataFrame(self.rows, schema=self.columns, orient="row") if self.rows else pl.DataFrame(
            schema=self.columns)

    @property
    def receipt(self) -> dict[str, Any] | None:
        """The service's signature over this answer (lomas_jupyter.receipts.check verifies it; None: dummy)."""
        return self.raw.get("receipt")

    @property
    def covers(self) -> dict[str, str]:
        """Per aggregate column, what its interval is about (clipping to the bounds, nulls, quantile ranks)."""
        return {a["name"]: a["covers"] for a in self.aggregates if a.get("covers")}

    @property
    def plan(self) -> dict[str, Any]:
        """The noisy statistics released (each once), the mechanism and why it was chosen."""
        return self.raw.get("plan") or {}

    def plot(self, column: str | None = None) -> Any:
        """The values with their 95% intervals as error bars, one per group, labelled "DP estimate" (a Vega-Lite
        chart, which JupyterLab renders natively). `column`: which aggregate (default: the first with
        intervals)."""
        return Chart(plot_spec(self, column), f"{self.dataset}: DP estimates with 95% intervals")

    def with_intervals(self) -> pl.DataFrame:
        """Each aggregate followed by `<name>_low` and `<name>_high`: its 95% interval, of what `covers` says
        (values clipped to the bounds, nulls ignored); null for quantiles, whose statement is in ranks."""
        out: list[dict[str, Any]] = []
        for row, interval in zip(self.rows, self.intervals):
            record: dict[str, Any] = {}
            for name in self.columns:
                record[name] = row[name]
                if name in interval:
                    bounds = interval[name]
                    record[f"{name}_low"] = bounds[0] if bounds else None
                    record[f"{name}_high"] = bounds[1] if bounds else None
            out.append(record)
        return pl.DataFrame(out)


class Client:
    """Plain Python API over the DP service's REST API."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 300.0) -> None:
        if url is None:
            self.connection = discover()
        else:
            self.connection = Connection(url.rstrip("/") + "/", token or "", "explicit URL")
        self.timeout = timeout
        self.session = requests.Session()
        if self.connection.token:
            self.session.headers["Authorization"] = f"token {self.connection.token}"

    # --- transport ---------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None, **params: Any) -> Any:
        url = self.connection.url + API + path
        sent: dict[str, Any] = {"json": body} if raw is None else {
            "data": raw, "headers": {"Content-Type": "application/octet-stream"}}
        try:
            response = self.session.request(
                method, url, params={k: v for k, v in params.items() if v is not None}, timeout=self.timeout, **sent
            )
        except requests.RequestException:
            raise LomasError(f"the DP service at {self.connection.url} is unreachable") from None
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code >= 400:
            if isinstance(payload, dict) and "message" in payload:
                details = {k: v for k, v in payload.items() if k not in ("message", "error")}
                raise LomasError(payload["message"], response.status_code, payload.get("error"), details)
            raise LomasError(f"the DP service answered HTTP {response.status_code}", response.status_code)
        return payload

    # --- analyst -----------------------------------------------------------------------------------------

    def whoami(self) -> dict[str, Any]:
        return self._call("GET", "whoami")

    def datasets(self) -> list[dict[str, Any]]:
        return self._call("GET", "datasets")

    def describe(self, dataset: str) -> dict[str, Any]:
        return self._call("GET", f"datasets/{dataset}")

    def table(self, dataset: str) -> Query:
        """A query on `dataset` in the polars-shaped builder: `.filter(...)`, `.group_by(...)`, `.agg(...)`."""
        return Query(self, dataset)

    def preview(self, dataset: str, sql: str | None = None, epsilon: float | None = None, delta: float = 0.0,
                bounds: dict[str, list[float]] | None = None, *, query: dict[str, Any] | None = None,
                table: str | None = None) -> dict[str, Any]:
        """Free: what the query would cost and how accurate it would be. `sql`, or a builder's `query`;
        `table`: the name the query's FROM uses, when it is not the dataset's (several sites)."""
        return self._call("POST", "preview", _query_body(dataset, sql, query, epsilon, delta, bounds, table))

    def query(self, dataset: str, sql: str | None = None, epsilon: float | None = None, delta: float = 0.0,
              bounds: dict[str, list[float]] | None = None, dummy: bool = False, fresh: bool = False, *,
              query: dict[str, Any] | None = None, table: str | None = None) -> Release:
        """A DP release, charged. Asking the same again returns the earlier release for free (a replay) unless
        `fresh=True`. With `dummy=True`: the same query on dummy rows, free and labelled. `sql`, or a builder's
        `query` (its description)."""
        body = _query_body(dataset, sql, query, epsilon, delta, bounds, table)
        if fresh and not dummy:
            body["fresh"] = True
        release = Release.from_json(self._call("POST", "dummy" if dummy else "query", body))
        if not dummy:
            _announce(release)
        return release

    # --- several sites -----------------------------------------------------------------------------------

    @property
    def sites(self) -> Sites:
        """The DP services this kernel's analyst has accounts on (shared by every Client and the magics)."""
        return SITES

    def federated(self, dataset: str, sql: str | None = None, epsilon: float | None = None, delta: float = 0.0, *,
                  sites: list[str] | None = None, allow_partial: bool = False, fresh: bool = False,
                  preview: bool = False, query: dict[str, Any] | Query | None = None
                  ) -> FederatedRelease | FederatedPreview:
        """Ask the same question of several sites (default: all registered): each prices, charges and releases
        on its own budget; the answer combines them (counts and sums add, AVG pools sum and count) with 95%
        intervals from the sites' noise. If any site would refuse, nothing is spent anywhere unless
        `allow_partial`. `preview=True`: the cost at each site and the combined accuracy, free."""
        return federated(dataset, sql, epsilon, delta, sites=sites, allow_partial=allow_partial, fresh=fresh,
                         preview=preview, query=query)

    def dummy_rows(self, dataset: str, rows: int = 100) -> pl.DataFrame:
        """Rows made from public metadata only: the shape of the data, none of its content."""
        doc = self._call("GET", f"datasets/{dataset}/dummy", rows=rows)
        return pl.DataFrame(doc["rows"], schema=doc["columns"], orient="row") if doc["rows"] else pl.DataFrame()

    def budget(self, dataset: str | None = None) -> Any:
        return self._call("GET", f"budget/{dataset}" if dataset else "budget")

    def archive(self, dataset: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        return self._call("GET", "archive", dataset=dataset, limit=limit)

    # --- admin -------------------------------------------------------------------------------------------

    def create_user(self, username: str, role: str = "analyst") -> dict[str, Any]:
        return self._call("POST", "admin/users", {"username": username, "role": role})

    def users(self) -> list[dict[str, Any]]:
        return self._call("GET", "admin/users")

    def issue_token(self, username: str, label: str = "") -> str:
        return self._call("POST", f"admin/users/{username}/tokens", {"label": label})["token"]

    # --- budget requests -------------------------------------------------------------------------------

    def request_budget(self, dataset: str, epsilon: float, reason: str, delta: float = 0.0) -> dict[str, Any]:
        """Ask for more budget on `dataset`; an admin (your instructor) approves all or part, or declines."""
        return self._call("POST", "requests", {"dataset": dataset, "epsilon": epsilon, "delta": delta,
                                               "reason": reason})

    def my_requests(self) -> list[dict[str, Any]]:
        """Your budget requests, newest first, with their decisions."""
        return self._call("GET", "requests")

    def budget_requests(self, status: str | None = "pending") -> list[dict[str, Any]]:
        """Everyone's budget requests (admin); pending ones by default, `None` for all."""
        return self._call("GET", "admin/requests" + (f"?status={status}" if status else ""))

    def decide_request(self, request_id: int, approve: bool, epsilon: float | None = None, note: str = "",
                       raise_cap: bool = False) -> dict[str, Any]:
        """Approve (all, or `epsilon` of it) or decline a request (admin); `raise_cap` lifts the class cap just
        enough for the approval."""
        body: dict[str, Any] = {"decision": "approve" if approve else "decline", "note": note,
                                "raise_cap": raise_cap}
        if epsilon is not None:
            body["epsilon"] = epsilon
        return self._call("POST", f"admin/requests/{request_id}", body)

    def grant(self, username: str, dataset: str, epsilon: float, delta: float = 0.0) -> dict[str, Any]:
        return self._call("PUT", "admin/grants", {"username": username, "dataset": dataset, "epsilon": epsilon,
                                                  "delta": delta})

    def grants(self, username: str | None = None) -> list[dict[str, Any]]:
        return self._call("GET", "admin/grants", username=username)

    def upload(self, data: str | Path | bytes, fmt: str | None = None) -> str:
        """Send a CSV or Parquet file in chunks (a service's request bodies are small); returns the upload id."""
        if not isinstance(data, bytes):
            fmt = fmt or Path(data).suffix.lower().lstrip(".")
            data = Path(data).read_bytes()
        upload = self._call("POST", "admin/uploads", {"size": len(data), "format": fmt})
        step = upload["chunk_bytes"]
        for offset in range(0, len(data), step):
            self._call("PUT", f"admin/uploads/{upload['upload']}", raw=data[offset:offset + step], offset=offset)
        return upload["upload"]

    def draft_metadata(self, data: str | Path | bytes, fmt: str | None = None) -> dict[str, Any]:
        """Metadata proposed from the data, with a review note for each choice: review it before importing."""
        upload = self.upload(data, fmt)
        try:
            return self._call("POST", "admin/datasets/draft", {"upload": upload})
        finally:
            self._call("DELETE", f"admin/uploads/{upload}")

    def import_dataset(self, name: str, data: str | Path | bytes, metadata: dict[str, Any] | str | Path,
                       description: str | None = None, fmt: str | None = None) -> dict[str, Any]:
        """Upload CSV or Parquet with its public metadata (a dict, or a YAML/JSON file)."""
        if isinstance(metadata, (str, Path)):
            metadata = yaml.safe_load(Path(metadata).read_text())
        upload = self.upload(data, fmt)
        body: dict[str, Any] = {"name": name, "metadata": metadata, "upload": upload}
        if description is not None:
            body["description"] = description
        try:
            return self._call("POST", "admin/datasets", body)
        except LomasError:
            self._call("DELETE", f"admin/uploads/{upload}")
            raise

    def all_releases(self, username: str | None = None, dataset: str | None = None) -> list[dict[str, Any]]:
        return self._call("GET", "admin/archive", username=username, dataset=dataset)

    def ledger(self, username: str | None = None) -> list[dict[str, Any]]:
        return self._call("GET", "admin/ledger", username=username)

    # --- courses (instructors) ----------------------------------------------------------------------------

    def courses(self) -> list[dict[str, Any]]:
        return self._call("GET", "admin/courses")

    def course(self, name: str) -> dict[str, Any]:
        """One course: its students, datasets and caps (and under JupyterHub who has not started yet)."""
        return self._call("GET", f"admin/courses/{name}")

    def create_course(self, name: str, hub_group: str) -> dict[str, Any]:
        """A course whose students are the members of a JupyterHub group."""
        return self._call("POST", "admin/courses", {"name": name, "hub_group": hub_group})

    def course_dataset(self, course: str, dataset: str, epsilon_per_student: float, epsilon_cap: float,
                       delta_per_student: float = 0.0, delta_cap: float = 0.0) -> dict[str, Any]:
        """Attach a dataset (or top it up): each student's grant and the class-wide cap."""
        return self._call("PUT", f"admin/courses/{course}/datasets", {
            "dataset": dataset, "epsilon_per_student": epsilon_per_student, "epsilon_cap": epsilon_cap,
            "delta_per_student": delta_per_student, "delta_cap": delta_cap})

    def share_answers(self, course: str, share: bool = True) -> dict[str, Any]:
        """Shared answers for a course (off by default): a question a classmate already paid for from the class's
        pool is answered again, free, to the others."""
        return self._call("PATCH", f"admin/courses/{course}", {"share_answers": share})

    def class_spending(self, course: str, dataset: str) -> dict[str, Any]:
        return self._call("GET", f"admin/courses/{course}/spending/{dataset}")


SITES = Sites(Client)  # one list per kernel: the magics and every Client share it


def federated(dataset: str, sql: str | None = None, epsilon: float | None = None, delta: float = 0.0, *,
              sites: list[str] | None = None, allow_partial: bool = False, fresh: bool = False,
              preview: bool = False, query: dict[str, Any] | Query | None = None
              ) -> FederatedRelease | FederatedPreview:
    """`Client.federated` without a home service: the sites are all it needs."""
    if epsilon is None:
        raise LomasError("epsilon is required: the privacy budget to spend at each site")
    if (sql is None) == (query is None):
        raise LomasError("give either sql or a builder query")
    description = query.to_json() if isinstance(query, Query) else query
    chosen = SITES.select(sites)
    if preview:
        return federation.preview(chosen, dataset, sql, epsilon, delta, description)
    answer = federation.release(chosen, dataset, sql, epsilon, delta, query=description,
                                allow_partial=allow_partial, fresh=fresh)
    for release in answer.releases.values():
        _announce(release)
    return answer


def _query_body(dataset: str, sql: str | None, query: dict[str, Any] | None, epsilon: float | None, delta: float,
                bounds: Any, table: str | None = None) -> dict[str, Any]:
    if (sql is None) == (query is None):
        raise LomasError("give either sql or a builder query")
    if epsilon is None:
        raise LomasError("epsilon is required: the privacy budget to spend on this query")
    body: dict[str, Any] = {"dataset": dataset, "epsilon": epsilon, "delta": delta}
    body.update({"sql": sql} if query is None else {"query": query})
    if bounds is not None:
        body["bounds"] = bounds
    if table is not None and table != dataset:
        body["table"] = table
    return body

