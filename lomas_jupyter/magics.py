"""`%%dpquery` and `%lomas`: a thin layer over `Client`. Failures print one line and charge nothing."""

from __future__ import annotations

import html
import shlex
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from . import certificate, receipts
from .charts import Chart, class_spending_spec, spending_spec
from .client import SITES, Client, Release, federated, on_release
from .display import (
    Rich,
    Table,
    accuracy_summary,
    federated_html,
    federated_preview_text,
    federated_text,
    plain,
    preview_html,
    preview_text,
    release_html,
    release_text,
)
from .errors import LomasError
from .format import fmt
from .sites import resolve_token
from .widget import BudgetPanel

T = TypeVar("T")
PROGRESS_AFTER = 1.0  # seconds before a running query says so
REFERENCE_EPSILON = 0.5  # what the "no epsilon given" message previews
USAGE = ("usage: %lomas status | datasets | describe NAME | budget [plot] | archive | epsilon [E|off] | "
         "connect [URL [TOKEN|$VAR]] | class COURSE DATASET | sites [DATASET] | sites add NAME URL [TOKEN] | "
         "sites remove NAME | certificate [--save NAME] | request EPSILON DATASET \"REASON\" | requests")


def _say_error(err: Exception) -> None:
    print(f"LomasError: {err}", file=sys.stderr)


