"""The DP engine: query spec + public metadata -> OpenDP measurement -> release.

Plain Python, no Jupyter. The plan is always built here, on an empty frame with the dataset's schema, from a
spec that `sql.compile_sql` produced; bounds, candidates and key sets come from metadata. The functions at the
bottom (`preview_task`, `release_task`) are what worker processes run.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import opendp.prelude as dp
import polars as pl

from .accuracy import (
    DISTRIBUTIONS,
    Noise,
    combined_half_width,
    quantile_rank_error,
    ratio_grid,
    ratio_interval,
)
from .errors import BadRequest, DatasetUnavailable, QueryRejected
from .metadata import ColumnMetadata, DatasetMetadata, parse_metadata
from .sql import Aggregate, QuerySpec
from .workers import note_data_access

dp.enable_features("contrib")
# The service itself collects each release's plan, once, with its own optimisation flags (see collect_release):
# OpenDP's OnceFrame.collect would let polars merge the noise of missing groups.
dp.enable_features("honest-but-curious")

ALPHA = 0.05
POLARS_TYPES: dict[str, pl.DataType] = {
    "int": pl.Int64(),
    "float": pl.Float64(),
    "string": pl.String(),
    "bool": pl.Boolean(),
}
LAPLACE, GAUSSIAN = "laplace", "gaussian"
PLAIN, QUANTILES = "plain", "quantiles"  # the parts a plan runs in (Plan.parts)
MECHANISM_NAMES = {
    "Integer Laplace": "Laplace (integer)",
    "Float Laplace": "Laplace",
    "Integer Gaussian": "Gaussian (integer)",
    "Float Gaussian": "Gaussian",
    "ExponentialMin": "Exponential (report noisy min)",
    "GumbelMin": "Exponential (Gumbel, report noisy min)",
}


def polars_schema(metadata: DatasetMetadata) -> pl.Schema:
    return pl.Schema({c.name: POLARS_TYPES[c.type] for c in metadata.columns})


def effective_bounds(
    metadata: DatasetMetadata, overrides: dict[str, Any] | None
) -> dict[str, tuple[float, float]]:
    """Metadata bounds, narrowed (never widened) by the user's overrides."""
    bounds = {c.name: c.bounds for c in metadata.columns if c.bounds is not None}
    for name, raw in (overrides or {}).items():
        col = metadata.column(name)
        if col is None:
            raise BadRequest(f"bounds: unknown column '{name}'")
        if col.bounds is None:
            raise BadRequest(f"bounds: column '{name}' has no public bounds to narrow")
        if (
            not isinstance(raw, (list, tuple))
            or len(raw) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)
        ):
            raise BadRequest(f"bounds for '{name}' must be [lower, upper]")
        lo, hi = raw
        meta_lo, meta_hi = col.bounds
        if not (meta_lo <= lo < hi <= meta_hi):
            raise BadRequest(
                f"bounds for '{name}' may only narrow the public bounds [{meta_lo}, {meta_hi}], "
                "with lower below upper"
            )
        if col.type == "int":
            if not (float(lo).is_integer() and float(hi).is_integer()):
                raise BadRequest(f"bounds for int column '{name}' must be whole numbers")
            lo, hi = int(lo), int(hi)
        else:
            lo, hi = float(lo), float(hi)
        bounds[name] = (lo, hi)
    return bounds


def _balanced(exprs: list[pl.Expr], combine: Callable[[pl.Expr, pl.Expr], pl.Expr]) -> pl.Expr:
    """Combine many conditions as a balanced tree: depth log2(n), so long IN lists or OR chains never nest
    deeply in polars or OpenDP."""
    while len(exprs) > 1:
        paired = [combine(exprs[i], exprs[i + 1]) for i in range(0, len(exprs) - 1, 2)]
        exprs = paired + ([exprs[-1]] if len(exprs) % 2 else [])
    return exprs[0]


