"""How answers look in a notebook: values with their 95% interval, what each interval covers, readable tables
for metadata and archives (charts are in `charts`, number formats in `format`)."""

from __future__ import annotations

import html
import re
from typing import Any

from .client import Release
from .federation import FederatedPreview, FederatedRelease
from .format import SIGNIFICANT, fmt, span

__all__ = ["SIGNIFICANT", "fmt", "span"]  # re-exported: callers format numbers through display too

def plain(value: Any) -> str:
    """Metadata values as the admin wrote them: no thousands separators (years, bounds)."""
    return str(value) if isinstance(value, int) else fmt(value).replace(",", "")


def _cell(value: Any) -> str:
    return html.escape(fmt(value))


class Table:
    """A small table that shows everything (no truncation): HTML in JupyterLab, aligned text elsewhere."""

    def __init__(self, rows: list[dict[str, Any]], columns: list[str] | None = None, caption: str = "") -> None:
        self.rows = rows
        self.columns = columns or (list(rows[0]) if rows else [])
        self.caption = caption

    def _repr_html_(self) -> str:
        head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td style='text-align:left;white-space:normal'>{_cell(row.get(c, ''))}</td>"
                             for c in self.columns) + "</tr>"
            for row in self.rows
        )
        caption = f"<div>{html.escape(self.caption)}</div>" if self.caption else ""
        return f"<div class='lomas-table'>{caption}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"

    def __repr__(self) -> str:
        cells = [[fmt(row.get(c, "")) for c in self.columns] for row in self.rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]
        lines = [self.caption] if self.caption else []
        lines.append("  ".join(c.ljust(w) for c, w in zip(self.columns, widths)))
        lines.append("  ".join("-" * w for w in widths))
        lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells)
        return "\n".join(lines) if self.rows else (self.caption or "(none)")


class Rich:
    """Something a notebook shows as HTML and every plain-text front end (terminal IPython, nbconvert to
    markdown, a saved notebook's text/plain) as readable text."""

    def __init__(self, html_text: str, plain_text: str, metadata: dict[str, Any] | None = None) -> None:
        self.html, self.text = html_text, plain_text
        self.metadata = metadata  # kept in the saved notebook beside the output (a release's receipt)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        data = {"text/html": self.html, "text/plain": self.text}
        return (data, self.metadata) if self.metadata else data

    def __repr__(self) -> str:
        return self.text


def _keys(release: Release) -> set[str]:
    """Group-key columns: labels, shown as they are (2007, not 2,007)."""
    if release.raw.get("keys") is not None:
        return set(release.raw["keys"])
    aggregates = {a["name"] for a in release.aggregates}  # releases archived before answers named their keys
    return {c for c in release.columns if c not in aggregates}


def _coverage_notes(release: Release) -> list[tuple[str, str]]:
    """(column, what its interval or value means), for the columns shown."""
    notes = []
    for agg in release.aggregates:
        if agg.get("covers") and agg["name"] in release.columns:
            kind = "95% interval of" if agg["kind"] != "quantile" else "95% statement on"
            notes.append((agg["name"], f"{kind} {agg['covers']}"))
    notes.extend((release.raw.get("derived") or {}).items())
    return notes


def _ranks(release: Release) -> dict[str, Any]:
    return {a["name"]: a.get("rank_error_rows") for a in release.aggregates if a["kind"] == "quantile"}


def _cells(release: Release) -> list[list[tuple[str, str]]]:
    """Per row, per column: (value, qualifier) as text; the qualifier is its 95% interval or rank statement
    ("" for group keys, which are labels: 2007, not 2,007). HTML and plain text both show these."""
    keys, ranks = _keys(release), _ranks(release)
    out = []
    for row, interval in zip(release.rows, release.intervals):
        cells = []
        for name in release.columns:
            if name in keys:
                cells.append(("NULL" if row[name] is None else plain(row[name]), ""))
                continue
            bounds = interval.get(name)
            qualifier = (f"[{span(bounds)}]" if bounds
                         else f"(rank ±{fmt(round(ranks[name]))} rows)" if ranks.get(name) is not None else "")
            cells.append((fmt(row[name]), qualifier))
        out.append(cells)
    return out


