"""One question asked of several sites: each site prices, charges and releases on its own; the kernel combines.

Only DP releases travel, one way, from each site to this kernel. Every site previews first (free): if any site
refuses (budget, metadata, a query it cannot answer, down), nothing is spent anywhere unless the caller allows
a partial answer, which then says which sites it covers. Combining is post-processing of the sites' releases:
counts and sums add, AVG is the ratio of the pooled sum and count, and each interval comes from the sites'
published noise (see `noise_sums`). It treats the sites' tables as disjoint parts of one table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import polars as pl

from .errors import LomasError
from .noise_sums import Draw, half_width
from .sites import Site

T = TypeVar("T")
ALPHA = 0.05
COMBINABLE = ("count_star", "count", "sum", "avg")
WHY_NOT = {
    "count_distinct": "the same value can be at several sites, so distinct counts do not add",
    "quantile": "a quantile of the pooled table is not a function of the sites' quantiles",
    "var_samp": "not combined across sites yet", "var_pop": "not combined across sites yet",
    "stddev_samp": "not combined across sites yet", "stddev_pop": "not combined across sites yet",
}


@dataclass
class SiteOutcome:
    """What one site did: its preview, its release (if any), or why it did not answer."""

    site: str
    dataset: str
    preview: dict[str, Any] | None = None
    release: Any = None  # a client.Release
    problem: str | None = None
    charged: dict[str, float] | None = None  # what a site that failed after charging took (from its ledger)


@dataclass
class FederatedPreview:
    dataset: str
    sql: str
    sites: dict[str, SiteOutcome]
    accuracy: dict[str, float | None]  # per combined column: the 95% half-width, where it is data-free

    @property
    def ready(self) -> list[str]:
        return [name for name, o in self.sites.items() if o.problem is None]

    @property
    def refused(self) -> dict[str, str]:
        return {name: o.problem for name, o in self.sites.items() if o.problem is not None}  # type: ignore[misc]


@dataclass
class FederatedRelease:
    """The combined answer, the sites' own releases beside it, and which sites it covers."""

    dataset: str
    sql: str
    columns: list[str]
    keys: list[str]
    rows: list[dict[str, Any]]
    intervals: list[dict[str, Any]]
    covers: dict[str, str]  # per column, what its interval is about
    sites: dict[str, SiteOutcome]
    complete: bool  # every site asked answered
    notes: list[str] = field(default_factory=list)

    @property
    def covered(self) -> list[str]:
        """The sites whose releases the combined answer is made of."""
        return [name for name, o in self.sites.items() if o.release is not None]

    @property
    def releases(self) -> dict[str, Any]:
        return {name: o.release for name, o in self.sites.items() if o.release is not None}

    @property
    def cost(self) -> dict[str, dict[str, float]]:
        """What each site charged (its own ledger; a replay is free)."""
        out = {name: dict(o.release.cost) for name, o in self.sites.items() if o.release is not None}
        out.update({name: dict(o.charged) for name, o in self.sites.items() if o.charged})
        return out

    @property
    def df(self) -> pl.DataFrame:
        return pl.DataFrame(self.rows, schema=self.columns, orient="row") if self.rows else pl.DataFrame(
            schema=self.columns)

    def with_intervals(self) -> pl.DataFrame:
        out = []
        for row, interval in zip(self.rows, self.intervals):
            record: dict[str, Any] = {}
            for name in self.columns:
                record[name] = row[name]
                if name in interval:
                    record[f"{name}_low"], record[f"{name}_high"] = interval[name]
            out.append(record)
        return pl.DataFrame(out)

    def per_site(self) -> pl.DataFrame:
        """Every site's own answer, one row per site and group."""
        rows = [{"site": name, **row} for name, release in self.releases.items() for row in release.rows]
        return pl.DataFrame(rows, schema=["site", *self.columns], orient="dicts") if rows else pl.DataFrame()


def _each(sites: list[Site], work: Callable[[Site], T]) -> list[T]:
    with ThreadPoolExecutor(max_workers=min(8, len(sites))) as pool:
        return list(pool.map(work, sites))


