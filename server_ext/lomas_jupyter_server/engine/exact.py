"""The exact stage of a query, for engines that are not OpenDP's polars plan (DuckDB, Spark, polars' streaming
engine): per public key, only the exact, bounded integers the query's statistics need. Counts of rows or of
non-null values, sums of values clipped to public bounds (fixed-point int64 for floats), and, for a quantile,
how many values lie below and above each public candidate. A WHERE is a 0/1 mask, never a filter.

Everything here is compiled from the plan (public metadata and the query spec), never from the data. One
compiler writes each statistic once, in a small vocabulary of expressions (`Vocabulary`) that each engine
supplies; the engine runs the aggregation and hands back one row per key it saw, and `densify` lays that out
over the full public key set (empty groups are zeros; keys outside it are dropped). The exact numbers go to
`noise` and nowhere else: never logged, cached or returned.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import QueryRejected
from . import expressions
from .statistics import (
    Statistic,
    centre,
    fixed_point_bounds,
    private_keys,
    quantile_candidates,
    statistic_name,
)

INT64_MAX = 2**63 - 1


class Vocabulary(Protocol):
    """What an engine's expressions must offer; arithmetic, comparison and &, |, ~ are Python operators on them."""

    def col(self, name: str) -> Any: ...
    def lit(self, value: Any) -> Any: ...
    def when(self, condition: Any, then: Any, otherwise: Any) -> Any: ...
    def clip(self, value: Any, lo: Any, hi: Any) -> Any: ...  # NULL stays NULL
    def present(self, value: Any) -> Any: ...  # IS NOT NULL
    def round_int64(self, value: Any) -> Any: ...  # floor(value + 0.5): the nearest whole number, halves up
    def date_part(self, value: Any, part: str) -> Any: ...  # expressions.DATE_PARTS, as int64 (dow: ISO's)
    def sum(self, value: Any, name: str) -> Any: ...
    def rows(self, name: str) -> Any: ...  # COUNT(*): a summed literal would be one row in some engines
    def count(self, value: Any, name: str) -> Any: ...  # COUNT(value): its non-null values
    def count_distinct(self, value: Any, name: str) -> Any: ...  # COUNT(DISTINCT value), NULL skipped


@dataclass(frozen=True)
class ExactStatistic:
    """One statistic's per-row term, all from public metadata. The engine sums it per key."""

    kind: str  # count | distinct | sum | quantile
    column: str | None = None  # None: every row (COUNT(*))
    clip: tuple[Any, Any] | None = None  # the term is clip(x) - shift (squared if `square`)
    shift: Any = 0
    square: bool = False
    step: float | None = None  # fixed point: the term is round(term / step) as int64
    per_row: int = 1  # the most one row's term can be, in absolute value (integer units)
    candidates: tuple[Any, ...] = ()


@dataclass(frozen=True)
class ExactStage:
    group_by: tuple[str, ...]
    keys: tuple[tuple[Any, ...], ...]  # the public key set, in the order released frames list it
    statistics: tuple[ExactStatistic, ...]
    where: dict[str, Any] | None
    # values computed before aggregation: (name, `expressions` tree, the bounds its columns are clipped to)
    derived: tuple[tuple[str, dict[str, Any], tuple[tuple[str, tuple[Any, Any]], ...]], ...] = ()

    @property
    def size(self) -> int:
        return len(self.keys)

    def value(self, v: Vocabulary, column: str) -> Any:
        """A column, or a derived value computed from its columns, in the engine's vocabulary."""
        for name, tree, bounds in self.derived:
            if name == column and "case" in tree:  # the first branch that holds; unknown is not true
                value = v.lit(tree["else"])
                for branch in reversed(tree["case"]):
                    value = v.when(predicate(v, branch["when"]), v.lit(branch["then"]), value)
                return value
            if name == column:
                return expressions.build(v, tree, dict(bounds))
        return v.col(column)

    def computed_keys(self, v: Vocabulary) -> list[tuple[str, Any]]:
        """The group keys computed from columns (a CASE), by name: engines add them before grouping."""
        return [(name, self.value(v, name)) for name, _, _ in self.derived if name in self.group_by]