def _predicate(node: dict[str, Any]) -> pl.Expr:
    op = node["op"]
    if op == "and":
        return _balanced([_predicate(a) for a in node["args"]], lambda a, b: a & b)
    if op == "or":
        return _balanced([_predicate(a) for a in node["args"]], lambda a, b: a | b)
    if op == "not":
        return ~_predicate(node["arg"])
    col = pl.col(node["column"])
    if op == "cmp":
        value = node["value"]
        return {
            "==": col == value,
            "!=": col != value,
            ">": col > value,
            ">=": col >= value,
            "<": col < value,
            "<=": col <= value,
        }[node["cmp"]]
    if op == "in":  # OpenDP 0.16 has no is_in: an OR of equalities is the same filter
        return _balanced([col == value for value in node["values"]], lambda a, b: a | b)
    if op == "between":
        return (col >= node["low"]) & (col <= node["high"])
    if op == "is_null":
        return col.is_not_null() if node["negate"] else col.is_null()
    raise QueryRejected(f"unknown predicate {op}")  # specs come from compile_sql; defensive only


# --- what a query releases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Statistic:
    """One noisy number per group that a plan releases. Aggregates are computed from these, so a statistic two
    aggregates need (the count behind COUNT(x) and AVG(x), say) is released, and paid for, once."""

    kind: str  # rows | count | sum | centred_sum | quantile
    column: str | None = None
    quantile: float | None = None


@dataclass(frozen=True)
class Recipe:
    """How one output aggregate is computed from released statistics (indices into Plan.statistics)."""

    how: str  # count | sum | centred_sum | avg | quantile
    uses: tuple[int, ...]


def centre(col: ColumnMetadata, bounds: dict[str, tuple[float, float]]) -> float:
    """The middle of the bounds (a whole number for int columns, so their sums stay exact integers)."""
    lo, hi = bounds[col.name]
    return (int(lo) + int(hi)) // 2 if col.type == "int" else (lo + hi) / 2


def plan_statistics(spec: QuerySpec, metadata: DatasetMetadata) -> tuple[list[Statistic], list[Recipe]]:
    """The fewest statistics that answer every aggregate, and how each aggregate is derived from them.

    AVG(x) = c + S/C with S the sum of (x - c) over non-null x, c the centre of the bounds, C the count of
    non-null x: S's sensitivity is half the width of the bounds. When C is released anyway (COUNT(x) or AVG(x)
    in the same query, or COUNT(*) for a column without nulls), SUM(x) = S + c C costs no extra statistic and
    its noise is never larger than a direct sum's: sqrt(half_width^2 + c^2) <= max(|lo|, |hi|) per unit scale.
    """
    statistics: list[Statistic] = []

    def use(stat: Statistic) -> int:
        if stat not in statistics:
            statistics.append(stat)
        return statistics.index(stat)

    def count_of(column: str) -> Statistic:
        col = metadata.column(column)
        assert col is not None
        return Statistic("count", column) if col.nullable else Statistic("rows")

    counted = {count_of(a.column) for a in spec.aggregates if a.kind in ("count", "avg") and a.column}
    if any(a.kind == "count_star" for a in spec.aggregates):
        counted.add(Statistic("rows"))
    recipes = []
    for agg in spec.aggregates:
        if agg.kind == "count_star":
            recipes.append(Recipe("count", (use(Statistic("rows")),)))
            continue
        assert agg.column is not None
        if agg.kind == "count":
            recipes.append(Recipe("count", (use(count_of(agg.column)),)))
        elif agg.kind == "avg" or (agg.kind == "sum" and count_of(agg.column) in counted):
            parts = (use(Statistic("centred_sum", agg.column)), use(count_of(agg.column)))
            recipes.append(Recipe("avg" if agg.kind == "avg" else "centred_sum", parts))
        elif agg.kind == "sum":
            recipes.append(Recipe("sum", (use(Statistic("sum", agg.column)),)))
        elif agg.kind == "quantile":
            recipes.append(Recipe("quantile", (use(Statistic("quantile", agg.column, agg.quantile)),)))
        else:  # pragma: no cover - specs come from compile_sql
            raise QueryRejected(f"unknown aggregate {agg.kind}")
    return statistics, recipes


def _statistic_name(j: int) -> str:
    return f"__s{j}"