def preview(sites: list[Site], dataset: str, sql: str | None, epsilon: float, delta: float = 0.0,
            query: dict[str, Any] | None = None) -> FederatedPreview:
    """Ask every site what the query would cost (free), then check that the sites can be combined."""
    def ask(site: Site) -> SiteOutcome:
        outcome = SiteOutcome(site.name, site.dataset(dataset))
        try:
            doc = site.client.preview(outcome.dataset, sql, epsilon, delta, query=query, table=dataset)
        except LomasError as err:
            outcome.problem = str(err)
            return outcome
        outcome.preview = doc
        if not doc.get("affordable"):
            left = (doc.get("budget") or {}).get("epsilon_remaining")
            outcome.problem = (f"not enough budget: the query costs ε={doc['cost']['epsilon']:.4g}"
                               + (f", ε={left:.4g} is left" if left is not None else ", and there is no grant"))
        return outcome

    outcomes = {o.site: o for o in _each(sites, ask)}
    answered = [o for o in outcomes.values() if o.preview is not None]
    if answered:
        _check_combinable(answered)
    accuracy = _preview_accuracy([o.preview for o in outcomes.values() if o.problem is None])  # type: ignore[misc]
    return FederatedPreview(dataset, sql or "", outcomes, accuracy)


def _check_combinable(outcomes: list[SiteOutcome]) -> None:
    """One clear line when the sites cannot be combined, before anything is spent."""
    first = outcomes[0].preview
    assert first is not None
    if first.get("post_processing"):
        applied = ", ".join(first["post_processing"]["applied"]).upper().replace("_", " ")
        raise LomasError(f"{applied} would run at each site before combining: leave it out of a query for several "
                         "sites and filter or sort the combined frame (.df) instead")
    if (first.get("plan") or {}).get("threshold"):
        raise LomasError("groups without public keys are thresholded at each site, so the sites' groups do not "
                         "line up: group by columns with public categories to ask several sites")
    for agg in first["aggregates"]:
        if agg["kind"] not in COMBINABLE:
            raise LomasError(f"{agg['name']} ({agg['kind'].upper()}) cannot be combined across sites: "
                             f"{WHY_NOT.get(agg['kind'], 'not combinable')}")
        if "uses" not in agg:
            raise LomasError("a site's service is too old to combine answers (it does not publish its noise)")
    names = {a["name"] for a in first["aggregates"]}
    for column in first["columns"]:
        if column not in names and column not in first.get("keys", ()):
            raise LomasError(f"{column} is arithmetic on aggregates, computed at each site: ask for the aggregates "
                             "and compute it from the combined frame (.df) instead")
    for other in outcomes[1:]:
        doc = other.preview
        assert doc is not None
        used, mine = first.get("columns_used", {}), doc.get("columns_used", {})
        for column in sorted(set(used) | set(mine)):
            if used.get(column) != mine.get(column):
                raise LomasError(f"the sites' public metadata disagree on column {column}: "
                                 f"{_short(used.get(column))} at {outcomes[0].site}, {_short(mine.get(column))} at "
                                 f"{other.site}; nothing was spent")
        if doc["columns"] != first["columns"] or [(a["kind"], a["how"]) for a in doc["aggregates"]] != [
                (a["kind"], a["how"]) for a in first["aggregates"]]:
            raise LomasError(f"{other.site} plans this query differently from {outcomes[0].site}; nothing was spent")


def _short(column: dict[str, Any] | None) -> str:
    if column is None:
        return "no such column"
    parts = [column["type"], "nullable" if column["nullable"] else "not null"]
    if "bounds" in column:
        parts.append(f"bounds {column['bounds']}")
    if "categories" in column:
        parts.append(f"{len(column['categories'])} categories")
    return ", ".join(parts)


def _draws(plan: dict[str, Any], index: int, weight: float = 1.0) -> Draw | None:
    noise = plan["statistics"][index].get("noise")
    if noise is None:
        return None
    return Draw(noise["family"], noise["discrete"], noise["scale"], noise["unit"], weight)


def _rounding(plan: dict[str, Any], index: int) -> float:
    return float(plan["statistics"][index].get("rounding") or 0.0)


def _linear_terms(agg: dict[str, Any]) -> list[tuple[int, float]]:
    """A count's or sum's value as sum of weight x statistic: [(statistic index, weight)]."""
    uses = agg["uses"]
    if agg["how"] == "centred_sum":
        return [(uses[0], 1.0), (uses[1], agg["centre"])]
    return [(uses[0], 1.0)]


