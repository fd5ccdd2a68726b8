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


def release_html(release: Release) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in release.columns)
    body = []
    for row, interval in zip(release.rows, release.intervals):
        cells = []
        for name in release.columns:
            text = _fmt(row[name])
            bounds = interval.get(name)
            if bounds:
                text += f' <small style="opacity:0.7">[{_fmt(bounds[0])}, {_fmt(bounds[1])}]</small>'
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    mechanisms = sorted({a["mechanism"] for a in release.aggregates})
    budget = release.budget or {}
    footer = (
        f"DP release #{release.release_id} on <b>{html.escape(release.dataset)}</b> · "
        f"mechanism: {html.escape('; '.join(mechanisms))} · "
        f"charged ε={release.cost['epsilon']:.4g}"
        + (f", δ={release.cost['delta']:.2g}" if release.cost.get("delta") else "")
        + (f" · remaining ε={budget['epsilon_remaining']:.4g} of {budget['epsilon_total']:.4g}" if budget else "")
        + " · [brackets]: 95% interval"
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
        + f'</tbody></table><div style="font-size:0.85em;opacity:0.8">{footer}</div></div>'
    )


def preview_html(preview: dict[str, Any]) -> str:
    rows = []
    for agg in preview["aggregates"]:
        accuracy = agg.get("accuracy")
        acc = f"± {accuracy:,.4g}" if accuracy is not None else "see interval per group" if agg["kind"] == "avg" \
            else "n/a (exponential mechanism)"
        scale = agg["scale"]
        scale_text = ", ".join(f"{k} {v:,.4g}" for k, v in scale.items()) if isinstance(scale, dict) else f"{scale:,.4g}"
        rows.append(f"<tr><td>{html.escape(agg['name'])}</td><td>{html.escape(agg['mechanism'])}</td>"
                    f"<td>{scale_text}</td><td>{acc}</td></tr>")
    budget = preview.get("budget") or {}
    return (
        "<div class='lomas-preview'><b>Preview (nothing spent)</b>: this query would cost "
        f"ε={preview['cost']['epsilon']:.4g}"
        + (f"; you have ε={budget['epsilon_remaining']:.4g} left" if budget else "")
        + "<table><thead><tr><th>output</th><th>mechanism</th><th>noise scale</th><th>95% accuracy</th></tr>"
        "</thead><tbody>" + "".join(rows) + "</tbody></table></div>"
    )