def _statistic_expr(stat: Statistic, metadata: DatasetMetadata, bounds: dict[str, tuple[float, float]],
                    step: float | None, where: dict[str, Any] | None = None) -> pl.Expr:
    """The OpenDP expression of one statistic. A WHERE is a 0/1 mask over every row (never a filter), so the
    engine does the same work whatever the condition matches: its time says nothing about the data."""
    mask = _mask(where)
    if stat.kind == "rows":
        return dp.len(signed=True) if mask is None else mask.dp.sum((0, 1))
    col = metadata.column(stat.column)  # type: ignore[arg-type]
    assert col is not None
    c = pl.col(col.name)
    if stat.kind == "count":  # non-null values, as SQL's COUNT(x)
        return c.dp.count(signed=True) if mask is None else (c.is_not_null().cast(pl.Int64) * mask).dp.sum((0, 1))
    number = int if col.type == "int" else float

    def masked(values: pl.Expr) -> pl.Expr:
        return values if mask is None else values * mask.cast(POLARS_TYPES[col.type] if step is None else pl.Int64)

    if step is not None:
        return _fixed_point_sum(c, stat, col, bounds, step, masked)
    if stat.kind == "sum":
        # SQL SUM ignores nulls: clip to the bounds, then a null adds 0; the sum's bounds include 0, which
        # keeps the sensitivity at max(|lo|, |hi|)
        lo, hi = (number(b) for b in bounds[col.name])
        zero = number(0)
        return masked(c.clip(lo, hi).fill_null(zero)).dp.sum((min(lo, zero), max(hi, zero)))
    if stat.kind == "centred_sum":  # the centre lies inside the bounds, so a masked-out 0 is inside them too
        lo, hi = (number(b) for b in bounds[col.name])
        middle = number(centre(col, bounds))
        return masked((c - middle).fill_null(number(0))).dp.sum((lo - middle, hi - middle))
    if stat.kind == "quantile":
        # OpenDP 0.16 has no conditional expression, so a quantile's WHERE is an expression-level filter: its
        # scoring work follows the rows matched (the README says what that means for timing)
        values = c if where is None else c.filter(_predicate(where))
        return values.drop_nulls().dp.quantile(stat.quantile, _candidates(col, bounds))
    raise QueryRejected(f"unknown statistic {stat.kind}")  # pragma: no cover


def _mask(where: dict[str, Any] | None) -> pl.Expr | None:
    """1 where the WHERE holds, 0 where it is false or unknown (NULL), as SQL keeps only true rows."""
    return None if where is None else _predicate(where).cast(pl.Int64).fill_null(0)


FIXED_POINT_ABOVE = 1.01  # use fixed point when OpenDP's float rounding term would add more than 1% noise


@functools.lru_cache(maxsize=1024)
def float_sum_inflation(max_rows: int, lo: float, hi: float) -> float:
    """OpenDP's float-sum noise relative to an exact sum's (max(|lo|, |hi|)): its rounding term grows with
    max_rows, e.g. 1.0 up to 1e6 rows, 5.4x at 1e8 and 445x at 1e9."""
    domain = dp.lazyframe_domain([dp.series_domain("v", dp.option_domain(dp.atom_domain(T="f64")))])
    domain = dp.with_margin(domain, dp.polars.Margin(by=[], max_length=max_rows))
    plan = pl.LazyFrame(schema={"v": pl.Float64}).select(pl.col("v").fill_null(0.0).dp.sum((lo, hi)))
    measurement = dp.polars.make_private_lazyframe(domain, dp.symmetric_distance(), dp.max_divergence(), plan,
                                                   global_scale=1.0)
    (row,) = dp.summarize_polars_measurement(measurement).to_dicts()
    return float(row["scale"]) / max(abs(lo), abs(hi))