def release_text(release: Release, epsilon_note: str = "") -> str:
    """The answer in plain text: a table of values with their 95% intervals, then the footer."""
    rows = [{name: f"{value} {qualifier}".rstrip() for name, (value, qualifier) in zip(release.columns, cells)}
            for cells in _cells(release)]
    lines = ["DUMMY DATA: not the real dataset, free"] if release.dummy else []
    lines.append(repr(Table(rows, release.columns)) if rows else "  ".join(release.columns))
    lines.append(html.unescape(_strip_tags(_footer(release, epsilon_note))))
    lines.extend(f"  {name}: {note}" for name, note in _coverage_notes(release))
    return "\n".join(lines)


def _strip_tags(text: str) -> str:
    return re.sub(r"<[^>]+>", "", text)


def _notes(release: Release) -> str:
    """What each column's interval covers: clipping, nulls, and the rank statement of quantiles."""
    items = [f"<li><b>{html.escape(name)}</b>: {html.escape(note)}</li>" for name, note in _coverage_notes(release)]
    return f'<ul style="margin:0.2em 0;padding-left:1.2em">{"".join(items)}</ul>' if items else ""


def _budget_text(budget: dict[str, Any]) -> str:
    return f" · remaining ε={fmt(budget['epsilon_remaining'])} of {fmt(budget['epsilon_total'])}" if budget else ""


def release_html(release: Release, epsilon_note: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in release.columns)
    body = [
        "<tr>" + "".join(
            f"<td>{html.escape(value)}"
            + (f' <small style="opacity:0.75">{html.escape(qualifier)}</small>' if qualifier else "") + "</td>"
            for value, qualifier in cells
        ) + "</tr>"
        for cells in _cells(release)
    ]
    footer = _footer(release, epsilon_note)
    label = '<div class="lomas-dummy-label"><b>DUMMY DATA: not the real dataset, free</b></div>' if release.dummy else ""
    return (
        '<div class="lomas-release">' + label + '<table><thead><tr>' + head + "</tr></thead><tbody>" + "".join(body)
        + f'</tbody></table><div style="font-size:0.85em;opacity:0.85">{footer}{_notes(release)}</div></div>'
    )


def _footer(release: Release, epsilon_note: str = "") -> str:
    """What was released and what it cost (HTML; release_text strips the tags)."""
    released = release.plan.get("statistics") or release.aggregates  # archived releases may predate plans
    mechanisms = list(dict.fromkeys(s["mechanism"] for s in released))
    budget = release.budget or {}
    cost = release.cost
    footer = (
        f"DP release #{release.release_id} on <b>{html.escape(release.dataset)}</b> · "
        f"mechanism: {html.escape('; '.join(mechanisms))} · "
        f"charged ε={fmt(cost['epsilon'])}" + (f", δ={fmt(cost['delta'])}" if cost.get("delta") else "")
        + (f" ({html.escape(epsilon_note)})" if epsilon_note else "")
        + _budget_text(budget)
        + " · [brackets]: 95% interval"
        + _choice(release.raw.get("plan"))
    )
    shared = release.raw.get("shared")
    if release.replay and shared:
        footer = (
            f"Shared answer: DP release #{shared.get('release_id')} on <b>{html.escape(release.dataset)}</b>, "
            f"{html.escape(str(shared.get('note', '')))} (the class paid "
            f"ε={fmt(release.raw.get('replay_of', {}).get('epsilon', 0.0))} once; --fresh for your own)"
            + _budget_text(budget)
        )
    elif release.replay:
        original = release.raw.get("replay_of", {})
        footer = (
            f"Replay of DP release #{original.get('release_id')} on <b>{html.escape(release.dataset)}</b>: the same "
            f"answer again, free (it cost ε={fmt(original.get('epsilon', 0.0))} the first time; --fresh for a new "
            "one)" + _budget_text(budget)
        )
    if release.dummy:
        would = release.raw.get("would_cost", {}).get("epsilon", 0.0)
        footer = (
            "<b>DUMMY DATA</b>: computed on rows made from the public metadata only, not on "
            f"{html.escape(release.dataset)}. Nothing was charged; the real query would cost ε={fmt(would)}."
        )
    post = release.raw.get("post_processing")
    if post:
        footer += f" · {html.escape(post['note'])}"
    threshold = (release.raw.get("plan") or {}).get("threshold")
    if threshold and not release.dummy:
        footer += f" · {html.escape(threshold['note'])}"
    return footer


def _choice(plan: dict[str, Any] | None) -> str:
    choice = (plan or {}).get("choice")
    return f" · {html.escape(choice['reason'])}" if choice else ""


