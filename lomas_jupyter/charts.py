"""Charts people would rather see than read: Vega-Lite specs (JupyterLab renders them natively, in both themes)
with a text fallback. Plain data in (a release, the archive, class spending), so the client can draw without
importing the display code."""

from __future__ import annotations

from typing import Any

from .format import fmt

VEGA_LITE = "application/vnd.vegalite.v5+json"
MARK_COLOR = "#2a9d8f"  # at least 3:1 against both JupyterLab themes' backgrounds (white and #111-#333)


def plot_spec(release: Any, column: str | None = None) -> dict[str, Any]:
    """A Vega-Lite chart (JupyterLab renders it natively, in both themes): each DP estimate as a point with its
    95% interval as an error bar, one per group."""
    if release.raw.get("keys") is not None:
        keys = list(release.raw["keys"])
        aggregates = [c for c in release.columns if c not in keys]
    else:  # releases archived before answers named their keys
        aggregates = [a["name"] for a in release.aggregates if a["name"] in release.columns]
        keys = [c for c in release.columns if c not in aggregates]
    value = column or next((a for a in aggregates if any(i.get(a) for i in release.intervals)), aggregates[0])
    data = []
    for row, interval in zip(release.rows, release.intervals):
        label = " · ".join("NULL" if row[k] is None else str(row[k]) for k in keys) or value
        bounds = interval.get(value) or [row[value], row[value]]
        data.append({"group": label, "estimate": row[value], "low": bounds[0], "high": bounds[1]})
    title = f"{value}: DP estimate with 95% interval" + (" (dummy data)" if release.dummy else "")
    y = {"field": "group", "type": "nominal", "sort": None, "title": " · ".join(keys) or None}
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": title,
        "data": {"values": data},
        "width": 420,
        "height": {"step": 26},
        "layer": [
            {"mark": {"type": "rule", "strokeWidth": 2, "color": MARK_COLOR},
             "encoding": {"y": y, "x": {"field": "low", "type": "quantitative", "title": f"{value} (DP estimate)"},
                          "x2": {"field": "high"}}},
            {"mark": {"type": "point", "filled": True, "size": 70, "color": MARK_COLOR},
             "encoding": {"y": y, "x": {"field": "estimate", "type": "quantitative"},
                          "tooltip": [{"field": "group"}, {"field": "estimate", "format": ",.4~g"},
                                      {"field": "low", "format": ",.4~g"}, {"field": "high", "format": ",.4~g"}]}},
        ],
    }


def _time_format(moments: list[str]) -> str:
    """A time axis that reads as clock time (never ".950" for releases seconds apart): with the date when the
    releases span more than a day."""
    from datetime import datetime

    try:
        times = [datetime.fromisoformat(m) for m in moments]
    except ValueError:
        return "%b %d %H:%M"
    if times and (max(times) - min(times)).total_seconds() > 86_400:
        return "%b %d %H:%M"
    return "%H:%M:%S"


def spending_spec(archive: list[dict[str, Any]], dataset: str | None = None) -> dict[str, Any]:
    """Cumulative epsilon spent over time, per dataset, from the archive of releases."""
    data = []
    totals: dict[str, float] = {}
    for record in sorted(archive, key=lambda r: (r["created_at"], r["id"])):
        if dataset and record["dataset"] != dataset:
            continue
        totals[record["dataset"]] = totals.get(record["dataset"], 0.0) + record["epsilon"]
        data.append({"when": record["created_at"], "dataset": record["dataset"], "spent": totals[record["dataset"]]})
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": "ε spent over time",
        "data": {"values": data},
        "width": 420,
        "height": 200,
        "mark": {"type": "line", "point": True, "interpolate": "step-after"},
        "encoding": {
            "x": {"field": "when", "type": "temporal", "title": "time",
                  "axis": {"format": _time_format([d["when"] for d in data]), "labelAngle": -30}},
            "y": {"field": "spent", "type": "quantitative", "title": "ε spent (cumulative)"},
            "color": {"field": "dataset", "type": "nominal"},
        },
    }


def class_spending_spec(spending: dict[str, Any]) -> dict[str, Any]:
    """Each student's ε spent, and the class's total against its cap (one bar per row, the cap as a rule)."""
    rows = [{"who": name, "spent": s["epsilon_spent"], "kind": "student"}
            for name, s in sorted(spending["per_student"].items())]
    rows.append({"who": "whole class", "spent": spending["epsilon_spent"], "kind": "class total"})
    cap = spending["epsilon_cap"]
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": f"{spending['course']} on {spending['dataset']}: ε spent (class cap {fmt(cap)})",
        "width": 420,
        "layer": [
            {"data": {"values": rows}, "mark": "bar",
             "encoding": {"y": {"field": "who", "type": "nominal", "title": None, "sort": None},
                          "x": {"field": "spent", "type": "quantitative", "title": "ε spent",
                                "scale": {"domain": [0, max([cap, *(r["spent"] for r in rows)])]}},
                          "color": {"field": "kind", "type": "nominal", "title": None}}},
            {"data": {"values": [{"cap": cap}]}, "mark": {"type": "rule", "strokeDash": [4, 3]},
             "encoding": {"x": {"field": "cap", "type": "quantitative"}}},
        ],
    }


class Chart:
    """A Vega-Lite chart with a text fallback: `display(chart)` or the last line of a cell."""

    def __init__(self, spec: dict[str, Any], text: str) -> None:
        self.spec = spec
        self.text = text

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return {VEGA_LITE: self.spec, "text/plain": f"{self.text} (a chart: open the notebook in JupyterLab)"}