def compile_stage(plan: Any) -> ExactStage:
    """The exact stage of a `Plan` (its statistics, steps and bounds). Refuses, before any data is read, a sum
    whose total over max_rows rows might not fit in int64 (an engine would fail, or wrap, on the data)."""
    metadata, bounds, spec = plan.metadata, plan.bounds, plan.spec
    if private_keys(spec, metadata):
        keys = ", ".join(private_keys(spec, metadata))
        raise QueryRejected(f"GROUP BY {keys} (without public categories, released by a threshold) runs only on "
                            "OpenDP's polars plan, not on the out-of-core engines (embedded, Spark) this dataset's "
                            "queries run on; group by columns with public categories")
    statistics = []
    for stat, step in zip(plan.statistics, plan.steps):
        exact = _exact_statistic(stat, step, metadata, bounds)
        if exact.kind == "sum" and metadata.max_rows * exact.per_row > INT64_MAX:
            raise QueryRejected(f"the sum of '{stat.column}' over max_rows rows could exceed 64-bit integers; "
                                "narrow its bounds or max_rows")
        statistics.append(exact)
    key_lists = [metadata.column(k).group_keys for k in spec.group_by]
    keys = tuple(itertools.product(*key_lists)) if spec.group_by else ((),)
    derived = tuple((d.name, d.expression, tuple((c, tuple(bounds[c])) for c in expressions.columns_of(d.expression)))
                    for d in spec.derived)
    return ExactStage(tuple(spec.group_by), keys, tuple(statistics), spec.where, derived)


def _exact_statistic(stat: Statistic, step: float | None, metadata: Any, bounds: dict[str, Any]) -> ExactStatistic:
    if stat.kind == "rows":
        return ExactStatistic("count")
    col = metadata.column(stat.column)
    if stat.kind in ("count", "distinct"):
        return ExactStatistic(stat.kind, col.name)
    if stat.kind == "quantile":
        return ExactStatistic("quantile", col.name, candidates=tuple(quantile_candidates(col, bounds)))
    lo, hi = bounds[col.name]
    shift = centre(col, bounds) if stat.kind in ("centred_sum", "centred_sumsq") else 0
    square = stat.kind == "centred_sumsq"
    if step is not None:
        low, high = fixed_point_bounds(stat, col, bounds, step)
        return ExactStatistic("sum", col.name, (float(lo), float(hi)), float(shift), square, step,
                              max(abs(low), abs(high)))
    if col.type == "float":  # pragma: no cover - fixed_point_step gives every float sum a step
        raise QueryRejected("a float sum needs a fixed-point step")
    lo, hi, shift = int(lo), int(hi), int(shift)
    largest = max(abs(lo - shift), abs(hi - shift))
    if stat.kind == "sum":
        largest = max(abs(min(lo, 0)), abs(max(hi, 0)))
    return ExactStatistic("sum", col.name, (lo, hi), shift, square, None,
                          largest * largest if square else largest)


# --- writing the stage in an engine's vocabulary ----------------------------------------------------------------


def predicate(v: Vocabulary, node: dict[str, Any]) -> Any:
    """A WHERE condition (from compile_sql's allowlist) in the engine's vocabulary; NULL where SQL says unknown."""
    op = node["op"]
    if op in ("and", "or"):
        return balanced([predicate(v, a) for a in node["args"]], op)
    if op == "not":
        return ~predicate(v, node["arg"])
    col = v.col(node["column"])
    if op == "cmp":
        value = v.lit(expressions.literal_value(node["value"]))
        return {"==": lambda: col == value, "!=": lambda: col != value, ">": lambda: col > value,
                ">=": lambda: col >= value, "<": lambda: col < value, "<=": lambda: col <= value}[node["cmp"]]()
    if op == "in":
        return balanced([col == v.lit(expressions.literal_value(value)) for value in node["values"]], "or")
    if op == "between":
        low, high = (expressions.literal_value(node[end]) for end in ("low", "high"))
        return (col >= v.lit(low)) & (col <= v.lit(high))
    if op == "is_null":
        return _is_null(v, node["column"], node["negate"])
    raise QueryRejected(f"unknown predicate {op}")  # pragma: no cover - specs come from compile_sql


def _is_null(v: Vocabulary, column: str, negate: bool) -> Any:
    present = v.present(v.col(column))
    return present if negate else ~present


def balanced(exprs: list[Any], op: str) -> Any:
    """A balanced tree of AND/OR: depth log2(n), so long IN lists never nest deeply in an engine's planner."""
    while len(exprs) > 1:
        paired = [(exprs[i] & exprs[i + 1]) if op == "and" else (exprs[i] | exprs[i + 1])
                  for i in range(0, len(exprs) - 1, 2)]
        exprs = paired + ([exprs[-1]] if len(exprs) % 2 else [])
    return exprs[0]