def preview_html(preview: dict[str, Any]) -> str:
    """The plan: each noisy statistic released (once, however many outputs use it) and how each output is
    computed from them, with its 95% accuracy and what that covers."""
    plan = preview.get("plan") or {}
    released = "".join(
        f"<tr><td>{html.escape(s['statistic'])}</td><td>{html.escape(s['mechanism'])}</td>"
        f"<td>{fmt(s['scale'])}</td><td>{'± ' + fmt(s['accuracy']) if s['accuracy'] is not None else ''}</td></tr>"
        for s in plan.get("statistics", [])
    )
    outputs = []
    for agg in preview["aggregates"]:
        if agg.get("accuracy") is not None:
            acc = f"± {fmt(agg['accuracy'])}"
        elif agg["kind"] != "quantile":
            acc = "per group (depends on its count)"
        else:
            acc = f"rank ± {fmt(round(agg.get('rank_error_rows', 0)))} rows"
        source = ("derived from " if agg.get("derived") else "") + ", ".join(agg.get("statistics", []))
        outputs.append(f"<tr><td>{html.escape(agg['name'])}</td><td>{html.escape(source)}</td><td>{acc}</td>"
                       f"<td>{html.escape(agg.get('covers', ''))}</td></tr>")
    budget = preview.get("budget") or {}
    cost = preview["cost"]
    choice = (plan.get("choice") or {}).get("reason")
    return (
        "<div class='lomas-preview'><b>Preview (nothing spent)</b>: this query would cost "
        f"ε={fmt(cost['epsilon'])}" + (f", δ={fmt(cost['delta'])}" if cost.get("delta") else "")
        + (f"; you have ε={fmt(budget['epsilon_remaining'])} left" if budget else "")
        + (f"<br>Mechanism: {html.escape(choice)}" if choice else "")
        + (f"<br><b>Free</b>: {html.escape(preview['answered_free']['note'])}" if preview.get("answered_free")
           else "")
        + "<table><thead><tr><th>noisy statistic</th><th>mechanism</th><th>noise scale</th><th>95% accuracy</th>"
        "</tr></thead><tbody>" + released + "</tbody></table>"
        "<table><thead><tr><th>output</th><th>computed from</th><th>95% accuracy</th><th>covers</th></tr></thead>"
        "<tbody>" + "".join(outputs) + "</tbody></table></div>"
    )


def preview_text(preview: dict[str, Any]) -> str:
    """The preview in plain text: the cost, then each output with its 95% accuracy and what it covers."""
    budget = preview.get("budget") or {}
    cost = preview["cost"]
    lines = [f"Preview (nothing spent): this query would cost ε={fmt(cost['epsilon'])}"
             + (f", δ={fmt(cost['delta'])}" if cost.get("delta") else "")
             + (f"; you have ε={fmt(budget['epsilon_remaining'])} left" if budget else "")]
    choice = ((preview.get("plan") or {}).get("choice") or {}).get("reason")
    if choice:
        lines.append(f"Mechanism: {choice}")
    if preview.get("answered_free"):  # the query itself would cost nothing: an earlier or a shared answer
        lines.append(f"Free: {preview['answered_free']['note']}")
    for agg in preview["aggregates"]:
        lines.append(f"  {agg['name']}: {_accuracy_words(agg)}; covers {agg.get('covers', '')}")
    if preview.get("post_processing"):
        lines.append(preview["post_processing"]["note"])
    return "\n".join(lines)


def _accuracy_words(agg: dict[str, Any]) -> str:
    if agg.get("accuracy") is not None:
        return f"±{fmt(agg['accuracy'])}"
    if agg["kind"] != "quantile":  # AVG, VARIANCE, STDDEV: the interval depends on the group's count
        return "interval per group (depends on its count)"
    return f"rank ±{fmt(round(agg.get('rank_error_rows', 0)))} rows"


TYPICAL_GROUP = 100  # rows: the group size an AVG's accuracy is stated for before any data is seen


def accuracy_summary(preview: dict[str, Any]) -> str:
    """One line: what each output would be worth at the previewed epsilon (an AVG's, for a group of
    TYPICAL_GROUP rows: its interval depends on the group's count)."""
    statistics = {s["statistic"]: s for s in (preview.get("plan") or {}).get("statistics", [])}
    parts = []
    for agg in preview["aggregates"]:
        if agg.get("accuracy") is not None:
            parts.append(f"{agg['name']} ±{fmt(agg['accuracy'])}")
        elif agg["kind"] == "avg":
            total = statistics.get((agg.get("statistics") or [""])[0], {}).get("accuracy")
            parts.append(f"{agg['name']} about ±{fmt(total / TYPICAL_GROUP)} for a group of {TYPICAL_GROUP} rows"
                         if total is not None else f"{agg['name']} (interval per group)")
        elif agg["kind"] != "quantile":
            parts.append(f"{agg['name']} (interval per group)")
        else:
            parts.append(f"{agg['name']} rank ±{fmt(round(agg.get('rank_error_rows', 0)))} rows")
    return ", ".join(parts)


