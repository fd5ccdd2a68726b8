"""The execution backend of today: OpenDP's polars plan, built here (never received) from the statistics that
`statistics` planned, over an empty frame with the dataset's schema. A WHERE is a mask, never a filter; public
key sets come from metadata. Another backend (an out-of-core engine, Spark) plugs in at the same seam: a plan
of statistics in, the released statistics out."""

from __future__ import annotations

import datetime
import itertools
import math
from collections.abc import Callable
from typing import Any

import opendp.prelude as dp
import polars as pl

from ..errors import QueryRejected
from . import expressions
from .engines import PolarsWords
from .metadata import POLARS_TYPES, ColumnMetadata, DatasetMetadata, polars_schema
from .sql import QuerySpec
from .statistics import (
    QUANTILES,
    Statistic,
    centre,
    fixed_point_bounds,
    fixed_point_offset,
    private_keys,
    quantile_candidates,
    statistic_name,
    sum_range,
)

dp.enable_features("contrib")
# The service itself collects each release's plan, once, with its own optimisation flags (see collect_release):
# OpenDP's OnceFrame.collect would let polars merge the noise of missing groups.
dp.enable_features("honest-but-curious")



def _balanced(exprs: list[pl.Expr], combine: Callable[[pl.Expr, pl.Expr], pl.Expr]) -> pl.Expr:
    """Combine many conditions as a balanced tree: depth log2(n), so long IN lists or OR chains never nest
    deeply in polars or OpenDP."""
    while len(exprs) > 1:
        paired = [combine(exprs[i], exprs[i + 1]) for i in range(0, len(exprs) - 1, 2)]
        exprs = paired + ([exprs[-1]] if len(exprs) % 2 else [])
    return exprs[0]


def _literal(value: Any) -> pl.Expr:
    if isinstance(value, dict):  # a tagged date: its day number, as the column cast to Int32 holds it
        return pl.lit((expressions.literal_value(value) - datetime.date(1970, 1, 1)).days, dtype=pl.Int32)
    return pl.lit(value)


def _predicate(node: dict[str, Any]) -> pl.Expr:
    op = node["op"]
    if op == "and":
        return _balanced([_predicate(a) for a in node["args"]], lambda a, b: a & b)
    if op == "or":
        return _balanced([_predicate(a) for a in node["args"]], lambda a, b: a | b)
    if op == "not":
        return ~_predicate(node["arg"])
    col = pl.col(node["column"])
    values = [node[k] for k in ("value", "low", "high") if k in node] + list(node.get("values", ()))
    if any(isinstance(v, dict) for v in values):  # OpenDP 0.16 takes no date literal: compare days since 1970
        col = col.cast(pl.Int32)
    if op == "cmp":
        value = _literal(node["value"])
        return {
            "==": col == value,
            "!=": col != value,
            ">": col > value,
            ">=": col >= value,
            "<": col < value,
            "<=": col <= value,
        }[node["cmp"]]
    if op == "in":  # OpenDP 0.16 has no is_in: an OR of equalities is the same filter
        return _balanced([col == _literal(value) for value in node["values"]], lambda a, b: a | b)
    if op == "between":
        low, high = (_literal(node[end]) for end in ("low", "high"))
        return (col >= low) & (col <= high)
    if op == "is_null":
        return col.is_not_null() if node["negate"] else col.is_null()
    raise QueryRejected(f"unknown predicate {op}")  # specs come from compile_sql; defensive only



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
    if stat.kind == "distinct":  # SQL's COUNT(DISTINCT x) skips NULL. OpenDP 0.16 has no conditional expression, so
        # a WHERE filters at the expression, as for a quantile (its work follows the rows matched)
        values = c if where is None else c.filter(_predicate(where))
        return values.drop_nulls().dp.n_unique(signed=True)
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
    if stat.kind == "centred_sumsq":  # clipped first, then squared: each term lies in [0, sum_range's top]
        lo, hi = (number(b) for b in bounds[col.name])
        middle = number(centre(col, bounds))
        offset = c.clip(lo, hi) - middle
        return masked((offset * offset).fill_null(number(0))).dp.sum(tuple(number(v) for v in sum_range(stat, col, bounds)))
    if stat.kind == "quantile":
        # OpenDP 0.16 has no conditional expression, so a quantile's WHERE is an expression-level filter: its
        # scoring work follows the rows matched (the README says what that means for timing)
        values = c if where is None else c.filter(_predicate(where))
        return values.drop_nulls().dp.quantile(stat.quantile, quantile_candidates(col, bounds))
    raise QueryRejected(f"unknown statistic {stat.kind}")  # pragma: no cover


def _mask(where: dict[str, Any] | None) -> pl.Expr | None:
    """1 where the WHERE holds, 0 where it is false or unknown (NULL), as SQL keeps only true rows."""
    return None if where is None else _predicate(where).cast(pl.Int64).fill_null(0)



