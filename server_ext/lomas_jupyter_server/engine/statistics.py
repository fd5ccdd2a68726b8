"""What a query releases, planned from public metadata alone: the fewest noisy statistics that answer its
aggregates (and how each aggregate is derived from them), their bounds, fixed-point steps and quantile
candidates. No OpenDP plan is built here (that is the backend's), so every backend shares this planning."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import opendp.prelude as dp
import polars as pl

from ..errors import QueryRejected
from .metadata import ColumnMetadata, DatasetMetadata, parse_metadata
from .sql import SPREAD_KINDS, QuerySpec

dp.enable_features("contrib")


PLAIN, QUANTILES = "plain", "quantiles"  # the parts a plan runs in (Plan.parts)




# --- what a query releases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Statistic:
    """One noisy number per group that a plan releases. Aggregates are computed from these, so a statistic two
    aggregates need (the count behind COUNT(x) and AVG(x), say) is released, and paid for, once."""

    kind: str  # rows | count | distinct | sum | centred_sum | centred_sumsq | quantile
    column: str | None = None
    quantile: float | None = None


@dataclass(frozen=True)
class Recipe:
    """How one output aggregate is computed from released statistics (indices into Plan.statistics)."""

    how: str  # count | sum | centred_sum | avg | quantile | var (VAR/STDDEV, sample or population)
    uses: tuple[int, ...]


def centre(col: ColumnMetadata, bounds: dict[str, tuple[float, float]]) -> float:
    """The middle of the bounds (a whole number for int columns, so their sums stay exact integers)."""
    lo, hi = bounds[col.name]
    return (int(lo) + int(hi)) // 2 if col.type == "int" else (lo + hi) / 2


def private_keys(spec: QuerySpec, metadata: DatasetMetadata) -> list[str]:
    """The GROUP BY columns with no public category list: which of their values occur is private, so their
    groups are released only where a noisy count clears a threshold (which needs delta), never from a key set."""
    return [k for k in spec.group_by if (col := metadata.column(k)) is not None and col.categories is None]


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

    if private_keys(spec, metadata):
        # the threshold is on a noisy count of each group's rows (OpenDP's key release needs it), so it is always
        # released first and answers COUNT(*) too
        if any(a.kind == "quantile" for a in spec.aggregates):
            raise QueryRejected(
                f"PERCENTILE or MEDIAN with GROUP BY {', '.join(private_keys(spec, metadata))} (a column without "
                "public categories) is not supported: group by columns with public categories for quantiles")
        if any(d.name in spec.group_by for d in spec.derived):
            raise QueryRejected(
                f"GROUP BY a CASE band together with {', '.join(private_keys(spec, metadata))} (a column without "
                "public categories) is not supported: group by the band with columns that have public categories, "
                "or by the column alone")
        use(Statistic("rows"))
    counted = {count_of(a.column) for a in spec.aggregates
               if a.kind in ("count", "avg", *SPREAD_KINDS) and a.column}
    if any(a.kind == "count_star" for a in spec.aggregates) or Statistic("rows") in statistics:
        counted.add(Statistic("rows"))
    recipes = []
    for agg in spec.aggregates:
        if agg.kind == "count_star":
            recipes.append(Recipe("count", (use(Statistic("rows")),)))
            continue
        assert agg.column is not None
        if agg.kind == "count":
            recipes.append(Recipe("count", (use(count_of(agg.column)),)))
        elif agg.kind == "count_distinct":  # one row adds or removes at most one distinct value of its group
            recipes.append(Recipe("count", (use(Statistic("distinct", agg.column)),)))
        elif agg.kind in SPREAD_KINDS:
            # C, S1 = sum(x - c), S2 = sum((x - c)^2): var = S2/C - (S1/C)^2, shared with AVG's S1 and C
            parts = (use(Statistic("centred_sum", agg.column)), use(count_of(agg.column)),
                     use(Statistic("centred_sumsq", agg.column)))
            recipes.append(Recipe("var", parts))
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


def statistic_name(j: int) -> str:
    return f"__s{j}"


FIXED_POINT_ABOVE = 1.01  # warn at import when OpenDP's float rounding term would add more than 1% noise
SUM_KINDS = ("sum", "centred_sum", "centred_sumsq")


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


def sum_range(stat: Statistic, col: ColumnMetadata, bounds: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """The range a sum statistic's terms take: the bounds with 0 added, or centred on the bounds' middle."""
    lo, hi = bounds[col.name]
    if stat.kind == "centred_sum":
        middle = centre(col, bounds)
        return lo - middle, hi - middle
    if stat.kind == "centred_sumsq":
        middle = centre(col, bounds)
        return 0, max(abs(lo - middle), abs(hi - middle)) ** 2
    return min(lo, 0), max(hi, 0)


def fixed_point_step(stat: Statistic, metadata: DatasetMetadata, bounds: dict[str, tuple[float, float]]) -> float | None:
    """For a sum of a float column: the step (a power of two) its terms are rounded to, so they are summed
    exactly as int64 on every backend (a float sum's result depends on the order of its terms, which an engine
    that splits the work does not fix, and OpenDP's allowance for that grows with max_rows: 445x the noise at
    1e9). As fine as int64 allows for max_rows terms (and 2^40 per term, where float64 still rounds exactly);
    None for an int column's sum, which is exact as it is."""
    col = metadata.column(stat.column) if stat.column else None
    if col is None or col.type != "float" or stat.kind not in SUM_KINDS:
        return None
    lo, hi = sum_range(stat, col, bounds)
    magnitude = max(abs(lo), abs(hi))
    per_unit = min(2.0**62 / (metadata.max_rows * magnitude), 2.0**40 / magnitude)
    return 2.0 ** -math.floor(math.log2(per_unit))