def _linear_width(aggs: list[dict[str, Any]], plans: list[dict[str, Any]], alpha: float) -> float:
    draws, rounding = [], 0.0
    for agg, plan in zip(aggs, plans):
        for index, weight in _linear_terms(agg):
            draw = _draws(plan, index, weight)
            if draw is not None:
                draws.append(draw)
            rounding += abs(weight) * _rounding(plan, index)
    return half_width(draws, alpha) + rounding


def _preview_accuracy(previews: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per combined count or sum: its 95% half-width (data-free); AVG depends on the pooled count: None."""
    if not previews:
        return {}
    out: dict[str, float | None] = {}
    plans = [p["plan"] for p in previews]
    for i, agg in enumerate(previews[0]["aggregates"]):
        if agg["kind"] in ("count_star", "count", "sum") and "uses" in agg:
            out[agg["name"]] = _linear_width([p["aggregates"][i] for p in previews], plans, ALPHA)
        else:
            out[agg["name"]] = None
    return out


def combine(releases: dict[str, Any], alpha: float = ALPHA) -> tuple[list[str], list[str], list[dict[str, Any]],
                                                                     list[dict[str, Any]], dict[str, str]]:
    """The sites' releases (client.Release, same query) -> (columns, keys, rows, intervals, covers)."""
    docs = [r.raw for r in releases.values()]
    first = docs[0]
    columns, keys = first["columns"], first["keys"]
    aggregates = {a["name"]: (i, a) for i, a in enumerate(first["aggregates"])}
    plans = [d["plan"] for d in docs]
    by_key: list[dict[tuple[Any, ...], list[Any]]] = []
    for doc in docs:
        if "statistics" not in doc:
            raise LomasError("a site's release does not carry its released statistics (an older service, or an "
                             "archived answer): ask it again with fresh=True")
        by_key.append({tuple(row[k] for k in keys): stats for row, stats in zip(doc["rows"], doc["statistics"])})
    order = list(by_key[0])
    if any(set(b) != set(order) for b in by_key[1:]):
        raise LomasError("the sites released different groups; their categories must agree")
    widths: dict[str, Any] = {}
    for name, (i, agg) in aggregates.items():
        site_aggs = [d["aggregates"][i] for d in docs]
        if agg["how"] == "avg":
            sums = [d for a, p in zip(site_aggs, plans) if (d := _draws(p, a["uses"][0])) is not None]
            counts = [d for a, p in zip(site_aggs, plans) if (d := _draws(p, a["uses"][1])) is not None]
            rounding = sum(_rounding(p, a["uses"][0]) for a, p in zip(site_aggs, plans))
            widths[name] = (half_width(sums, alpha / 2) + rounding, math.floor(half_width(counts, alpha / 2)))
        else:
            widths[name] = _linear_width(site_aggs, plans, alpha)
    rows, intervals = [], []
    for key in order:
        row: dict[str, Any] = dict(zip(keys, key))
        interval: dict[str, Any] = {}
        for name, (i, agg) in aggregates.items():
            site_aggs = [d["aggregates"][i] for d in docs]
            stats = [b[key] for b in by_key]
            row[name], interval[name] = _combined_value(agg, site_aggs, plans, stats, widths[name])
        rows.append({c: row[c] for c in columns})
        intervals.append({c: interval[c] for c in columns if c in interval})
    covers = {name: agg["covers"] + " (pooled over the sites)" for name, (_, agg) in aggregates.items()
              if agg.get("covers") and name in columns}
    for name, (_, agg) in aggregates.items():
        if agg["how"] == "avg" and name in covers:
            covers[name] += "; a conservative interval: the pooled sum's and count's 97.5% intervals together"
    return columns, keys, rows, intervals, covers


def _unit(plan: dict[str, Any], index: int) -> float:
    return float((plan["statistics"][index].get("noise") or {}).get("unit") or 1.0)


def _combined_value(agg: dict[str, Any], site_aggs: list[dict[str, Any]], plans: list[dict[str, Any]],
                    stats: list[list[Any]], width: Any) -> tuple[Any, list[Any]]:
    """One combined value and its interval; the value always lies inside its own interval."""
    if agg["how"] == "count":
        total = sum(int(s[a["uses"][0]]) for a, s in zip(site_aggs, stats))
        t = math.floor(width)  # an integer count with integer noise: |error| <= t exactly when <= floor(t)
        return max(total, 0), [max(total - t, 0), max(total + t, 0)]
    if agg["how"] in ("sum", "centred_sum"):
        total = 0.0
        for a, p, s in zip(site_aggs, plans, stats):
            total += sum(weight * s[index] * _unit(p, index) for index, weight in _linear_terms(a))
        low, high = total - width, total + width
        return total, [min(low, total), max(high, total)]
    # AVG: centre + pooled centred sum / pooled count, clipped to the bounds
    sum_width, count_width = width
    lo, hi = agg["bounds"]
    middle = agg["centre"]
    total = sum(s[a["uses"][0]] * _unit(p, a["uses"][0]) for a, p, s in zip(site_aggs, plans, stats))
    count = sum(int(s[a["uses"][1]]) for a, s in zip(site_aggs, stats))
    offset = min(max(total / count, lo - middle), hi - middle) if count > 0 else 0.0
    c_low, c_high = count - count_width, count + count_width
    if c_low <= 0:  # the pooled count may be zero: the bounds are all that is known
        low, high = lo - middle, hi - middle
    else:
        s_low, s_high = total - sum_width, total + sum_width
        low = min(s_low / c_low, s_low / c_high)
        high = max(s_high / c_low, s_high / c_high)
    low, high = max(min(low, offset), lo - middle), min(max(high, offset), hi - middle)
    return middle + offset, [middle + low, middle + high]


def release(sites: list[Site], dataset: str, sql: str | None, epsilon: float, delta: float = 0.0, *,
            query: dict[str, Any] | None = None, allow_partial: bool = False, fresh: bool = False
            ) -> FederatedRelease:
    """Preview at every site; release at each (its own charge) only if all can, or `allow_partial`; combine."""
    planned = preview(sites, dataset, sql, epsilon, delta, query)
    refused = planned.refused
    if refused and not allow_partial:
        reasons = "; ".join(f"{name}: {why}" for name, why in refused.items())
        raise LomasError(f"nothing was spent at any site: {reasons} (allow_partial / --allow-partial answers from "
                         "the others)")
    ready = [s for s in sites if s.name in planned.ready]
    if not ready:
        raise LomasError("no site can answer; nothing was spent: " + "; ".join(f"{n}: {w}" for n, w in refused.items()))

    def run(site: Site) -> SiteOutcome:
        outcome = planned.sites[site.name]
        before = (outcome.preview or {}).get("budget") or {}
        try:
            outcome.release = site.client.query(outcome.dataset, sql, epsilon, delta, fresh=fresh, query=query,
                                                table=dataset)
        except LomasError as err:
            outcome.problem = f"failed: {err}"
            try:  # what it charged anyway (a failure after the data was read is charged): its own ledger says
                after = site.client.budget(outcome.dataset)
                spent = after["epsilon_spent"] - before.get("epsilon_spent", after["epsilon_spent"])
                dspent = after["delta_spent"] - before.get("delta_spent", after["delta_spent"])
                if spent > 0 or dspent > 0:
                    outcome.charged = {"epsilon": spent, "delta": dspent}
            except LomasError:
                outcome.problem += " (its charge could not be read: see its budget)"
        return outcome

    _each(ready, run)
    return assemble(dataset, sql or "", planned.sites)


def assemble(dataset: str, sql: str, outcomes: dict[str, SiteOutcome]) -> FederatedRelease:
    """The combined answer from what each site did (also how lomas-verify rebuilds it from the receipts)."""
    answered = {name: o.release for name, o in outcomes.items() if o.release is not None}
    if not answered:
        raise LomasError("every site failed: " + "; ".join(f"{n}: {o.problem}" for n, o in outcomes.items()))
    columns, keys, rows, intervals, covers = combine(answered)
    notes = []
    missing = [name for name, o in outcomes.items() if o.release is None]
    if missing:
        notes.append(f"covers {', '.join(answered)} only; not {', '.join(missing)} ("
                     + "; ".join(f"{n}: {outcomes[n].problem}" for n in missing) + ")")
    return FederatedRelease(dataset, sql, columns, keys, rows, intervals, covers, outcomes,
                            complete=not missing, notes=notes)