def _fixed_point_sum(c: pl.Expr, stat: Statistic, col: ColumnMetadata, bounds: dict[str, tuple[float, float]],
                     step: float, masked: Callable[[pl.Expr], pl.Expr]) -> pl.Expr:
    """round(term / step) as an i64, summed exactly, where the term is the clipped value (less the centre for a
    centred sum; that, squared, for a sum of squares): adding an offset first makes it non-negative, so the
    truncating cast rounds to nearest. `exact.fixed_point_units` is the same arithmetic for every engine."""
    lo, hi = bounds[col.name]
    shift = centre(col, bounds) if stat.kind in ("centred_sum", "centred_sumsq") else 0.0
    offset = fixed_point_offset(stat, col, bounds, step)
    term = c.clip(lo, hi) - shift
    if stat.kind == "centred_sumsq":
        term = term * term
    units = ((term / step + (offset + 0.5)).cast(pl.Int64) - offset).fill_null(0)
    return masked(units).dp.sum(fixed_point_bounds(stat, col, bounds, step))



def _key_frame(spec: QuerySpec, metadata: DatasetMetadata) -> pl.LazyFrame:
    cols = [metadata.column(k) for k in spec.group_by]
    rows = list(itertools.product(*[c.group_keys for c in cols]))  # type: ignore[union-attr]
    schema = {c.name: POLARS_TYPES[c.type] for c in cols}  # type: ignore[union-attr]
    return pl.LazyFrame(rows, schema=schema, orient="row")


def _derived(tree: dict[str, Any], metadata: DatasetMetadata, bounds: dict[str, tuple[float, float]]) -> pl.Expr:
    if "case" not in tree:
        return expressions.build(PolarsWords(), tree, bounds)
    # OpenDP 0.16 has no conditional expression: the first branch that holds, as arithmetic on 0/1 masks (an
    # unknown condition is not true, as in SQL), numbers the label, and replace_strict names it (0: the ELSE)
    one = pl.lit(1, dtype=pl.Int64)
    masks = [_predicate(branch["when"]).cast(pl.Int64).fill_null(0) for branch in tree["case"]]
    index, none_before = pl.lit(0, dtype=pl.Int64), one
    for i, mask in enumerate(masks, start=1):
        index = index + pl.lit(i, dtype=pl.Int64) * mask * none_before
        none_before = none_before * (one - mask)
    values = expressions.labels(tree)
    dtype = pl.String if any(isinstance(v, str) for v in values) else pl.Int64
    return index.replace_strict(list(range(len(values))), values, return_dtype=dtype)


def build_plan(spec: QuerySpec, metadata: DatasetMetadata, bounds: dict[str, tuple[float, float]],
               statistics: list[Statistic], steps: list[float | None], only: list[int] | None = None) -> pl.LazyFrame:
    """The OpenDP plan releasing the statistics (those numbered in `only`, if given), each named by its index."""
    frame = pl.LazyFrame(schema=polars_schema(metadata))  # every row is read: a WHERE is a mask (_statistic_expr)
    if spec.derived:  # values computed before aggregation: each column clipped to its bounds, then the arithmetic
        frame = frame.with_columns([_derived(d.expression, metadata, bounds).alias(d.name) for d in spec.derived])
    where = spec.where
    if private_keys(spec, metadata) and where is not None:
        # a group's rows, as its threshold counts them, are the rows the WHERE keeps: a filter, not a mask (a masked
        # group of no matching rows would still clear the threshold on its other rows)
        frame, where = frame.filter(_predicate(where)), None
    exprs = [_statistic_expr(stat, metadata, bounds, step, where).alias(statistic_name(j))
             for j, (stat, step) in enumerate(zip(statistics, steps)) if only is None or j in only]
    if not spec.group_by:
        return frame.select(exprs)
    if private_keys(spec, metadata):  # no key set to join: OpenDP keeps the groups whose noisy count clears the threshold
        return frame.group_by(list(spec.group_by)).agg(exprs)
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
    if private_keys(spec, metadata):  # the groups are as many as the rows at most; no key set is public
        domain = dp.with_margin(
            domain, dp.polars.Margin(by=list(spec.group_by), max_length=metadata.max_rows, max_groups=metadata.max_rows))
    elif spec.group_by and not any(d.name in spec.group_by for d in spec.derived):
        # (a key computed by the plan is not in the input's domain: the plan's join with the public key set bounds
        # its groups)
        groups = math.prod(len(metadata.column(k).group_keys) for k in spec.group_by)  # type: ignore[union-attr]
        domain = dp.with_margin(
            domain,
            dp.polars.Margin(by=list(spec.group_by), max_length=metadata.max_rows, max_groups=groups),
        )
    return domain


def _opendp_type(dtype: pl.DataType) -> str:
    return {pl.Int64: "i64", pl.Float64: "f64", pl.String: "String", pl.Boolean: "bool",
            pl.Date: "NaiveDate"}[type(dtype)]



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