def fixed_point_offset(stat: Statistic, col: ColumnMetadata, bounds: dict[str, tuple[float, float]],
                       step: float) -> int:
    """A whole number of steps that makes every term non-negative before it is rounded (public)."""
    low, high = sum_range(stat, col, bounds)
    return math.ceil(max(abs(low), abs(high)) / step) + 1


def fixed_point_bounds(stat: Statistic, col: ColumnMetadata, bounds: dict[str, tuple[float, float]],
                       step: float) -> tuple[int, int]:
    """The range of one row's rounded term, in steps: what the sum's sensitivity is computed from."""
    low, high = sum_range(stat, col, bounds)
    return math.floor(low / step) - 1, math.ceil(high / step) + 1


def metadata_warnings(metadata_doc: dict[str, Any]) -> list[str]:
    """What the metadata costs in accuracy, for the admin at import: float sums where max_rows is loose enough
    for rounding to matter (lomas sums in fixed point, with a rounding allowance that grows with max_rows)."""
    metadata = parse_metadata(metadata_doc)
    warnings = []
    for col in metadata.columns:
        if col.type != "float" or col.bounds is None:
            continue
        stat, bounds = Statistic("sum", col.name), {col.name: col.bounds}
        step = fixed_point_step(stat, metadata, bounds)
        inflation = float_sum_inflation(metadata.max_rows, *sum_range(stat, col, bounds))
        if step is not None and inflation > FIXED_POINT_ABOVE:
            warnings.append(
                f"column '{col.name}': with max_rows {metadata.max_rows:,}, OpenDP's float sums would add "
                f"{inflation:,.2f}x the noise; lomas sums it in fixed point instead (steps of {step:.3g}), and each "
                f"SUM interval allows up to {metadata.max_rows * step:.3g} for that rounding. A max_rows closer to "
                "the real row count makes sums exact."
            )
    return warnings


def quantile_candidates(col: ColumnMetadata, bounds: dict[str, tuple[float, float]]) -> list[Any]:
    candidates = col.quantile_candidates()
    if col.name in bounds:
        lo, hi = bounds[col.name]
        narrowed = [v for v in candidates if lo <= v <= hi]
        if len(narrowed) >= 2:
            candidates = narrowed
    return candidates

