"""How answers look in a notebook: values with their 95% interval, and a footer with the cost."""

from __future__ import annotations

import html
from typing import Any

from .client import Release


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def _notes(release: Release) -> str:
    """What each column's interval covers: clipping, nulls, and the rank statement of quantiles."""
    items = []
    for agg in release.aggregates:
        if agg.get("covers"):
            kind = "95% interval of" if agg["kind"] != "quantile" else "95% statement on"
            items.append(f"<li><b>{html.escape(agg['name'])}</b>: {kind} {html.escape(agg['covers'])}</li>")
    return f'<ul style="margin:0.2em 0;padding-left:1.2em">{"".join(items)}</ul>' if items else ""


def release_html(release: Release) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in release.columns)
    ranks = {a["name"]: a.get("rank_error_rows") for a in release.aggregates if a["kind"] == "quantile"}
    body = []
    for row, interval in zip(release.rows, release.intervals):
        cells = []
        for name in release.columns:
            text = "NULL" if row[name] is None else _fmt(row[name])
            bounds = interval.get(name)
            if bounds:
                text += f' <small style="opacity:0.7">[{_fmt(bounds[0])}, {_fmt(bounds[1])}]</small>'
            elif ranks.get(name) is not None:
                text += f' <small style="opacity:0.7">(rank ±{ranks[name]:,.0f} rows)</small>'
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    released = release.plan.get("statistics") or release.aggregates  # archived releases may predate plans
    mechanisms = list(dict.fromkeys(s["mechanism"] for s in released))
    budget = release.budget or {}
    footer = (
        f"DP release #{release.release_id} on <b>{html.escape(release.dataset)}</b> · "
        f"mechanism: {html.escape('; '.join(mechanisms))} · "
        f"charged ε={release.cost['epsilon']:.4g}"
        + (f", δ={release.cost['delta']:.2g}" if release.cost.get("delta") else "")
        + (f" · remaining ε={budget['epsilon_remaining']:.4g} of {budget['epsilon_total']:.4g}" if budget else "")
        + " · [brackets]: 95% interval"
        + _choice(release.raw.get("plan"))
    )
    if release.replay:
        original = release.raw.get("replay_of", {})
        footer = (
            f"Replay of DP release #{original.get('release_id')} on <b>{html.escape(release.dataset)}</b>: the same "
            f"answer again, free (it cost ε={original.get('epsilon', 0):.4g} the first time; --fresh for a new one)"
            + (f" · remaining ε={budget['epsilon_remaining']:.4g} of {budget['epsilon_total']:.4g}" if budget else "")
        )
    if release.dummy:
        would = release.raw.get("would_cost", {}).get("epsilon", 0.0)
        footer = (
            "<b>DUMMY DATA</b>: computed on rows made from the public metadata only, not on "
            f"{html.escape(release.dataset)}. Nothing was charged; the real query would cost ε={would:.4g}."
        )
    label = '<div class="lomas-dummy-label"><b>DUMMY DATA: not the real dataset, free</b></div>' if release.dummy else ""
    return (
        '<div class="lomas-release">' + label + '<table><thead><tr>' + head + "</tr></thead><tbody>" + "".join(body)
        + f'</tbody></table><div style="font-size:0.85em;opacity:0.8">{footer}{_notes(release)}</div></div>'
    )


def _choice(plan: dict[str, Any] | None) -> str:
    choice = (plan or {}).get("choice")
    return f" · {html.escape(choice['reason'])}" if choice else ""


def preview_html(preview: dict[str, Any]) -> str:
    """The plan: each noisy statistic released (once, however many outputs use it) and how each output is
    computed from them, with its 95% accuracy and what that covers."""
    plan = preview.get("plan") or {}
    released = "".join(
        f"<tr><td>{html.escape(s['statistic'])}</td><td>{html.escape(s['mechanism'])}</td>"
        f"<td>{s['scale']:,.4g}</td><td>{'± ' + format(s['accuracy'], ',.4g') if s['accuracy'] is not None else ''}"
        "</td></tr>"
        for s in plan.get("statistics", [])
    )
    outputs = []
    for agg in preview["aggregates"]:
        if agg.get("accuracy") is not None:
            acc = f"± {agg['accuracy']:,.4g}"
        elif agg["kind"] == "avg":
            acc = "per group (depends on its count)"
        else:
            acc = f"rank ± {agg.get('rank_error_rows', 0):,.0f} rows"
        source = ("derived from " if agg.get("derived") else "") + ", ".join(agg.get("statistics", []))
        outputs.append(f"<tr><td>{html.escape(agg['name'])}</td><td>{html.escape(source)}</td><td>{acc}</td>"
                       f"<td>{html.escape(agg.get('covers', ''))}</td></tr>")
    budget = preview.get("budget") or {}
    cost = preview["cost"]
    choice = (plan.get("choice") or {}).get("reason")
    return (
        "<div class='lomas-preview'><b>Preview (nothing spent)</b>: this query would cost "
        f"ε={cost['epsilon']:.4g}" + (f", δ={cost['delta']:.2g}" if cost.get("delta") else "")
        + (f"; you have ε={budget['epsilon_remaining']:.4g} left" if budget else "")
        + (f"<br>Mechanism: {html.escape(choice)}" if choice else "")
        + "<table><thead><tr><th>noisy statistic</th><th>mechanism</th><th>noise scale</th><th>95% accuracy</th>"
        "</tr></thead><tbody>" + released + "</tbody></table>"
        "<table><thead><tr><th>output</th><th>computed from</th><th>95% accuracy</th><th>covers</th></tr></thead>"
        "<tbody>" + "".join(outputs) + "</tbody></table></div>"
    )
