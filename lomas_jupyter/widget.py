"""The live budget panel: one gauge per dataset, always showing the service's numbers.

It refreshes after every release made in this kernel (magic or `Client().query`), and, while it exists, polls
the service every few seconds (budget reads are O(1)) so releases made elsewhere (another kernel, a terminal,
the sidebar) show up too."""

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


class BudgetPanel:
    def __init__(self, fetch: Callable[[], list[dict[str, Any]]], poll_seconds: float | None = None) -> None:
        self.fetch = fetch
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
        except Exception as err:  # noqa: BLE001 - the panel must never raise into a cell or the poller
            self.status.value = f"<small>not refreshed: {html.escape(str(err))}</small>"
            return
        self.status.value = ""
        self.update(budgets)

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
            self.rows.children = (*self.rows.children,
                                  widgets.HBox([gauge, label], layout=widgets.Layout(flex_flow="row wrap")))
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
