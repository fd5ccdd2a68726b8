"""Calibration and meaning: the least noise a budget allows, charged at OpenDP's own privacy map, and what
every released number is worth (its 95% interval, derived from the public plan, never from data)."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import opendp.prelude as dp
import polars as pl

from ..errors import QueryRejected
from .accuracy import (
    DISTRIBUTIONS,
    Noise,
    combined_half_width,
    quantile_rank_error,
    ratio_grid,
    ratio_interval,
)
from .expressions import derived_column
from .metadata import DatasetMetadata, effective_bounds, parse_metadata
from .polars_backend import build_plan, collect_release, input_domain
from .sql import Aggregate, QuerySpec
from .statistics import (
    PLAIN,
    QUANTILES,
    Recipe,
    Statistic,
    centre,
    fixed_point_step,
    plan_statistics,
    private_keys,
    quantile_candidates,
    statistic_name,
)

dp.enable_features("contrib")

ALPHA = 0.05

LAPLACE, GAUSSIAN = "laplace", "gaussian"
MECHANISM_NAMES = {
    "Integer Laplace": "Laplace (integer)",
    "Float Laplace": "Laplace",
    "Integer Gaussian": "Gaussian (integer)",
    "Float Gaussian": "Gaussian",
    "ExponentialMin": "Exponential (report noisy min)",
    "GumbelMin": "Exponential (Gumbel, report noisy min)",
}


# --- calibration: the least noise the budget allows, charged at its privacy map -------------------------------


@dataclass
class Calibrated:
    """A measurement ready to run: its mechanism, global noise scale and exact (epsilon, delta) charge."""

    mechanism: str  # LAPLACE (pure DP) | GAUSSIAN (zCDP, converted to (epsilon, delta))
    scale: float
    delta_target: float  # the delta the zCDP conversion is fixed at (0 for Laplace)
    base: Any  # the OpenDP polars measurement of all statistics (its summary names the noise)
    measurement: Any  # what is charged: base, or its parts composed; as (epsilon, delta) for zCDP
    epsilon: float
    delta: float
    parts: list[tuple[str, Any]]  # (kind, measurement) of each part that runs; their composition is charged
    group_by: tuple[str, ...] = ()
    choice: dict[str, Any] | None = None
    threshold: int | None = None  # private GROUP BY keys: a group is released when its noisy count reaches this

    def release(self, data: pl.LazyFrame) -> pl.DataFrame:
        """Run each part on the data, once (what `measurement` composes and charges): the released statistics,
        side by side. (The parts are invoked one by one: collecting the OnceFrames that OpenDP 0.16's composition
        returns crashes the process.)"""
        frames = [collect_release(part(data), kind) for kind, part in self.parts]
        if not self.group_by:
            return pl.concat(frames, how="horizontal")
        joined = frames[0]
        for frame in frames[1:]:
            joined = joined.join(frame, on=list(self.group_by), how="left", nulls_equal=True)
        return joined

    @functools.cached_property
    def summary(self) -> dict[str, dict[str, Any]]:
        """OpenDP's summary of the noise per statistic (distribution, scale), read once per measurement. Without
        alpha: OpenDP's own accuracy search for an integer Gaussian of a huge scale (a fixed-point sum) never
        returns; every accuracy here is computed in closed form or a bounded search by `accuracy`."""
        return summarize(self.base)


@functools.lru_cache(maxsize=512)
def rho_for(epsilon: float, delta: float) -> float:
    """Largest zCDP rho whose conversion to (epsilon, delta) by OpenDP's own combinator stays within epsilon.

    The conversion is a function of rho alone, so a one-parameter Gaussian measurement stands in for the
    query; the query's own converted map is checked afterwards."""
    gaussian = dp.m.make_gaussian(dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), scale=1.0)
    curve = dp.c.make_zCDP_to_approxDP(gaussian)

    def converted(rho: float) -> float:
        return float(curve.map(math.sqrt(2 * rho)).epsilon(delta))

    log_term = -math.log(delta)
    low = (math.sqrt(log_term + epsilon) - math.sqrt(log_term)) ** 2  # the classic bound: never above epsilon
    high = low * 2
    while converted(high) <= epsilon:
        low, high = high, high * 2
    while (high - low) > 1e-10 * low:
        mid = (low + high) / 2
        if converted(mid) <= epsilon:
            low = mid
        else:
            high = mid
    return low