def _sum_range(stat: Statistic, col: ColumnMetadata, bounds: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """The range a sum statistic's terms take: the bounds with 0 added, or centred on the bounds' middle."""
    lo, hi = bounds[col.name]
    if stat.kind == "centred_sum":
        middle = centre(col, bounds)
        return lo - middle, hi - middle
    return min(lo, 0), max(hi, 0)


def fixed_point_step(stat: Statistic, metadata: DatasetMetadata, bounds: dict[str, tuple[float, float]]) -> float | None:
    """For a float sum that OpenDP's rounding term would make noisier: the step (a power of two) its values are
    rounded to so they can be summed exactly as integers. Chosen as fine as i64 allows for max_rows values
    (and 2^40 per value, where float64 still rounds exactly); None where a float sum is as good."""
    col = metadata.column(stat.column) if stat.column else None
    if col is None or col.type != "float" or stat.kind not in ("sum", "centred_sum"):
        return None
    lo, hi = _sum_range(stat, col, bounds)
    if float_sum_inflation(metadata.max_rows, lo, hi) <= FIXED_POINT_ABOVE:
        return None
    magnitude = max(abs(lo), abs(hi))
    per_unit = min(2.0**62 / (metadata.max_rows * magnitude), 2.0**40 / magnitude)
    return 2.0 ** -math.floor(math.log2(per_unit))


def _fixed_point_sum(c: pl.Expr, stat: Statistic, col: ColumnMetadata, bounds: dict[str, tuple[float, float]],
                     step: float, masked: Callable[[pl.Expr], pl.Expr]) -> pl.Expr:
    """round((clip(x) - shift) / step) as an i64, summed exactly: adding an offset first makes the value
    non-negative, so the truncating cast rounds to nearest."""
    lo, hi = bounds[col.name]
    shift = centre(col, bounds) if stat.kind == "centred_sum" else 0.0
    low, high = _sum_range(stat, col, bounds)
    offset = math.ceil(max(abs(low), abs(high)) / step) + 1
    units = (((c.clip(lo, hi) - shift) / step + (offset + 0.5)).cast(pl.Int64) - offset).fill_null(0)
    return masked(units).dp.sum((math.floor(low / step) - 1, math.ceil(high / step) + 1))


def metadata_warnings(metadata_doc: dict[str, Any]) -> list[str]:
    """What the metadata costs in accuracy, for the admin at import: float sums where max_rows is loose enough
    for OpenDP's rounding term to matter (they are then summed in fixed point, with a rounding allowance)."""
    metadata = parse_metadata(metadata_doc)
    warnings = []
    for col in metadata.columns:
        if col.type != "float" or col.bounds is None:
            continue
        stat, bounds = Statistic("sum", col.name), {col.name: col.bounds}
        step = fixed_point_step(stat, metadata, bounds)
        if step is not None:
            inflation = float_sum_inflation(metadata.max_rows, *_sum_range(stat, col, bounds))
            warnings.append(
                f"column '{col.name}': with max_rows {metadata.max_rows:,}, OpenDP's float sums would add "
                f"{inflation:,.2f}x the noise; lomas sums it in fixed point instead (steps of {step:.3g}), and each "
                f"SUM interval allows up to {metadata.max_rows * step:.3g} for that rounding. A max_rows closer to "
                "the real row count makes sums exact."
            )
    return warnings


def _candidates(col: ColumnMetadata, bounds: dict[str, tuple[float, float]]) -> list[Any]:
    candidates = col.quantile_candidates()
    if col.name in bounds:
        lo, hi = bounds[col.name]
        narrowed = [v for v in candidates if lo <= v <= hi]
        if len(narrowed) >= 2:
            candidates = narrowed
    return candidates


def _key_frame(spec: QuerySpec, metadata: DatasetMetadata) -> pl.LazyFrame:
    cols = [metadata.column(k) for k in spec.group_by]
    rows = list(itertools.product(*[c.group_keys for c in cols]))  # type: ignore[union-attr]
    schema = {c.name: POLARS_TYPES[c.type] for c in cols}  # type: ignore[union-attr]
    return pl.LazyFrame(rows, schema=schema, orient="row")


def build_plan(spec: QuerySpec, metadata: DatasetMetadata, bounds: dict[str, tuple[float, float]],
               statistics: list[Statistic], steps: list[float | None], only: list[int] | None = None) -> pl.LazyFrame:
    """The OpenDP plan releasing the statistics (those numbered in `only`, if given), each named by its index."""
    frame = pl.LazyFrame(schema=polars_schema(metadata))  # every row is read: a WHERE is a mask (_statistic_expr)
    exprs = [_statistic_expr(stat, metadata, bounds, step, spec.where).alias(_statistic_name(j))
             for j, (stat, step) in enumerate(zip(statistics, steps)) if only is None or j in only]
    if not spec.group_by:
        return frame.select(exprs)
    grouped = frame.group_by(list(spec.group_by)).agg(exprs)
    # The public key set, built here from metadata: every category (and NULL for a nullable column) appears,
    # seen in the data or not.
    return _key_frame(spec, metadata).join(grouped, on=list(spec.group_by), how="left", nulls_equal=True)


def input_domain(spec: QuerySpec, metadata: DatasetMetadata) -> Any:
    domain = dp.lazyframe_domain(
        [
            dp.series_domain(name, dp.option_domain(dp.atom_domain(T=_opendp_type(dtype))))
            for name, dtype in polars_schema(metadata).items()
        ]
    )
    domain = dp.with_margin(domain, dp.polars.Margin(by=[], max_length=metadata.max_rows))
    if spec.group_by:
        groups = math.prod(len(metadata.column(k).group_keys) for k in spec.group_by)  # type: ignore[union-attr]
        domain = dp.with_margin(
            domain,
            dp.polars.Margin(by=list(spec.group_by), max_length=metadata.max_rows, max_groups=groups),
        )
    return domain


def _opendp_type(dtype: pl.DataType) -> str:
    return {pl.Int64: "i64", pl.Float64: "f64", pl.String: "String", pl.Boolean: "bool"}[type(dtype)]


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
        return _summary(self.base)


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
        self.statistics, self.recipes = plan_statistics(self.spec, self.metadata)
        self.steps = [fixed_point_step(stat, self.metadata, self.bounds) for stat in self.statistics]

    @classmethod
    def from_json(cls, spec: dict[str, Any], metadata: dict[str, Any], bounds: dict[str, Any] | None) -> Plan:
        meta = parse_metadata(metadata)
        return cls(QuerySpec.from_json(spec), meta, effective_bounds(meta, bounds))

    def base_measurement(self, scale: float, mechanism: str = LAPLACE, only: list[int] | None = None) -> Any:
        measure = dp.max_divergence() if mechanism == LAPLACE else dp.zero_concentrated_divergence()
        try:
            return dp.polars.make_private_lazyframe(
                input_domain(self.spec, self.metadata),
                dp.symmetric_distance(),
                measure,
                build_plan(self.spec, self.metadata, self.bounds, self.statistics, self.steps, only),
                global_scale=scale,
            )
        except dp.OpenDPException as err:
            raise QueryRejected(f"the DP engine refused the query: {_opendp_message(err)}") from None

    @property
    def parts(self) -> list[tuple[str, list[int]]]:
        """Statistics that run together: (PLAIN, ...) and (QUANTILES, ...). Quantiles run apart: their plans hold
        functions polars cannot hand back for collect_release, and OpenDP draws their missing groups' scores on
        their own."""
        plain = [j for j, s in enumerate(self.statistics) if s.kind != "quantile"]
        quantiles = [j for j, s in enumerate(self.statistics) if s.kind == "quantile"]
        return [(kind, part) for kind, part in ((PLAIN, plain), (QUANTILES, quantiles)) if part]

    def measurement(self, scale: float, mechanism: str = LAPLACE, delta: float = 0.0
                    ) -> tuple[Any, Any, list[tuple[str, Any]]]:
        """(base, charged, parts): the parts that run (each its own plan at the same scale) and their composition,
        which is charged (its loss is the sum of theirs, as the joint plan's is); a zCDP measurement is charged
        through OpenDP's conversion to (epsilon, delta)."""
        base = self.base_measurement(scale, mechanism)
        split = self.parts
        if len(split) == 1:
            parts, composed = [(split[0][0], base)], base
        else:
            parts = [(kind, self.base_measurement(scale, mechanism, only)) for kind, only in split]
            composed = dp.c.make_composition([m for _, m in parts])
        if mechanism == LAPLACE:
            return base, composed, parts
        return base, dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(composed), delta), parts

    def cost(self, measurement: Any) -> tuple[float, float]:
        loss = measurement.map(self.metadata.privacy_unit)
        return (float(loss[0]), float(loss[1])) if isinstance(loss, tuple) else (float(loss), 0.0)

    def at_scale(self, scale: float, mechanism: str = LAPLACE, delta: float = 0.0) -> Calibrated:
        base, charged, parts = self.measurement(scale, mechanism, delta)
        epsilon, spent_delta = self.cost(charged)
        return Calibrated(mechanism, scale, delta, base, charged, epsilon, spent_delta, parts,
                          tuple(self.spec.group_by))

    def calibrate(self, epsilon: float, delta: float = 0.0) -> Calibrated:
        """The least noise within (epsilon, delta): Laplace under pure DP and, when delta > 0 is offered,
        Gaussian under zCDP converted to (epsilon, delta); whichever adds less noise (RMSE)."""
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

    def calibrate_mechanism(self, mechanism: str, epsilon: float, delta: float = 0.0) -> Calibrated:
        """Pure-DP loss is proportional to 1/scale and zCDP's rho to 1/scale^2, so one build at scale 1 gives
        the answer in closed form; float rounding terms can leave it a hair above target, so we verify and
        nudge upward."""
        at_unit = self.cost(self.base_measurement(1.0, mechanism))[0]
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
            row = summary[_statistic_name(j)]
            noise, unit = _noise(row), self._unit(j)
            released.append({
                "statistic": self._label(j),
                "mechanism": MECHANISM_NAMES.get(row["distribution"], row["distribution"]),
                "scale": row["scale"] * unit,
                "accuracy": noise.half_width(ALPHA) * unit + self._rounding(j) if noise else None,
                "fixed_point_step": self.steps[j],
            })
        aggregates = [self._describe_aggregate(agg, recipe, released, summary)
                      for agg, recipe in zip(self.spec.aggregates, self.recipes)]
        return {
            "mechanism": calibrated.mechanism,
            "scale": calibrated.scale,
            "choice": calibrated.choice,
            "statistics": released,
            "aggregates": aggregates,
        }

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
        rounded = f", in steps of {step:g}" if step else ""
        if stat.kind == "rows":
            return "COUNT(*)"
        if stat.kind == "count":
            return f"COUNT({stat.column})"
        lo, hi = self.bounds[stat.column]  # type: ignore[index]
        if stat.kind == "sum":
            return f"SUM({stat.column}) clipped to [{lo:g}, {hi:g}]{rounded}"
        if stat.kind == "centred_sum":
            col = self.metadata.column(stat.column)  # type: ignore[arg-type]
            return f"SUM({stat.column} - {centre(col, self.bounds):g}) clipped to [{lo:g}, {hi:g}]{rounded}"  # type: ignore[arg-type]
        return f"PERCENTILE({stat.quantile:g}) of {stat.column}"

    def _describe_aggregate(self, agg: Aggregate, recipe: Recipe, released: list[dict[str, Any]],
                            summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
        info: dict[str, Any] = {"name": agg.alias, "kind": agg.kind, "column": agg.column, "alpha": ALPHA}
        if agg.quantile is not None:
            info["quantile"] = agg.quantile
        parts = [released[j] for j in recipe.uses]
        info["statistics"] = [p["statistic"] for p in parts]
        info["derived"] = recipe.how in ("centred_sum", "avg")
        info["mechanism"] = ", ".join(dict.fromkeys(p["mechanism"] for p in parts))
        info["scale"] = parts[0]["scale"] if len(parts) == 1 else {"sum": parts[0]["scale"],
                                                                    "count": parts[1]["scale"]}
        bounds = self.bounds.get(agg.column) if agg.column else None  # type: ignore[arg-type]
        info["bounds"] = list(bounds) if bounds and agg.kind in ("sum", "avg", "quantile") else None
        clipped = f", each value clipped to [{bounds[0]:g}, {bounds[1]:g}]" if bounds else ""
        step = self.steps[recipe.uses[0]]
        if step:
            clipped += f" (summed in steps of {step:g}; the interval allows for that rounding)"
        if recipe.how == "count":
            info["accuracy"] = parts[0]["accuracy"]
            info["covers"] = ("the number of rows" if agg.kind == "count_star"
                              else f"the number of non-null values of {agg.column}")
        elif recipe.how == "sum":
            info["accuracy"] = parts[0]["accuracy"]
            info["covers"] = f"the sum of non-null {agg.column}{clipped}"
        elif recipe.how == "centred_sum":
            col = self.metadata.column(agg.column)  # type: ignore[arg-type]
            total, count = (_noise(summary[_statistic_name(j)]) for j in recipe.uses)
            unit = self._unit(recipe.uses[0])
            middle = centre(col, self.bounds)  # type: ignore[arg-type]
            info["accuracy"] = combined_half_width(total, count, middle / unit, ALPHA) * unit \
                + self._rounding(recipe.uses[0])  # type: ignore[arg-type]
            info["covers"] = f"the sum of non-null {agg.column}{clipped}"
        elif recipe.how == "avg":
            info["accuracy"] = None  # it depends on the group's count: each interval is computed per group
            info["covers"] = f"the mean of non-null {agg.column}{clipped}"
        else:
            col = self.metadata.column(agg.column)  # type: ignore[arg-type]
            candidates = _candidates(col, self.bounds)  # type: ignore[arg-type]
            rows = quantile_rank_error(parts[0]["scale"], len(candidates), agg.quantile, ALPHA,  # type: ignore[arg-type]
                                       self.metadata.max_rows)
            info["accuracy"] = None
            info["rank_error_rows"] = rows
            info["candidates"] = len(candidates)
            info["covers"] = (
                f"the rank of the value among non-null {agg.column}: with 95% confidence it is within "
                f"{rows:,.1f} rows of the requested position, beyond the best of the {len(candidates)} "
                f"candidates over [{candidates[0]:g}, {candidates[-1]:g}]"
            )
        return info

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
            total, count = (_noise(summary[_statistic_name(j)]) for j in recipe.uses)
            unit = self._unit(recipe.uses[0])  # the grid is in the released sum's own units
            tables.append(ratio_grid(total, count, (lo - middle) / unit, (hi - middle) / unit, ALPHA))  # type: ignore[arg-type]
        return tables

    def postprocess(self, raw: pl.DataFrame, described: dict[str, Any], tables: list[Any]) -> dict[str, Any]:
        """Released statistics -> the user's columns, each value with the 95% interval of what it covers."""
        order = {k: {v: n for n, v in enumerate(self.metadata.column(k).group_keys)} for k in self.spec.group_by}  # type: ignore[union-attr]
        records = raw.to_dicts()
        records.sort(key=lambda r: tuple(order[k].get(r[k], len(order[k])) for k in self.spec.group_by))
        rows, intervals = [], []
        for record in records:
            row: dict[str, Any] = {}
            interval: dict[str, Any] = {}
            for output in self.spec.outputs:
                if output.key is not None:
                    row[output.name] = record[output.key]
                    continue
                i = output.aggregate
                assert i is not None
                values = [record[_statistic_name(j)] for j in self.recipes[i].uses]
                row[output.name], interval[output.name] = self._value(i, values, described["aggregates"][i],
                                                                      tables[i])
            rows.append(row)
            intervals.append(interval)
        return {"columns": [o.name for o in self.spec.outputs], "rows": rows, "intervals": intervals}

    def _value(self, i: int, values: list[Any], info: dict[str, Any], table: Any) -> tuple[Any, Any]:
        """(value, [low, high]): the value always lies inside its own interval."""
        agg, how = self.spec.aggregates[i], self.recipes[i].how
        if how == "count":
            (noisy,) = values
            acc = int(info["accuracy"])  # integer noise on an integer count
            return max(noisy, 0), [max(noisy - acc, 0), max(noisy + acc, 0)]
        if how == "quantile":
            return values[0], None
        col = self.metadata.column(agg.column)  # type: ignore[arg-type]
        is_int = col.type == "int"  # type: ignore[union-attr]
        first = self.recipes[i].uses[0]
        if how in ("sum", "centred_sum"):
            value = self._in_units(values[0], first)
            if how == "centred_sum":
                value += centre(col, self.bounds) * values[1]  # type: ignore[arg-type]
            acc = info["accuracy"]
            if is_int:  # the true sum is a whole number: round the interval inward, onto whole numbers
                return value, [math.ceil(value - acc), math.floor(value + acc)]
            return value, [value - acc, value + acc]
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


def _summary(measurement: Any, alpha: float | None = None) -> dict[str, dict[str, Any]]:
    frame = dp.summarize_polars_measurement(measurement, alpha=alpha)
    return {row["column"]: row for row in frame.to_dicts()}


def _opendp_message(err: Exception) -> str:
    text = getattr(err, "message", None) or str(err)
    text = text.strip().splitlines()[0] if text.strip() else "unknown reason"
    return text[:300]


def check_epsilon(epsilon: Any, max_epsilon: float) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon):
        raise BadRequest("epsilon must be a number")
    if not 0 < epsilon <= max_epsilon:
        raise BadRequest(f"epsilon must be above 0 and at most {max_epsilon} per query")
    return float(epsilon)


