"""The live budget panel: one gauge per dataset, always showing the service's numbers, and a way to ask for more.

It refreshes after every release made in this kernel (magic or `Client().query`), and, while it exists, polls
the service every few seconds (budget reads are O(1)) so releases made elsewhere (another kernel, a terminal,
the sidebar) show up too, and so does the answer to a budget request ("Ask for more…") once the instructor
decides it."""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from .format import fmt

POLL_SECONDS = 3.0


def _item(text: str) -> str:
    # each "label value" pair stays on one line; the row wraps only between pairs
    return f"<span style='white-space:nowrap;margin-right:0.9em'>{text}</span>"


def request_line(request: dict[str, Any]) -> str:
    """One line on a budget request and its answer (HTML)."""
    head = f"request #{request['id']} for ε {fmt(request['epsilon'])}"
    note = f": {html.escape(request['note'])}" if request.get("note") else ""
    if request["status"] == "pending":
        return f"{head}: waiting for your instructor"
    if request["status"] == "approved":
        return f"{head}: <b>approved</b>, ε {fmt(request['granted_epsilon'] or 0.0)} added{note}"
    return f"{head}: <b>declined</b>{note}"


class BudgetPanel:
    def __init__(self, fetch: Callable[[], list[dict[str, Any]]], poll_seconds: float | None = None,
                 requests: Callable[[], list[dict[str, Any]]] | None = None,
                 ask: Callable[[str, float, str], dict[str, Any]] | None = None) -> None:
        self.fetch = fetch
        self.fetch_requests = requests
        self.ask = ask
        self._requests: dict[str, dict[str, Any]] = {}  # the newest request per dataset
        self._request_lines: dict[str, widgets.HTML] = {}
        self._forms: dict[str, widgets.HBox] = {}
        self.title = widgets.HTML("<b>DP budget</b>")
        self.rows = widgets.VBox([])
        self.status = widgets.HTML("")
        self.widget = widgets.VBox([self.title, self.rows, self.status], layout=widgets.Layout(max_width="760px"))
        self._gauges: dict[str, tuple[widgets.FloatProgress, widgets.HTML]] = {}
        self._last: list[dict[str, Any]] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        seconds = POLL_SECONDS if poll_seconds is None else poll_seconds
        self._poller = threading.Thread(target=self._poll, args=(seconds,), name="lomas-budget", daemon=True)
        self._poller.start()

    def refresh(self) -> None:
        """Read the service's budgets and show them; a failure shows one line and keeps the last numbers."""
        try:
            budgets = self.fetch()
            asked = self.fetch_requests() if self.fetch_requests is not None and self._want_requests() else None
        except Exception as err:  # noqa: BLE001 - the panel must never raise into a cell or the poller
            self.status.value = f"<small>not refreshed: {html.escape(str(err))}</small>"
            return
        self.status.value = ""
        self.update(budgets)
        if asked is not None:
            self.update_requests(asked)

    def _want_requests(self) -> bool:
        """Read requests at the start and while one is waiting (then its answer shows up within a poll)."""
        return not self._requests or any(r["status"] == "pending" for r in self._requests.values())

    def update_requests(self, asked: list[dict[str, Any]]) -> None:
        with self._lock:
            newest: dict[str, dict[str, Any]] = {}
            for request in asked:  # newest first
                newest.setdefault(request["dataset"], request)
            self._requests = newest or {"": {"status": "none"}}
            for name, line in self._request_lines.items():
                line.value = f"<small>{request_line(newest[name])}</small>" if name in newest else ""

    def _send(self, dataset: str, amount: widgets.FloatText, reason: widgets.Text) -> None:
        line = self._request_lines[dataset]
        if self.ask is None:
            return
        try:
            request = self.ask(dataset, float(amount.value), reason.value)
        except Exception as err:  # noqa: BLE001 - one line in the panel, never a traceback
            line.value = f"<small>not sent: {html.escape(str(err))}</small>"
            return
        self._forms[dataset].layout.display = "none"
        reason.value = ""
        with self._lock:
            self._requests[dataset] = request
        line.value = f"<small>{request_line(request)}</small>"

    def _request_form(self, dataset: str) -> widgets.HBox:
        amount = widgets.FloatText(value=0.5, description="ε", step=0.1, layout=widgets.Layout(width="120px"),
                                   style={"description_width": "initial"})
        reason = widgets.Text(placeholder="why (your instructor reads it)", layout=widgets.Layout(width="300px"))
        send = widgets.Button(description="Send request", button_style="primary")
        send.on_click(lambda _b: self._send(dataset, amount, reason))
        form = widgets.HBox([amount, reason, send], layout=widgets.Layout(display="none"))
        form.add_class("lomas-request-form")
        return form

    def close(self) -> None:
        self._stop.set()
        self.widget.close()

    def _poll(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            self.refresh()

    def update(self, budgets: list[dict[str, Any]]) -> None:
        with self._lock:
            if budgets == self._last:
                return
            self._last = budgets
            for budget in budgets:
                self._show(budget)

    def _show(self, budget: dict[str, Any]) -> None:
        name = budget["dataset"]
        total = budget["epsilon_total"] or 1.0
        if name not in self._gauges:
            gauge = widgets.FloatProgress(value=min(budget["epsilon_spent"], total), min=0.0, max=total,
                                          description=name, bar_style="info",
                                          style={"description_width": "initial"},
                                          layout=widgets.Layout(width="280px"))
            label = widgets.HTML(layout=widgets.Layout(flex="1 1 auto"))
            self._gauges[name] = (gauge, label)
            row: list[widgets.Widget] = [widgets.HBox([gauge, label], layout=widgets.Layout(flex_flow="row wrap"))]
            if self.ask is not None:
                more = widgets.Button(description="Ask for more…", tooltip=f"ask your instructor for more ε on {name}",
                                      layout=widgets.Layout(width="auto"))
                more.add_class("lomas-ask-more")
                form = self._forms[name] = self._request_form(name)
                more.on_click(lambda _b, f=form: setattr(f.layout, "display", None if f.layout.display else "none"))
                line = self._request_lines[name] = widgets.HTML("")
                known = self._requests.get(name)
                if known:
                    line.value = f"<small>{request_line(known)}</small>"
                row[0].children = (*row[0].children, more)
                row += [form, line]
            self.rows.children = (*self.rows.children, *row)
        gauge, label = self._gauges[name]
        gauge.max = total
        gauge.value = min(budget["epsilon_spent"], total)
        gauge.bar_style = "danger" if budget["epsilon_remaining"] < 0.1 * total else "info"
        items = [
            f"spent ε {fmt(budget['epsilon_spent'])}",
            f"remaining ε {fmt(budget['epsilon_remaining'])} of {fmt(total)}",
        ]
        if budget["delta_total"]:
            items.append(f"δ {fmt(budget['delta_spent'])} of {fmt(budget['delta_total'])}")
        items.append(f"{budget['releases']:,} release{'s' if budget['releases'] != 1 else ''}")
        if budget.get("last_cost") is not None:
            items.append(f"last query ε {fmt(budget['last_cost'])}")
        if budget.get("pending"):
            items.append(f"{budget['pending']} running")
        label.value = "".join(_item(i) for i in items)
