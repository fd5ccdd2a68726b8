"""`%%dpquery` and `%lomas`: a thin layer over `Client`. Failures print one line and charge nothing."""

from __future__ import annotations

import sys
from typing import Any

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import HTML, display
from traitlets import Float

from .client import Client
from .display import preview_html, release_html
from .errors import LomasError
from .widget import BudgetPanel


def _say_error(err: Exception) -> None:
    print(f"LomasError: {err}", file=sys.stderr)


@magics_class
class LomasMagics(Magics):
    default_epsilon = Float(0.5, help="epsilon for %%dpquery when --epsilon is not given").tag(config=True)

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._client: Client | None = None
        self.panel: BudgetPanel | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client()
        return self._client

    def _refresh_panel(self) -> None:
        if self.panel is not None:
            self.panel.update(self.client.budget())

    @magic_arguments()
    @argument("dataset", help="the dataset to query")
    @argument("--epsilon", "-e", type=float, default=None, help="privacy budget to spend")
    @argument("--delta", "-d", type=float, default=0.0,
              help="delta you allow this query to spend (default 0); with delta > 0 the service uses Gaussian noise "
              "under zCDP when that is more accurate than Laplace, and says which it chose")
    @argument("--preview", action="store_true", help="show cost and accuracy without spending")
    @argument("--dummy", action="store_true", help="run on dummy rows made from public metadata (free)")
    @argument("--fresh", action="store_true", help="a new release even if this query was answered before (charged)")
    @argument("-o", "--output", default=None, help="store the result as a polars DataFrame under this name")
    @cell_magic
    def dpquery(self, line: str, cell: str) -> Any:
        """Run restricted SQL against a dataset on the DP service."""
        try:
            args = parse_argstring(self.dpquery, line)
        except Exception as err:  # argparse's UsageError
            _say_error(LomasError(f"%%dpquery: {err}"))
            return None
        epsilon = args.epsilon if args.epsilon is not None else self.default_epsilon
        try:
            if args.preview:
                display(HTML(preview_html(self.client.preview(args.dataset, cell, epsilon, args.delta))))
                return None
            release = self.client.query(args.dataset, cell, epsilon, args.delta, dummy=args.dummy,
                                        fresh=args.fresh)
            if not args.dummy:
                self._refresh_panel()
        except LomasError as err:
            _say_error(err)
            return None
        if args.output:
            self.shell.user_ns[args.output] = release.df
        display(HTML(release_html(release)))
        return None

    @line_magic
    def lomas(self, line: str) -> Any:
        """%lomas datasets | describe NAME | budget | archive | status | connect URL [TOKEN]"""
        words = line.split()
        command, rest = (words[0], words[1:]) if words else ("status", [])
        try:
            if command == "datasets":
                rows = self.client.datasets()
                return _table([{"dataset": d["name"], "description": d["description"],
                                "epsilon remaining": (d["budget"] or {}).get("epsilon_remaining")} for d in rows])
            if command == "describe" and rest:
                doc = self.client.describe(rest[0])
                meta = doc["metadata"]
                print(f"{doc['name']} (version {doc['version']}): {doc['description']}")
                print(f"privacy unit: {meta['privacy_unit']} row(s) per individual; at most {meta['max_rows']} rows")
                return _table([{"column": n, "type": c["type"], "nullable": c["nullable"],
                                "bounds": str(c.get("bounds", "")), "categories": str(c.get("categories", ""))}
                               for n, c in meta["columns"].items()])
            if command == "budget":
                if self.panel is None:
                    self.panel = BudgetPanel()
                self._refresh_panel()
                display(self.panel.widget)
                return None
            if command == "archive":
                return _table([{"id": r["id"], "dataset": r["dataset"], "epsilon": r["epsilon"], "sql": r["sql"],
                                "when": r["created_at"]} for r in self.client.archive()])
            if command == "connect" and rest:
                self._client = Client(rest[0], rest[1] if len(rest) > 1 else "")
                self.client.whoami()
                print(f"connected to {self._client.connection.url}")
                return None
            if command == "status":
                me = self.client.whoami()
                print(f"DP service {self.client.connection.url} ({self.client.connection.source}); "
                      f"you are {me['username']} ({me['role']})")
                return None
            _say_error(LomasError("usage: %lomas datasets | describe NAME | budget | archive | status | "
                                  "connect URL [TOKEN]"))
        except LomasError as err:
            _say_error(err)
        return None


def _table(rows: list[dict[str, Any]]) -> Any:
    import polars as pl

    return pl.DataFrame(rows) if rows else pl.DataFrame()


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(LomasMagics)