# polars' common-subexpression elimination must stay off for a release. OpenDP fills a public key that has no
# rows with `fill_null(noise(repeat(0, len())))` per statistic; those expressions are identical across statistics
# of one scale, so polars computes the noise once and every statistic of an empty group gets the same draw
# (SUM(x1) == SUM(x2), COUNT(*) == COUNT(x)): a deterministic sign that the group is empty (issue 17).
RELEASE_FLAGS = pl.QueryOptFlags(comm_subexpr_elim=False)


def collect_release(once_frame: Any, kind: str) -> pl.DataFrame:
    """Run one part's plan exactly once, each noise expression drawn on its own. A part of quantiles is collected
    by OpenDP itself: its plan cannot be handed back, and its empty groups' candidates are drawn apart (see
    tests/test_privacy.py)."""
    if kind == QUANTILES:
        return once_frame.collect()
    return once_frame.lazy().collect(optimizations=RELEASE_FLAGS)


# --- worker entry points: plain data in, plain data out ---------------------------------------------------


def preview_task(
    spec: dict[str, Any], metadata: dict[str, Any], epsilon: float, delta: float, bounds: dict[str, Any] | None
) -> dict[str, Any]:
    plan = Plan.from_json(spec, metadata, bounds)
    calibrated = plan.calibrate(epsilon, delta)
    return {"epsilon": calibrated.epsilon, "delta": calibrated.delta, "delta_target": calibrated.delta_target,
            "plan": plan.describe(calibrated)}


