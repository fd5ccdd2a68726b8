"""A notebook's certificate: every DP release it shows, with what each cost, and totals per site and dataset.

Built from signed answers (receipts.split), by `%lomas certificate` (the releases this kernel received) and by
`lomas-verify` (the releases a saved notebook shows). A replay costs nothing when it is asked again, but the
answer it shows cost its first release: totals count each release once, at that first price.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .format import fmt


@dataclass(frozen=True)
class Entry:
    site_key: str  # the signing key's id: which service released it
    dataset: str
    release_id: int | None
    created_at: str
    user: str
    sql: str
    replay: bool
    charged_epsilon: float  # what this request was charged (0 for a replay)
    charged_delta: float
    release_epsilon: float  # what the release shown cost when it was made
    release_delta: float
    verified: bool | None = None  # lomas-verify: the receipt checks out (None: not checked)
    shared: str = ""  # the course whose pool paid for it, when it is a classmate's release shared with the class

    @classmethod
    def of(cls, answer: dict[str, Any], receipt: dict[str, Any] | None, verified: bool | None = None) -> Entry:
        cost = answer.get("cost") or {}
        first = answer.get("replay_of") or {}
        release_id = first.get("release_id", answer.get("release_id"))
        return cls((receipt or {}).get("key_id", ""), str(answer.get("dataset", "")), release_id,
                   str(answer.get("created_at", "")), str(answer.get("user", "")), str(answer.get("sql", "")),
                   bool(answer.get("replay")), float(cost.get("epsilon", 0.0)), float(cost.get("delta", 0.0)),
                   float(first.get("epsilon", cost.get("epsilon", 0.0))),
                   float(first.get("delta", cost.get("delta", 0.0))), verified,
                   str((answer.get("shared") or {}).get("course", "")))


def totals(entries: list[Entry]) -> list[dict[str, Any]]:
    """Per (site key, dataset): releases shown, what they cost (each release once), and what was charged now;
    a release whose receipt failed its check counts nowhere; a classmate's release shared with the class is
    counted apart (its cost is the class's, paid once)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    seen: set[tuple[str, str, Any, str]] = set()
    for e in entries:
        if e.verified is False:
            continue
        row = out.setdefault((e.site_key, e.dataset), {
            "site_key": e.site_key, "dataset": e.dataset, "releases": 0, "epsilon": 0.0, "delta": 0.0,
            "charged_epsilon": 0.0, "charged_delta": 0.0, "shared": 0})
        row["charged_epsilon"] += e.charged_epsilon
        row["charged_delta"] += e.charged_delta
        if (e.site_key, e.dataset, e.release_id, e.shared) not in seen:
            seen.add((e.site_key, e.dataset, e.release_id, e.shared))
            if e.shared:
                row["shared"] += 1
                continue
            row["releases"] += 1
            row["epsilon"] += e.release_epsilon
            row["delta"] += e.release_delta
    return list(out.values())


def as_json(entries: list[Entry]) -> dict[str, Any]:
    return {"releases": [asdict(e) for e in entries], "totals": totals(entries)}


def _rows(entries: list[Entry]) -> list[dict[str, Any]]:
    return [{"#": i + 1, "dataset": e.dataset, "release": f"#{e.release_id}" + (f" (shared by {e.shared})" if e.shared else
                                                                   " (replay)" if e.replay else ""),
             "released": e.created_at, "ε of release": fmt(e.release_epsilon), "δ": fmt(e.release_delta),
             "site key": e.site_key, "receipt": {None: "", True: "ok", False: "FAILED"}[e.verified],
             "query": " ".join(e.sql.split())[:80]}
            for i, e in enumerate(entries)]


def _total_rows(entries: list[Entry]) -> list[dict[str, Any]]:
    return [{"dataset": t["dataset"], "site key": t["site_key"], "releases": t["releases"],
             "total ε": fmt(t["epsilon"]), "total δ": fmt(t["delta"]),
             "charged by this run": fmt(t["charged_epsilon"]), "shared by the class": t["shared"]}
            for t in totals(entries)]


def _table_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)"
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def _table_html(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(str(v))}</td>" for v in r.values())
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def as_text(entries: list[Entry], title: str = "DP releases") -> str:
    return f"{title}: {len(entries)}\n{_table_text(_rows(entries))}\nTotals (each release once, at its first price)\n" \
           f"{_table_text(_total_rows(entries))}"


def as_html(entries: list[Entry], title: str = "DP releases") -> str:
    return (f"<div class='lomas-certificate'><b>{html.escape(title)}: {len(entries)}</b>{_table_html(_rows(entries))}"
            f"<b>Totals</b> (each release once, at its first price){_table_html(_total_rows(entries))}</div>")


def save(entries: list[Entry], stem: str | Path) -> tuple[Path, Path]:
    """Write STEM.json and STEM.html; returns both paths."""
    stem = Path(stem)
    if stem.suffix in (".json", ".html"):
        stem = stem.with_suffix("")
    json_path, html_path = stem.with_suffix(".json"), stem.with_suffix(".html")
    json_path.write_text(json.dumps(as_json(entries), indent=2))
    html_path.write_text("<!doctype html><meta charset='utf-8'><title>DP certificate</title>"
                         + as_html(entries, "DP releases in this notebook"))
    return json_path, html_path
