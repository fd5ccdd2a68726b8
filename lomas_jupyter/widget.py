"""The live budget panel: one gauge per dataset, refreshed by the magics after every release."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets


class BudgetPanel:
    def __init__(self) -> None:
        self.title = widgets.HTML("<b>DP budget</b>")
        self.rows = widgets.VBox([])
        self.widget = widgets.VBox([self.title, self.rows], layout=widgets.Layout(max_width="760px"))
        self._gauges: dict[str, tuple[widgets.FloatProgress, widgets.HTML]] = {}

    def update(self, budgets: list[dict[str, Any]], last_cost: dict[str, float] | None = None) -> None:
        for budget in budgets:
            name = budget["dataset"]
            total = budget["epsilon_total"] or 1.0
            if name not in self._gauges:
                gauge = widgets.FloatProgress(value=min(budget["epsilon_spent"], total), min=0.0, max=total,
                                              description=name, bar_style="info",
                                              layout=widgets.Layout(width="260px"))
                label = widgets.HTML()
                self._gauges[name] = (gauge, label)
                self.rows.children = (*self.rows.children, widgets.HBox([gauge, label]))
            gauge, label = self._gauges[name]
            gauge.max = total
            gauge.value = min(budget["epsilon_spent"], total)
            gauge.bar_style = "danger" if budget["epsilon_remaining"] < 0.1 * total else "info"
            last = budget.get("last_cost")
            label.value = (
                f"spent ε {budget['epsilon_spent']:.3g} · remaining ε {budget['epsilon_remaining']:.3g} "
                f"of {total:.3g}"
                + (f" · δ {budget['delta_spent']:.2g} of {budget['delta_total']:.2g}" if budget["delta_total"] else "")
                + f" · {budget['releases']} releases"
                + (f" · last query ε {last:.3g}" if last is not None else "")
            )