# A warm worker keeps the measurements it built and the scans it opened: a repeated query shape pays only for
# its execution. Both are plain functions of their keys, so a cached entry is the same as a rebuilt one.
_PREPARED: OrderedDict[str, tuple[Plan, Calibrated, dict[str, Any], list[Any]]] = OrderedDict()
_SCANS: OrderedDict[str, pl.LazyFrame] = OrderedDict()
_CACHE_SIZE = 256


def _prepared(spec: dict[str, Any], metadata: dict[str, Any], bounds: dict[str, Any] | None, mechanism: str,
              scale: float, delta: float) -> tuple[Plan, Calibrated, dict[str, Any], list[Any]]:
    key = json.dumps([spec, metadata, bounds, mechanism, scale, delta], sort_keys=True)
    if key in _PREPARED:
        _PREPARED.move_to_end(key)
        return _PREPARED[key]
    plan = Plan.from_json(spec, metadata, bounds)
    calibrated = plan.at_scale(scale, mechanism, delta)
    entry = (plan, calibrated, plan.describe(calibrated), plan.interval_tables(calibrated))
    _PREPARED[key] = entry
    if len(_PREPARED) > _CACHE_SIZE:
        _PREPARED.popitem(last=False)
    return entry


def _scan(parquet_path: str) -> pl.LazyFrame:
    if parquet_path not in _SCANS:
        _SCANS[parquet_path] = pl.scan_parquet(parquet_path)
        if len(_SCANS) > _CACHE_SIZE:
            _SCANS.popitem(last=False)
    return _SCANS[parquet_path]