@dataclass
class Plan:
    spec: QuerySpec
    metadata: DatasetMetadata
    bounds: dict[str, tuple[float, float]]
    statistics: list[Statistic] = field(init=False)
    recipes: list[Recipe] = field(init=False)
    steps: list[float | None] = field(init=False)  # per statistic: its fixed-point step, None if exact as is

    def __post_init__(self) -> None:
        if self.spec.derived:  # each derived value is one more column, bounded from its columns' bounds
            derived = tuple(derived_column(d.name, d.expression, self.metadata, self.bounds)
                            for d in self.spec.derived)
            self.metadata = dataclasses.replace(self.metadata, derived=derived)
            self.bounds = self.bounds | {c.name: c.bounds for c in derived if c.bounds}  # type: ignore[misc]
        self.statistics, self.recipes = plan_statistics(self.spec, self.metadata)
        self.steps = [fixed_point_step(stat, self.metadata, self.bounds) for stat in self.statistics]

    @classmethod
    def from_json(cls, spec: dict[str, Any], metadata: dict[str, Any], bounds: dict[str, Any] | None) -> Plan:
        meta = parse_metadata(metadata)
        return cls(QuerySpec.from_json(spec), meta, effective_bounds(meta, bounds))

    @property
    def private_keys(self) -> list[str]:
        return private_keys(self.spec, self.metadata)

    def base_measurement(self, scale: float, mechanism: str = LAPLACE, only: list[int] | None = None,
                         threshold: int | None = None) -> Any:
        measure = dp.max_divergence() if mechanism == LAPLACE else dp.zero_concentrated_divergence()
        if self.private_keys:  # the threshold's chance of releasing a group one row made is charged as delta
            measure = dp.approximate(measure)
            threshold = threshold or 2**30  # epsilon does not depend on it (threshold_for picks the real one)
        try:
            return dp.polars.make_private_lazyframe(
                input_domain(self.spec, self.metadata),
                dp.symmetric_distance(),
                measure,
                build_plan(self.spec, self.metadata, self.bounds, self.statistics, self.steps, only),
                global_scale=scale,
                threshold=threshold,
            )
        except dp.OpenDPException as err:
            raise QueryRejected(f"the DP engine refused the query: {_opendp_message(err)}") from None

    def threshold_for(self, scale: float, delta: float) -> int:
        """The least threshold whose delta (OpenDP's map at this scale) is within the delta offered: it falls as
        the threshold rises, so a doubling then a bisection over whole numbers finds it."""
        def delta_at(threshold: int) -> float:
            try:
                return self.cost(self.base_measurement(scale, threshold=threshold))[1]
            except dp.OpenDPException:  # a threshold too low for the privacy unit has no finite delta
                return math.inf

        low, high = 0, 1  # delta_at(low) > delta (or low is 0), delta_at(high) <= delta
        while delta_at(high) > delta:
            low, high = high, high * 2
            if high > 2**31:
                raise QueryRejected(f"no threshold keeps delta within {delta:g} at this epsilon; offer more delta")
        while high - low > 1:
            mid = (low + high) // 2
            if delta_at(mid) <= delta:
                high = mid
            else:
                low = mid
        return high

    @property
    def parts(self) -> list[tuple[str, list[int]]]:
        """Statistics that run together: (PLAIN, ...) and (QUANTILES, ...). Quantiles run apart: their plans hold
        functions polars cannot hand back for collect_release, and OpenDP draws their missing groups' scores on
        their own."""
        plain = [j for j, s in enumerate(self.statistics) if s.kind != "quantile"]
        quantiles = [j for j, s in enumerate(self.statistics) if s.kind == "quantile"]
        return [(kind, part) for kind, part in ((PLAIN, plain), (QUANTILES, quantiles)) if part]

    def measurement(self, scale: float, mechanism: str = LAPLACE, delta: float = 0.0
                    ) -> tuple[Any, Any, list[tuple[str, Any]], int | None]:
        """(base, charged, parts, threshold): the parts that run (each its own plan at the same scale) and their
        composition, which is charged (its loss is the sum of theirs, as the joint plan's is); a zCDP measurement
        is charged through OpenDP's conversion to (epsilon, delta). Private keys spend the delta on a threshold."""
        threshold = self.threshold_for(scale, delta) if self.private_keys else None
        if threshold is not None:  # one part: quantiles are refused with private keys (plan_statistics)
            base = self.base_measurement(scale, mechanism, threshold=threshold)
            return base, base, [(PLAIN, base)], threshold
        base = self.base_measurement(scale, mechanism)
        split = self.parts
        if len(split) == 1:
            parts, composed = [(split[0][0], base)], base
        else:
            parts = [(kind, self.base_measurement(scale, mechanism, only)) for kind, only in split]
            composed = dp.c.make_composition([m for _, m in parts])
        if mechanism == LAPLACE:
            return base, composed, parts, None
        return base, dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(composed), delta), parts, None

    def cost(self, measurement: Any) -> tuple[float, float]:
        loss = measurement.map(self.metadata.privacy_unit)
        return (float(loss[0]), float(loss[1])) if isinstance(loss, tuple) else (float(loss), 0.0)

    def at_scale(self, scale: float, mechanism: str = LAPLACE, delta: float = 0.0) -> Calibrated:
        base, charged, parts, threshold = self.measurement(scale, mechanism, delta)
        epsilon, spent_delta = self.cost(charged)
        return Calibrated(mechanism, scale, delta, base, charged, epsilon, spent_delta, parts,
                          tuple(self.spec.group_by), threshold=threshold)

    def calibrate(self, epsilon: float, delta: float = 0.0) -> Calibrated:
        """The least noise within (epsilon, delta): Laplace under pure DP and, when delta > 0 is offered,
        Gaussian under zCDP converted to (epsilon, delta); whichever adds less noise (RMSE). With private GROUP BY
        keys, Laplace noise and a threshold that spends the delta."""
        if self.private_keys:
            return self._calibrate_threshold(epsilon, delta)
        laplace = self.calibrate_mechanism(LAPLACE, epsilon)
        if delta <= 0:
            return laplace
        try:
            gaussian = self.calibrate_mechanism(GAUSSIAN, epsilon, delta)
        except (dp.OpenDPException, QueryRejected, ArithmeticError, ValueError):
            # e.g. a delta so small that no finite noise converts within epsilon: Laplace needs no delta
            laplace.choice = {"mechanism": LAPLACE, "gaussian_to_laplace_noise": None,
                              "reason": f"no Gaussian noise fits (ε, δ={delta:g}); Laplace is kept and no δ is spent"}
            return laplace
        ratio = noise_ratio(gaussian.summary, laplace.summary)
        chosen = gaussian if ratio < 1 else laplace
        parts = len(self.statistics)
        chosen.choice = {
            "mechanism": chosen.mechanism,
            "gaussian_to_laplace_noise": ratio,
            "reason": (
                f"Gaussian noise under zCDP (converted to (ε, δ={delta:g})) is {ratio:.2f}x Laplace's for "
                f"this query's {parts} noisy statistic{'s' if parts > 1 else ''}"
                + ("; it spends δ" if chosen is gaussian else "; Laplace is kept and no δ is spent")
            ),
        }
        return chosen

    def _calibrate_threshold(self, epsilon: float, delta: float) -> Calibrated:
        keys = ", ".join(self.private_keys)
        if delta <= 0:
            raise QueryRejected(
                f"GROUP BY {keys}: {keys} has no public category list, so which groups exist is private. They can "
                "be released only where a noisy count clears a threshold, which costs delta: pass a delta > 0 "
                "(e.g. delta=1e-6, or --delta 1e-6)")
        calibrated = self.calibrate_mechanism(LAPLACE, epsilon, delta)
        calibrated.choice = {
            "mechanism": LAPLACE, "gaussian_to_laplace_noise": None, "threshold": calibrated.threshold,
            "reason": (f"GROUP BY {keys} has no public categories: Laplace noise, and only the groups whose noisy "
                       f"count is at least {calibrated.threshold:,} are released; that threshold spends "
                       f"δ={calibrated.delta:.3g}"),
        }
        return calibrated

    def calibrate_mechanism(self, mechanism: str, epsilon: float, delta: float = 0.0) -> Calibrated:
        """Pure-DP loss is proportional to 1/scale and zCDP's rho to 1/scale^2, so one build at scale 1 gives
        the answer in closed form; float rounding terms can leave it a hair above target, so we verify and
        nudge upward."""
        at_unit = self.cost(self.base_measurement(1.0, mechanism))[0]  # a threshold changes delta, not epsilon
        if mechanism == LAPLACE:
            scale = at_unit / epsilon
        else:
            scale = math.sqrt(at_unit / rho_for(epsilon, delta))
        step = 1e-12
        for _ in range(200):
            calibrated = self.at_scale(scale, mechanism, delta)
            if calibrated.epsilon <= epsilon and calibrated.delta <= delta:
                return calibrated
            scale *= 1 + step
            step *= 2
        raise QueryRejected("could not calibrate noise for this epsilon")  # pragma: no cover

    # --- what the answer means --------------------------------------------------------------------------

    def describe(self, calibrated: Calibrated) -> dict[str, Any]:
        """The public plan: each released statistic with its noise, and each output aggregate with how it is
        computed, its 95% accuracy, and what its interval covers."""
        summary = calibrated.summary
        released = []
        for j in range(len(self.statistics)):
            row = summary[statistic_name(j)]
            noise, unit = _noise(row), self._unit(j)
            released.append({
                "statistic": self._label(j),
                "mechanism": MECHANISM_NAMES.get(row["distribution"], row["distribution"]),
                "scale": row["scale"] * unit,
                "accuracy": noise.half_width(ALPHA) * unit + self._rounding(j) if noise else None,
                "fixed_point_step": self.steps[j],
                # machine-readable, for a notebook combining releases of several sites: the noise on the row's
                # released number (in its own units), what one unit is worth, and how far rounding can move it
                **({"noise": {"family": noise.family, "discrete": noise.discrete, "scale": noise.scale,
                              "unit": unit}, "rounding": self._rounding(j)} if noise else {}),
            })
        aggregates = [self._describe_aggregate(agg, recipe, released, summary)
                      for agg, recipe in zip(self.spec.aggregates, self.recipes)]
        described = {
            "mechanism": calibrated.mechanism,
            "scale": calibrated.scale,
            "choice": calibrated.choice,
            "statistics": released,
            "aggregates": aggregates,
        }
        if calibrated.threshold is not None:
            described["threshold"] = {
                "keys": self.private_keys, "threshold": calibrated.threshold, "delta": calibrated.delta,
                "note": (f"groups of {', '.join(self.private_keys)} whose noisy count was below "
                         f"{calibrated.threshold:,} are suppressed (not released); the groups released are those of "
                         "the data with a noisy count at or above it"),
            }
        return described

    def _unit(self, j: int) -> float:
        """What one unit of statistic j's released number is worth: 1, or its fixed-point step."""
        return self.steps[j] or 1.0

    def _in_units(self, value: Any, j: int) -> Any:
        """Statistic j's released number in the column's units (an exact integer stays one)."""
        step = self.steps[j]
        return value * step if step else value

    def _rounding(self, j: int) -> float:
        """The most by which fixed-point rounding can move statistic j's sum (public: max_rows steps)."""
        step = self.steps[j]
        return self.metadata.max_rows * step if step else 0.0

    def _label(self, j: int) -> str:
        stat, step = self.statistics[j], self.steps[j]
        name = self.spec.label(stat.column)
        rounded = f", in steps of {step:g}" if step else ""
        if stat.kind == "rows":
            return "COUNT(*)"
        if stat.kind == "count":
            return f"COUNT({name})"
        if stat.kind == "distinct":
            return f"COUNT(DISTINCT {name})"
        lo, hi = self.bounds[stat.column]  # type: ignore[index]
        if stat.kind == "sum":
            return f"SUM({name}) clipped to [{lo:g}, {hi:g}]{rounded}"
        if stat.kind == "centred_sum":
            col = self.metadata.column(stat.column)  # type: ignore[arg-type]
            return f"SUM({name} - {centre(col, self.bounds):g}) clipped to [{lo:g}, {hi:g}]{rounded}"  # type: ignore[arg-type]
        if stat.kind == "centred_sumsq":
            col = self.metadata.column(stat.column)  # type: ignore[arg-type]
            return f"SUM(({name} - {centre(col, self.bounds):g})^2), {name} clipped to [{lo:g}, {hi:g}]"  # type: ignore[arg-type]
        return f"PERCENTILE({stat.quantile:g}) of {name}"

    def _describe_aggregate(self, agg: Aggregate, recipe: Recipe, released: list[dict[str, Any]],
                            summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
        name = self.spec.label(agg.column)  # a derived value's expression, as written
        info: dict[str, Any] = {"name": agg.alias, "kind": agg.kind, "column": name, "alpha": ALPHA}
        if agg.quantile is not None:
            info["quantile"] = agg.quantile
        parts = [released[j] for j in recipe.uses]
        info["statistics"] = [p["statistic"] for p in parts]
        info["uses"], info["how"] = list(recipe.uses), recipe.how  # which released statistics, combined how
        if recipe.how in ("centred_sum", "avg", "var"):
            info["centre"] = float(centre(self.metadata.column(agg.column), self.bounds))  # type: ignore[arg-type]
        info["derived"] = recipe.how in ("centred_sum", "avg", "var")
        info["mechanism"] = ", ".join(dict.fromkeys(p["mechanism"] for p in parts))
        scales = [p["scale"] for p in parts]
        info["scale"] = scales[0] if len(parts) == 1 else dict(zip(("sum", "count", "sum_of_squares"), scales))
        bounds = self.bounds.get(agg.column) if agg.column else None  # type: ignore[arg-type]
        info["bounds"] = list(bounds) if bounds and agg.kind not in ("count", "count_star") else None
        clipped = f", each value clipped to [{bounds[0]:g}, {bounds[1]:g}]" if bounds else ""
        step = self.steps[recipe.uses[0]]
        if step:
            clipped += f" (summed in steps of {step:g}; the interval allows for that rounding)"
        if recipe.how == "count":
            info["accuracy"] = parts[0]["accuracy"]
            info["covers"] = ("the number of rows" if agg.kind == "count_star"
                              else f"the number of distinct non-null values of {name}" if agg.kind == "count_distinct"
                              else f"the number of non-null values of {name}")
        elif recipe.how == "sum":
            info["accuracy"] = parts[0]["accuracy"]
            info["covers"] = f"the sum of non-null {name}{clipped}"
        elif recipe.how == "centred_sum":
            col = self.metadata.column(agg.column)  # type: ignore[arg-type]
            total, count = (_noise(summary[statistic_name(j)]) for j in recipe.uses)
            unit = self._unit(recipe.uses[0])
            middle = centre(col, self.bounds)  # type: ignore[arg-type]
            info["accuracy"] = combined_half_width(total, count, middle / unit, ALPHA) * unit \
                + self._rounding(recipe.uses[0])  # type: ignore[arg-type]
            info["covers"] = f"the sum of non-null {name}{clipped}"
        elif recipe.how == "avg":
            info["accuracy"] = None  # it depends on the group's count: each interval is computed per group
            info["covers"] = f"the mean of non-null {name}{clipped}"
        elif recipe.how == "var":
            info["accuracy"] = None  # per group, from its count
            # a union bound: each of the three noisy statistics within its 1 - alpha/3 half-width
            info["part_accuracy"] = [_noise(summary[statistic_name(j)]).half_width(ALPHA / 3) * self._unit(j)  # type: ignore[union-attr]
                                     + self._rounding(j) for j in recipe.uses]
            what = ("variance" if agg.kind.startswith("var") else "standard deviation")
            sample = "sample" if agg.kind.endswith("samp") else "population"
            info["covers"] = (f"the {sample} {what} of non-null {name}{clipped}; a conservative interval "
                              "(each of its three noisy statistics within its 98.3% range)")
        else:
            col = self.metadata.column(agg.column)  # type: ignore[arg-type]
            candidates = quantile_candidates(col, self.bounds)  # type: ignore[arg-type]
            rows = quantile_rank_error(parts[0]["scale"], len(candidates), agg.quantile, ALPHA,  # type: ignore[arg-type]
                                       self.metadata.max_rows)
            info["accuracy"] = None
            info["rank_error_rows"] = rows
            info["candidates"] = len(candidates)
            info["covers"] = (
                f"the rank of the value among non-null {name}: with 95% confidence it is within "
                f"{rows:,.1f} rows of the requested position, beyond the best of the {len(candidates)} "
                f"candidates over [{candidates[0]:g}, {candidates[-1]:g}]"
            )
        return info

    def _spread(self, i: int, values: list[Any], info: dict[str, Any]) -> tuple[Any, Any]:
        """VAR/STDDEV from (S1, C, S2), clamped to what the bounds allow, with a conservative interval."""
        agg = self.spec.aggregates[i]
        uses = self.recipes[i].uses
        s1, count, s2 = self._in_units(values[0], uses[0]), values[1], self._in_units(values[2], uses[2])
        lo, hi = self.bounds[agg.column]  # type: ignore[index]
        sample = agg.kind.endswith("samp")
        largest = ((hi - lo) / 2) ** 2 * (2 if sample else 1)  # n/(n-1) <= 2 for n >= 2
        if count >= (2 if sample else 1):
            variance = s2 / count - (s1 / count) ** 2
            if sample:
                variance *= count / (count - 1)
        else:
            variance = largest / 2  # too few values to say: the middle of what is possible
        variance = min(max(variance, 0.0), largest)
        a1, ac, a2 = info["part_accuracy"]
        box = _spread_range((s1 - a1, s1 + a1), (max(count - ac, 0), count + ac), (s2 - a2, s2 + a2), sample)
        low, high = (0.0, largest) if box is None else (max(box[0], 0.0), min(box[1], largest))
        low, high = min(low, variance), max(high, variance)
        if agg.kind.startswith("stddev"):
            return math.sqrt(variance), [math.sqrt(low), math.sqrt(high)]
        return variance, [low, high]

    def interval_tables(self, calibrated: Calibrated) -> list[Any]:
        """Per aggregate, the data-free part of its interval (a pivot grid for AVG), computed once per plan."""
        summary = calibrated.summary
        tables: list[Any] = []
        for agg, recipe in zip(self.spec.aggregates, self.recipes):
            if recipe.how != "avg":
                tables.append(None)
                continue
            col = self.metadata.column(agg.column)  # type: ignore[arg-type]
            lo, hi = self.bounds[agg.column]  # type: ignore[index]
            middle = centre(col, self.bounds)  # type: ignore[arg-type]
            total, count = (_noise(summary[statistic_name(j)]) for j in recipe.uses)
            unit = self._unit(recipe.uses[0])  # the grid is in the released sum's own units
            tables.append(ratio_grid(total, count, (lo - middle) / unit, (hi - middle) / unit, ALPHA))  # type: ignore[arg-type]
        return tables

    def postprocess(self, raw: pl.DataFrame, described: dict[str, Any], tables: list[Any]) -> dict[str, Any]:
        """Released statistics -> the user's columns, each value with the 95% interval of what it covers."""
        records = raw.to_dicts()
        if self.private_keys:  # no public order: by value, NULL last (the order OpenDP returns them in is shuffled)
            records.sort(key=lambda r: tuple((r[k] is None, "" if r[k] is None else r[k]) for k in self.spec.group_by))
        else:
            order = {k: {v: n for n, v in enumerate(self.metadata.column(k).group_keys)} for k in self.spec.group_by}  # type: ignore[union-attr]
            records.sort(key=lambda r: tuple(order[k].get(r[k], len(order[k])) for k in self.spec.group_by))
        rows, intervals, statistics = [], [], []
        for record in records:
            # the released statistics themselves (each row's noisy numbers, in their own units): everything
            # else is computed from them, and several sites' answers combine from them
            statistics.append([record[statistic_name(j)] for j in range(len(self.statistics))])
            row: dict[str, Any] = {}
            interval: dict[str, Any] = {}
            # every aggregate is used by an output or an expression: each is computed once
            computed = [self._value(i, [record[statistic_name(j)] for j in recipe.uses], described["aggregates"][i],
                                    tables[i]) for i, recipe in enumerate(self.recipes)]
            for output in self.spec.outputs:
                if output.key is not None:
                    row[output.name] = record[output.key]
                elif output.expression is not None:
                    row[output.name], interval[output.name] = derived_value(output.expression, computed)
                else:
                    assert output.aggregate is not None
                    row[output.name], interval[output.name] = computed[output.aggregate]
            rows.append(row)
            intervals.append(interval)
        derived = {o.name: derived_note(o.expression, self.spec) for o in self.spec.outputs if o.expression}
        return {"columns": [o.name for o in self.spec.outputs], "rows": rows, "intervals": intervals,
                "statistics": statistics, "keys": [o.name for o in self.spec.outputs if o.key is not None],
                **({"derived": derived} if derived else {})}

    def _value(self, i: int, values: list[Any], info: dict[str, Any], table: Any) -> tuple[Any, Any]:
        """(value, [low, high]): the value always lies inside its own interval."""
        agg, how = self.spec.aggregates[i], self.recipes[i].how
        if how == "count":
            (noisy,) = values
            acc = int(info["accuracy"])  # integer noise on an integer count
            return max(noisy, 0), [max(noisy - acc, 0), max(noisy + acc, 0)]
        if how == "quantile":
            return values[0], None
        if how == "var":
            return self._spread(i, values, info)
        col = self.metadata.column(agg.column)  # type: ignore[arg-type]
        is_int = col.type == "int"  # type: ignore[union-attr]
        first = self.recipes[i].uses[0]
        if how in ("sum", "centred_sum"):
            value = self._in_units(values[0], first)
            if how == "centred_sum":
                value += centre(col, self.bounds) * values[1]  # type: ignore[arg-type]
            acc = info["accuracy"]
            low, high = value - acc, value + acc
            if is_int:  # the true sum is a whole number: round the interval inward, onto whole numbers
                low, high = math.ceil(low), math.floor(high)
            # What the bounds make possible (public): a sum of values clipped to [lo, hi] over at most max_rows
            # rows lies in [min(lo, 0), max(hi, 0)] x max_rows. Clipping to it loses no coverage (the truth is
            # inside), as counts are clipped at 0; the value stays inside its own interval.
            lo, hi = self.bounds[agg.column]  # type: ignore[index]
            floor, ceiling = min(lo, 0) * self.metadata.max_rows, max(hi, 0) * self.metadata.max_rows
            value = min(max(value, floor), ceiling)
            return value, [min(max(low, floor), value), max(min(high, ceiling), value)]
        # AVG
        total, count = values
        lo, hi = self.bounds[agg.column]  # type: ignore[index]
        middle = float(centre(col, self.bounds))  # type: ignore[arg-type]
        unit = self._unit(first)
        offset = min(max(total * unit / count, lo - middle), hi - middle) if count > 0 else 0.0
        plausible = ratio_interval(total, count, table)
        # fixed-point rounding moves each value, hence the mean, by at most one step
        slack = self.steps[first] or 0.0
        low, high = (plausible[0] * unit - slack, plausible[1] * unit + slack) if plausible else (offset, offset)
        low, high = max(min(low, offset), lo - middle), min(max(high, offset), hi - middle)
        return middle + offset, [middle + low, middle + high]


def _spread_range(s1: tuple[float, float], count: tuple[float, float], s2: tuple[float, float],
                  sample: bool) -> tuple[float, float] | None:
    """The range of the variance S2/C - (S1/C)^2 (times C/(C-1) for the sample variance) over a box of
    plausible (S1, C, S2), by interval arithmetic; None when the box allows fewer than two values."""
    c_low, c_high = count
    if c_low < (2 if sample else 1):
        return None
    means = [a / b for a in s1 for b in count]
    mean_sq_low = 0.0 if min(means) <= 0 <= max(means) else min(m * m for m in means)
    mean_sq_high = max(m * m for m in means)
    low = max(s2[0], 0.0) / c_high - mean_sq_high
    high = s2[1] / c_low - mean_sq_low
    if sample:
        low, high = low * c_high / (c_high - 1), high * c_low / (c_low - 1)
    return low, high


def _evaluate(tree: dict[str, Any], values: list[Any]) -> Any:
    if "const" in tree:
        return tree["const"]
    if "agg" in tree:
        return values[tree["agg"]]
    left, right = (_evaluate(a, values) for a in tree["args"])
    if left is None or right is None:
        return None
    if tree["op"] == "/":
        return None if right == 0 else left / right
    return {"+": left + right, "-": left - right, "*": left * right}[tree["op"]]


def _affine(tree: dict[str, Any]) -> tuple[int, float, float] | None:
    """(i, a, b) when the expression is a * aggregate_i + b (one aggregate, constants otherwise), else None."""
    if "agg" in tree:
        return tree["agg"], 1.0, 0.0
    if "const" in tree:
        return None
    left, right = tree["args"]
    op = tree["op"]
    if "const" in right:
        inner, c = _affine(left), right["const"]
        if inner is None:
            return None
        i, a, b = inner
        if op == "/":
            return (i, a / c, b / c) if c != 0 else None
        return {"+": (i, a, b + c), "-": (i, a, b - c), "*": (i, a * c, b * c)}[op]
    if "const" in left:
        inner, c = _affine(right), left["const"]
        if inner is None or op == "/":  # c / aggregate is not affine
            return None
        i, a, b = inner
        return {"+": (i, a, c + b), "-": (i, -a, c - b), "*": (i, a * c, b * c)}[op]
    return None


def derived_value(tree: dict[str, Any], computed: list[tuple[Any, Any]]) -> tuple[Any, Any]:
    """(value, interval) of arithmetic on released aggregates: an affine function of one aggregate carries its
    interval exactly (a monotone map of an interval that covers at 95% still covers at 95%); anything else
    (a ratio of two noisy values, say) has no interval of its own."""
    value = _evaluate(tree, [value for value, _ in computed])
    affine = _affine(tree)
    if affine is None or value is None:
        return value, None
    i, a, b = affine
    bounds = computed[i][1]
    if not bounds:
        return value, None
    ends = sorted((a * bounds[0] + b, a * bounds[1] + b))
    return value, [min(ends[0], value), max(ends[1], value)]


def derived_note(tree: dict[str, Any], spec: QuerySpec) -> str:
    used = sorted({spec.aggregates[i].alias.lstrip("_") for i in _aggregates_in(tree)})
    if _affine(tree) is not None:
        return f"computed from the released {used[0]}; its 95% interval follows the arithmetic exactly"
    return (f"computed from the released {', '.join(used)} after release (free); no 95% interval: one cannot be "
            "derived honestly from several noisy values this way")


def _aggregates_in(tree: dict[str, Any]) -> set[int]:
    if "agg" in tree:
        return {tree["agg"]}
    return set().union(*(_aggregates_in(a) for a in tree.get("args", [])))


def _noise(row: dict[str, Any]) -> Noise | None:
    if row["distribution"] not in DISTRIBUTIONS:
        return None  # a quantile's selection noise: its accuracy is stated in rows, not as an interval
    return Noise.from_summary(row["distribution"], row["scale"])


def noise_ratio(g: dict[str, dict[str, Any]], lap: dict[str, dict[str, Any]]) -> float:
    """How much noise the Gaussian plan adds relative to the Laplace one (their summaries): the geometric mean,
    over the released statistics, of the ratio of their standard deviations (RMSE; of selection scales for
    quantiles)."""
    logs = []
    for name, row in lap.items():
        a, b = _noise(g[name]), _noise(row)
        ratio = a.std() / b.std() if a and b and b.std() > 0 else g[name]["scale"] / row["scale"]
        logs.append(math.log(max(ratio, 1e-300)))
    return math.exp(sum(logs) / len(logs))


def summarize(measurement: Any, alpha: float | None = None) -> dict[str, dict[str, Any]]:
    frame = dp.summarize_polars_measurement(measurement, alpha=alpha)
    return {row["column"]: row for row in frame.to_dicts()}


def _opendp_message(err: Exception) -> str:
    text = getattr(err, "message", None) or str(err)
    text = text.strip().splitlines()[0] if text.strip() else "unknown reason"
    return text[:300]