def aggregations(v: Vocabulary, stage: ExactStage) -> list[Any]:
    """One summed expression per exact column, named by its statistic (quantiles: `__sJ_lt_I`, `__sJ_gt_I`).
    A sum's term is NULL where its value is, and every engine's SUM skips NULLs (an all-NULL or empty key sums
    to NULL, which `densify` reads as 0). Registered data holds no NaN (an import converts NaN to null, and data
    used in place must not hold any), so NULL is the only missing value."""
    kept = None if stage.where is None else predicate(v, stage.where)
    out = []
    for j, stat in enumerate(stage.statistics):
        name = statistic_name(j)
        if stat.kind == "quantile":
            x = stage.value(v, stat.column)  # type: ignore[arg-type]
            condition = v.present(x) if kept is None else v.present(x) & kept
            for i, candidate in enumerate(stat.candidates):
                c = v.lit(candidate)
                out.append(v.sum(v.when(condition & (x < c), v.lit(1), v.lit(0)), f"{name}_lt_{i}"))
                out.append(v.sum(v.when(condition & (x > c), v.lit(1), v.lit(0)), f"{name}_gt_{i}"))
        elif stat.kind == "distinct":  # a row the WHERE drops counts as NULL
            x = stage.value(v, stat.column)  # type: ignore[arg-type]
            out.append(v.count_distinct(x if kept is None else v.when(kept, x, v.lit(None)), name))
        elif stat.kind == "count" and kept is None:
            out.append(v.rows(name) if stat.column is None else v.count(stage.value(v, stat.column), name))
        elif stat.kind == "count":
            condition = kept if stat.column is None else v.present(stage.value(v, stat.column)) & kept
            out.append(v.sum(v.when(condition, v.lit(1), v.lit(0)), name))
        else:
            term = _sum_term(v, stat, stage.value(v, stat.column))  # type: ignore[arg-type]
            out.append(v.sum(term if kept is None else v.when(kept, term, v.lit(0)), name))
    return out


def _sum_term(v: Vocabulary, stat: ExactStatistic, x: Any) -> Any:
    """clip(x) - shift, squared for a sum of squares; in fixed point, that / step rounded to a whole number
    (floor(t + 0.5), halves up) as int64: each term moves by at most half a step, within the rounding allowance
    every SUM interval carries. OpenDP's polars plan, which has no round, adds an offset and truncates: the same
    numbers, so every backend sums the same integers. The clip is a CASE, not LEAST and GREATEST, which skip NULLs in SQL
    engines (a NULL would become the lower bound)."""
    lo, hi = (v.lit(b) for b in stat.clip)  # type: ignore[union-attr]
    term = v.clip(x, lo, hi) - v.lit(stat.shift)
    if stat.square:
        term = term * term
    if stat.step is None:
        return term
    return v.round_int64(term / v.lit(stat.step))


# --- what the engine hands back, over the public key set ---------------------------------------------------------


@dataclass
class ExactResult:
    """Per statistic: a list of ints over the stage's keys; for a quantile, per key, (below, above) per candidate.
    Only `noise` reads it."""

    stage: ExactStage
    values: list[Any]


def densify(stage: ExactStage, rows: list[dict[str, Any]]) -> ExactResult:
    """Engine rows (one per key seen, keys as columns, sums by name) -> dense vectors over the public key set.
    An empty group is zeros; a key outside the set (or an empty table's NULL sum) adds nothing."""
    index = {key: n for n, key in enumerate(stage.keys)}
    found: dict[int, dict[str, Any]] = {}
    for row in rows:
        n = index.get(tuple(row[k] for k in stage.group_by))
        if n is not None:
            found[n] = row
    values: list[Any] = []
    for j, stat in enumerate(stage.statistics):
        name = statistic_name(j)
        if stat.kind == "quantile":
            per_key = []
            for n in range(stage.size):
                row = found.get(n, {})
                below = [int(row.get(f"{name}_lt_{i}") or 0) for i in range(len(stat.candidates))]
                above = [int(row.get(f"{name}_gt_{i}") or 0) for i in range(len(stat.candidates))]
                per_key.append((below, above))
            values.append(per_key)
        else:
            values.append([int(found.get(n, {}).get(name) or 0) for n in range(stage.size)])
    return ExactResult(stage, values)