def release_task(
    spec: dict[str, Any],
    metadata: dict[str, Any],
    bounds: dict[str, Any] | None,
    parquet_path: str,
    price: dict[str, Any],
) -> dict[str, Any]:
    """Run the query with the mechanism and scale a preview fixed and whose cost was reserved; refuse if the
    cost changed."""
    plan_doc = price["plan"]
    plan, calibrated, described, tables = _prepared(spec, metadata, bounds, plan_doc["mechanism"],
                                                    plan_doc["scale"], price["delta_target"])
    if calibrated.epsilon > price["epsilon"] or calibrated.delta > price["delta"]:
        raise QueryRejected("the query's privacy cost changed since it was reserved; nothing was released")
    if not os.path.exists(parquet_path):  # moved or deleted since the service checked: nothing was read
        raise DatasetUnavailable("the dataset's data is missing on the service (an admin has been told); nothing "
                                 "was released")
    note_data_access()  # from here on, a failure can depend on the data: it will be charged
    raw = calibrated.release(_scan(parquet_path))
    result = plan.postprocess(raw, described, tables)
    described = described | {"choice": price["plan"].get("choice")}
    return {"epsilon": calibrated.epsilon, "delta": calibrated.delta, "plan": described,
            "aggregates": described["aggregates"], **result}