def _combined(answer: FederatedRelease) -> Release:
    """The combined answer in a Release's shape, so that it is shown the way a single site's answer is."""
    aggregates = [{"name": name, "kind": "sum", "covers": covers} for name, covers in answer.covers.items()]
    return Release(answer.dataset, answer.sql, answer.columns, answer.rows, answer.intervals, aggregates,
                   {"epsilon": 0.0, "delta": 0.0}, raw={"keys": answer.keys})


def _site_rows(answer: FederatedRelease) -> list[dict[str, Any]]:
    rows = []
    for name, outcome in answer.sites.items():
        release = outcome.release
        if release is not None:
            budget = release.budget or {}
            what = (f"replay of #{release.raw.get('replay_of', {}).get('release_id')}, free" if release.replay
                    else f"release #{release.release_id}")
            rows.append({"site": name, "dataset": outcome.dataset, "answer": what,
                         "charged ε": release.cost["epsilon"], "charged δ": release.cost.get("delta", 0.0),
                         "ε left": budget.get("epsilon_remaining", "")})
        else:
            charged = outcome.charged or {}
            rows.append({"site": name, "dataset": outcome.dataset, "answer": f"not included: {outcome.problem}",
                         "charged ε": charged.get("epsilon", 0.0), "charged δ": charged.get("delta", 0.0),
                         "ε left": ""})
    return rows


SITE_COLUMNS = ["site", "dataset", "answer", "charged ε", "charged δ", "ε left"]


def _federated_heading(answer: FederatedRelease) -> str:
    covered = answer.covered
    head = (f"Combined DP answer on {answer.dataset} from {len(covered)} site(s): {', '.join(covered)}"
            " · each site charged its own budget · [brackets]: 95% interval")
    return head + "".join(f" · {note}" for note in answer.notes)


def federated_html(answer: FederatedRelease) -> str:
    combined = _combined(answer)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in combined.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(value)}"
                         + (f' <small style="opacity:0.75">{html.escape(q)}</small>' if q else "") + "</td>"
                         for value, q in cells) + "</tr>"
        for cells in _cells(combined))
    warning = "" if answer.complete else '<div class="lomas-partial"><b>Partial: not every site is included</b></div>'
    return (f'<div class="lomas-release lomas-federated">{warning}<table><thead><tr>{head}</tr></thead><tbody>'
            f'{body}</tbody></table><div style="font-size:0.85em;opacity:0.85">'
            f"{html.escape(_federated_heading(answer))}{_notes(combined)}</div>"
            f"{Table(_site_rows(answer), SITE_COLUMNS, 'Per site')._repr_html_()}</div>")


def federated_text(answer: FederatedRelease) -> str:
    combined = _combined(answer)
    rows = [{name: f"{value} {q}".rstrip() for name, (value, q) in zip(combined.columns, cells)}
            for cells in _cells(combined)]
    lines = [] if answer.complete else ["PARTIAL: not every site is included"]
    lines.append(repr(Table(rows, combined.columns)))
    lines.append(_federated_heading(answer))
    lines.extend(f"  {name}: {note}" for name, note in _coverage_notes(combined))
    lines.append(repr(Table(_site_rows(answer), SITE_COLUMNS, "Per site")))
    return "\n".join(lines)


def federated_preview_text(planned: FederatedPreview) -> str:
    lines = [f"Preview at {len(planned.sites)} site(s), nothing spent:"]
    for name, outcome in planned.sites.items():
        cost = (outcome.preview or {}).get("cost")
        state = "ready" if outcome.problem is None else f"refuses: {outcome.problem}"
        lines.append(f"  {name} ({outcome.dataset}): " + (f"costs ε={fmt(cost['epsilon'])}"
                                                         + (f", δ={fmt(cost['delta'])}" if cost.get("delta") else "")
                                                         + "; " if cost else "") + state)
    accuracy = {k: v for k, v in planned.accuracy.items() if v is not None}
    if accuracy:
        lines.append("combined 95% accuracy: " + ", ".join(f"{k} ±{fmt(v)}" for k, v in accuracy.items()))
    return "\n".join(lines)