def run_with_progress(label: str, work: Callable[[], T]) -> T:
    """Run `work` in a thread; if it takes longer than a second, show in the cell that it is running, with the
    elapsed time, and clear that line when it ends."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=target, name="lomas-request", daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(PROGRESS_AFTER)
    handle = None
    while thread.is_alive():
        seconds = f"{time.monotonic() - started:.0f}"
        text = Rich(f"<i>{label}: running for {seconds} s …</i>", f"{label}: running for {seconds} s …")
        if handle is None:
            handle = display(text, display_id=True)
        else:
            handle.update(text)
        thread.join(0.5)
    if handle is not None:
        handle.update(Rich("", ""))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@magics_class
class LomasMagics(Magics):
    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._client: Client | None = None
        self.panel: BudgetPanel | None = None
        self.default_epsilon: float | None = None  # set only by the user, with %lomas epsilon
        self.received: list[tuple[dict[str, Any], dict[str, Any] | None]] = []  # this kernel's signed answers
        on_release(self._on_release)

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client()
        return self._client

    def _on_release(self, release: Release) -> None:
        self.received.append(receipts.split(release.raw))
        if self.panel is not None:
            self.panel.refresh()

    @magic_arguments()
    @argument("dataset", help="the dataset to query")
    @argument("--epsilon", "-e", type=float, default=None,
              help="ε to spend on this query; required unless you set a default for this kernel with "
              "%%lomas epsilon E (nothing is ever spent that you did not choose)")
    @argument("--delta", "-d", type=float, default=0.0,
              help="δ you allow this query to spend (default 0); with δ > 0 the service uses Gaussian noise "
              "under zCDP when that is more accurate than Laplace, and says which it chose")
    @argument("--preview", action="store_true", help="show cost and accuracy without spending")
    @argument("--dummy", action="store_true", help="run on dummy rows made from public metadata (free)")
    @argument("--fresh", action="store_true", help="a new release even if this query was answered before (charged)")
    @argument("--plot", action="store_true", help="also draw the values with their 95%% intervals as error bars")
    @argument("-o", "--output", default=None, help="store the result as a polars DataFrame under this name")
    @argument("--sites", default=None,
              help="ask several sites (%%lomas sites), comma-separated, or 'all': each charges its own budget and "
              "the answers are combined")
    @argument("--allow-partial", action="store_true",
              help="with --sites: answer from the sites that can, if some refuse (the answer says which it covers)")
    @cell_magic
    def dpquery(self, line: str, cell: str) -> Any:
        """Run restricted SQL against a dataset on the DP service; the answer comes with 95% intervals."""
        try:
            args = parse_argstring(self.dpquery, line)
        except Exception as err:  # argparse's UsageError
            _say_error(LomasError(f"%%dpquery: {err}"))
            return None
        epsilon, note = args.epsilon, ""
        try:
            if epsilon is None and self.default_epsilon is not None and not args.dummy:
                epsilon, note = self.default_epsilon, "ε from your kernel default, %lomas epsilon"
            if epsilon is None and args.sites:
                raise LomasError("--sites: give --epsilon, what each site spends (--preview shows costs, free)")
            if epsilon is None:
                self._no_epsilon(args.dataset, cell, args.delta, args.dummy)
                return None
            if args.sites:
                self._federated(args, cell, epsilon)
                return None
            if args.preview:
                preview = self.client.preview(args.dataset, cell, epsilon, args.delta)
                display(Rich(preview_html(preview), preview_text(preview)))
                return None
            release = run_with_progress(
                f"query on {args.dataset}",
                lambda: self.client.query(args.dataset, cell, epsilon, args.delta, dummy=args.dummy,
                                          fresh=args.fresh),
            )
        except LomasError as err:
            _say_error(err)
            return None
        if args.output:
            self.shell.user_ns[args.output] = release.df
        display(Rich(release_html(release, note), release_text(release, note),
                     None if release.dummy else receipts.release_metadata(release.raw, note)))
        if args.plot and release.rows:
            display(release.plot())
        return None

    def _federated(self, args: Any, cell: str, epsilon: float) -> None:
        """One cell, several sites: preview everywhere, then release at each and show the combination."""
        if args.dummy:
            raise LomasError("--dummy runs at one site: leave out --sites")
        names = None if args.sites == "all" else [n.strip() for n in args.sites.split(",") if n.strip()]
        if args.preview:
            planned = federated(args.dataset, cell, epsilon, args.delta, sites=names, preview=True)
            text = federated_preview_text(planned)
            display(Rich(f"<pre>{html.escape(text)}</pre>", text))
            return
        answer = run_with_progress(
            f"query on {args.dataset} at several sites",
            lambda: federated(args.dataset, cell, epsilon, args.delta, sites=names,
                                          allow_partial=args.allow_partial, fresh=args.fresh))
        if args.output:
            self.shell.user_ns[args.output] = answer.df
        display(Rich(federated_html(answer), federated_text(answer), receipts.federated_metadata(answer)))

    def _no_epsilon(self, dataset: str, sql: str, delta: float, dummy: bool) -> None:
        """No epsilon, no spending: say so in one line, with what a typical epsilon would buy."""
        if dummy:
            _say_error(LomasError("give --epsilon (dummy runs are free, but show the accuracy of that ε)"))
            return
        preview = self.client.preview(dataset, sql, REFERENCE_EPSILON, delta)
        # not an error: a calm line on stdout
        print(f"No ε given, so nothing was spent. At ε={fmt(REFERENCE_EPSILON)} this query would give "
              f"{accuracy_summary(preview)}. To run it, add --epsilon {fmt(REFERENCE_EPSILON)} (or set a default "
              "for this kernel with %lomas epsilon E).")

    @line_magic
    def lomas(self, line: str) -> Any:
        """%lomas status | datasets | describe NAME | budget [plot] | archive | epsilon [E|off] |
        connect [URL [TOKEN]] | class COURSE DATASET (instructors) | sites [DATASET] | sites add NAME URL [TOKEN]
        [DATASET=SITE_DATASET ...] | sites remove NAME | certificate [--save NAME] | request EPSILON DATASET
        "REASON" | requests"""
        try:
            words = shlex.split(line)
        except ValueError:
            words = line.split()
        command, rest = (words[0], words[1:]) if words else ("status", [])
        try:
            handler = {
                "datasets": self._datasets, "describe": self._describe, "budget": self._budget,
                "archive": self._archive, "connect": self._connect, "status": self._status,
                "epsilon": self._epsilon, "class": self._class, "sites": self._sites,
                "certificate": self._certificate, "request": self._request, "requests": self._requests,
            }.get(command)
            if handler is None or (command == "describe" and not rest) or (command == "class" and len(rest) != 2):
                _say_error(LomasError(USAGE))
                return None
            return handler(rest)
        except LomasError as err:
            _say_error(err)
        return None

    def _datasets(self, rest: list[str]) -> Any:
        rows = []
        for d in self.client.datasets():
            budget = d.get("budget") or {}
            rows.append({"dataset": d["name"], "description": d["description"],
                         "ε remaining": budget.get("epsilon_remaining", "no grant"),
                         "δ remaining": budget.get("delta_remaining", "")})
        return Table(rows, ["dataset", "description", "ε remaining", "δ remaining"])

    def _describe(self, rest: list[str]) -> Any:
        doc = self.client.describe(rest[0])
        meta = doc["metadata"]
        caption = (f"{doc['name']} (version {doc['version']}): {doc['description']} — privacy unit: "
                   f"{meta['privacy_unit']} row(s) per individual; at most {fmt(meta['max_rows'])} rows")
        rows = []
        for name, col in meta["columns"].items():
            bounds = col.get("bounds")
            categories = col.get("categories")
            rows.append({
                "column": name, "type": col["type"], "nulls": "may be null" if col["nullable"] else "never null",
                "bounds": f"[{plain(bounds[0])}, {plain(bounds[1])}]" if bounds else "",
                "GROUP BY keys": ", ".join(str(c) for c in categories) if categories else "",
                "description": col.get("description", ""),
            })
        return Table(rows, ["column", "type", "nulls", "bounds", "GROUP BY keys", "description"], caption)

    def _budget(self, rest: list[str]) -> Any:
        if self.panel is None:
            self.panel = BudgetPanel(self.client.budget, requests=self.client.my_requests,
                                     ask=lambda dataset, epsilon, reason: self.client.request_budget(
                                         dataset, epsilon, reason))
        self.panel.refresh()
        display(self.panel.widget)
        if rest and rest[0] == "plot":
            display(Chart(spending_spec(self.client.archive()), "ε spent over time"))
        return None

    def _archive(self, rest: list[str]) -> Any:
        return Table([{"id": r["id"], "dataset": r["dataset"], "ε": r["epsilon"], "δ": r["delta"],
                       "when": r["created_at"][:19].replace("T", " "), "sql": " ".join(r["sql"].split())}
                      for r in self.client.archive()],
                     ["id", "dataset", "ε", "δ", "when", "sql"])

    def _class(self, rest: list[str]) -> Any:
        spending = self.client.class_spending(rest[0], rest[1])
        rows = [{"student": name, "ε spent": s["epsilon_spent"], "δ spent": s["delta_spent"],
                 "releases": s["releases"]} for name, s in sorted(spending["per_student"].items())]
        caption = (f"{spending['course']} on {spending['dataset']}: the class has spent ε "
                   f"{fmt(spending['epsilon_spent'])} of its cap {fmt(spending['epsilon_cap'])} "
                   f"(δ {fmt(spending['delta_spent'])} of {fmt(spending['delta_cap'])}), students who left included")
        waiting = self.client.course(rest[0]).get("waiting") or []
        if waiting:
            caption += f"; not started yet (in the Hub group): {', '.join(waiting)}"
        display(Table(rows, ["student", "ε spent", "δ spent", "releases"], caption))
        return Chart(class_spending_spec(spending), caption)

    def _sites(self, rest: list[str]) -> Any:
        """sites [DATASET] | sites add NAME URL [TOKEN|$VAR] [FEDERATED=LOCAL ...] | sites remove NAME"""
        sites = SITES
        if rest and rest[0] == "add":
            if len(rest) < 3:
                raise LomasError("usage: %lomas sites add NAME URL [TOKEN|$VAR] [DATASET=SITE_DATASET ...]")
            extra = rest[3:]
            token = extra.pop(0) if extra and "=" not in extra[0] else ""
            mapping = dict(item.split("=", 1) for item in extra if "=" in item)
            site = sites.add(rest[1], rest[2], token, mapping)
            me = site.client.whoami()  # fails here, in one line, if the URL or the token is wrong
            print(f"site {site.name}: {site.url} as {me['username']} ({me['role']})")
            return None
        if rest and rest[0] == "remove":
            if len(rest) != 2:
                raise LomasError("usage: %lomas sites remove NAME")
            sites.remove(rest[1])
            return None
        dataset = rest[0] if rest else None
        rows = []
        for row in sites.status(dataset):
            budget = (fmt(row["epsilon_remaining"]) if "epsilon_remaining" in row
                      else ", ".join(f"{d} {fmt(e)}" for d, e in row.get("budgets", {}).items()))
            rows.append({"site": row["site"], "url": row["url"],
                         "reachable": "yes" if row.get("reachable") else "no",
                         "you are": row.get("user", ""), "ε left": budget, "problem": row.get("problem", "")})
        caption = ("no sites yet: %lomas sites add NAME URL [TOKEN]" if not rows else
                   f"ε left on {dataset} at each site" if dataset else "ε left per dataset at each site")
        return Table(rows, ["site", "url", "reachable", "you are", "ε left", "problem"], caption)

    def _request(self, rest: list[str]) -> Any:
        """request EPSILON DATASET "REASON": ask the instructor for more; the budget widget shows the answer."""
        try:
            epsilon = float(rest[0])
            dataset, reason = rest[1], " ".join(rest[2:])
        except (IndexError, ValueError):
            raise LomasError('usage: %lomas request EPSILON DATASET "REASON" (e.g. %lomas request 0.5 penguins '
                             '"for exercise 3")') from None
        asked = self.client.request_budget(dataset, epsilon, reason)
        where = f" (class {asked['course']})" if asked.get("course") else ""
        print(f"request #{asked['id']} for ε {fmt(epsilon)} on {dataset}{where} is waiting for your instructor; "
              "%lomas budget shows the answer when it comes, %lomas requests lists yours")
        return None

    def _requests(self, rest: list[str]) -> Any:
        rows = [{"#": r["id"], "dataset": r["dataset"], "asked ε": r["epsilon"], "status": r["status"],
                 "granted ε": "" if r["granted_epsilon"] is None else r["granted_epsilon"], "note": r["note"],
                 "reason": r["reason"], "asked at": r["created_at"][:16].replace("T", " ")}
                for r in self.client.my_requests()]
        return Table(rows, ["#", "dataset", "asked ε", "status", "granted ε", "note", "reason", "asked at"],
                     "your budget requests" if rows else 'no requests yet: %lomas request 0.5 DATASET "why"')

    def _certificate(self, rest: list[str]) -> Any:
        """Every release this kernel received (after Restart & Run All: every one the notebook shows), with
        totals; --save NAME writes NAME.json and NAME.html. lomas-verify checks a saved notebook offline."""
        if rest and (rest[0] != "--save" or len(rest) != 2):
            raise LomasError("usage: %lomas certificate [--save NAME]")
        entries = [certificate.Entry.of(answer, receipt) for answer, receipt in self.received]
        title = "DP releases in this kernel"
        if rest:
            json_path, html_path = certificate.save(entries, rest[1])
            print(f"wrote {json_path} and {html_path}")
        return Rich(certificate.as_html(entries, title), certificate.as_text(entries, title))

    def _epsilon(self, rest: list[str]) -> Any:
        if rest and rest[0] == "off":
            self.default_epsilon = None
        elif rest:
            try:
                value = float(rest[0])
            except ValueError:
                raise LomasError(f"%lomas epsilon: '{rest[0]}' is not a number (or 'off')") from None
            if not value > 0:
                raise LomasError("%lomas epsilon: ε must be above 0")
            self.default_epsilon = value
        print(f"default ε for %%dpquery in this kernel: {fmt(self.default_epsilon)}" if self.default_epsilon
              else "no default ε: every %%dpquery needs --epsilon")
        return None

    def _connect(self, rest: list[str]) -> Any:
        try:
            # a token may be `$NAME`: kept in the environment, out of the saved notebook
            candidate = Client(rest[0], resolve_token(rest[1]) if len(rest) > 1 else "") if rest else Client()
            me = candidate.whoami()
        except LomasError as err:
            kept = f"; still using {self._client.connection.url}" if self._client else ""
            raise LomasError(f"could not connect: {err}{kept}") from None
        self._client = candidate
        if self.panel is not None:
            self.panel.fetch = candidate.budget
            self.panel.refresh()
        print(f"connected to {candidate.connection.url} ({candidate.connection.source}) as {me['username']} "
              f"({me['role']})")
        return None

    def _status(self, rest: list[str]) -> Any:
        me = self.client.whoami()
        print(f"DP service {self.client.connection.url} ({self.client.connection.source}); "
              f"you are {me['username']} ({me['role']})"
              + (f"; default ε {fmt(self.default_epsilon)}" if self.default_epsilon else ""))
        return None


def _cell_magic_usage(magics: type, name: str) -> None:
    """IPython writes a cell magic's usage as `%name`; say `%%name`, as it is typed."""
    func = getattr(magics, name)
    func.parser.prog = f"%{name}"  # IPython's help formatter adds one more %
    func.__doc__ = func.parser.format_help().removeprefix("usage: ")


_cell_magic_usage(LomasMagics, "dpquery")


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(LomasMagics)
