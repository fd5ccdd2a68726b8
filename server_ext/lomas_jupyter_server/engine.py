"""The DP engine: query spec + public metadata -> OpenDP measurement -> release.

Plain Python, no Jupyter. The plan is always built here, on an empty frame with the dataset's schema, from a
spec that `sql.compile_sql` produced; bounds, candidates and key sets come from metadata. The functions at the
bottom (`preview_task`, `release_task`) are what worker processes run.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import opendp.prelude as dp
import polars as pl

from .errors import BadRequest, QueryRejected
from .metadata import ColumnMetadata, DatasetMetadata, parse_metadata
from .sql import Aggregate, QuerySpec
from .workers import note_data_access

dp.enable_features("contrib")

ALPHA = 0.05
POLARS_TYPES: dict[str, pl.DataType] = {
    "int": pl.Int64(),
    "float": pl.Float64(),
    "string": pl.String(),
    "bool": pl.Boolean(),
}
MECHANISM_NAMES = {
    "Integer Laplace": "Laplace (integer)",
    "Float Laplace": "Laplace",
    "ExponentialMin": "Exponential (report noisy min)",
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


def _internal(i: int, part: str = "") -> str:
    return f"__a{i}{part}"


def _aggregate_exprs(
    i: int, agg: Aggregate, col: ColumnMetadata | None, bounds: dict[str, tuple[float, float]]
) -> list[pl.Expr]:
    if agg.kind == "count_star":
        return [dp.len(signed=True).alias(_internal(i))]
    assert col is not None
    c = pl.col(col.name)
    if agg.kind == "count":
        return [c.dp.count(signed=True).alias(_internal(i))]
    if agg.kind == "sum":
        lo, hi = bounds[col.name]
        zero = min(max(0, lo), hi)  # SQL SUM ignores nulls: impute 0 where the bounds allow
        return [c.fill_null(zero).dp.sum((lo, hi)).alias(_internal(i))]
    if agg.kind == "avg":
        # AVG = lo + SUM(x - lo) / COUNT(x) over non-null rows: SQL semantics, and the shifted sum has a
        # sensitivity of (hi - lo) instead of max(|lo|, |hi|).
        lo, hi = bounds[col.name]
        shifted = (c - lo).fill_null(0)
        return [
            shifted.dp.sum((0, hi - lo)).alias(_internal(i, "_s")),
            c.dp.count(signed=True).alias(_internal(i, "_c")),
        ]
    if agg.kind == "quantile":
        candidates = _candidates(col, bounds)
        middle = candidates[len(candidates) // 2]
        return [c.fill_null(middle).dp.quantile(agg.quantile, candidates).alias(_internal(i))]
    raise QueryRejected(f"unknown aggregate {agg.kind}")


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
    rows = list(itertools.product(*[c.categories for c in cols]))  # type: ignore[union-attr]
    schema = {c.name: POLARS_TYPES[c.type] for c in cols}  # type: ignore[union-attr]
    return pl.LazyFrame(rows, schema=schema, orient="row")


def build_plan(spec: QuerySpec, metadata: DatasetMetadata, bounds: dict[str, tuple[float, float]]) -> pl.LazyFrame:
    frame = pl.LazyFrame(schema=polars_schema(metadata))
    if spec.where is not None:
        frame = frame.filter(_predicate(spec.where))
    exprs: list[pl.Expr] = []
    for i, agg in enumerate(spec.aggregates):
        col = metadata.column(agg.column) if agg.column else None
        exprs.extend(_aggregate_exprs(i, agg, col, bounds))
    if not spec.group_by:
        return frame.select(exprs)
    grouped = frame.group_by(list(spec.group_by)).agg(exprs)
    # The public key set, built here from metadata: every category appears, seen in the data or not.
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
        groups = math.prod(len(metadata.column(k).categories) for k in spec.group_by)  # type: ignore[union-attr,arg-type]
        domain = dp.with_margin(
            domain,
            dp.polars.Margin(by=list(spec.group_by), max_length=metadata.max_rows, max_groups=groups),
        )
    return domain


def _opendp_type(dtype: pl.DataType) -> str:
    return {pl.Int64: "i64", pl.Float64: "f64", pl.String: "String", pl.Boolean: "bool"}[type(dtype)]


@dataclass
class Plan:
    spec: QuerySpec
    metadata: DatasetMetadata
    bounds: dict[str, tuple[float, float]]

    @classmethod
    def from_json(cls, spec: dict[str, Any], metadata: dict[str, Any], bounds: dict[str, Any] | None) -> Plan:
        meta = parse_metadata(metadata)
        return cls(QuerySpec.from_json(spec), meta, effective_bounds(meta, bounds))

    def measurement(self, scale: float) -> Any:
        try:
            return dp.polars.make_private_lazyframe(
                input_domain(self.spec, self.metadata),
                dp.symmetric_distance(),
                dp.max_divergence(),
                build_plan(self.spec, self.metadata, self.bounds),
                global_scale=scale,
            )
        except dp.OpenDPException as err:
            raise QueryRejected(f"the DP engine refused the query: {_opendp_message(err)}") from None

    def cost(self, measurement: Any) -> float:
        return float(measurement.map(self.metadata.privacy_unit))

    def calibrate(self, epsilon: float) -> tuple[Any, float, float]:
        """Smallest noise whose privacy loss is at most `epsilon`: (measurement, scale, charged epsilon).

        Pure-DP loss is inversely proportional to the noise scale, so one build at scale 1 gives the answer in
        closed form; float rounding terms can leave it a hair above target, so we verify and nudge upward.
        """
        at_unit = self.cost(self.measurement(1.0))
        scale = at_unit / epsilon
        step = 1e-12
        for _ in range(200):
            measurement = self.measurement(scale)
            charged = self.cost(measurement)
            if charged <= epsilon:
                return measurement, scale, charged
            scale *= 1 + step
            step *= 2
        raise QueryRejected("could not calibrate noise for this epsilon")  # pragma: no cover

    def describe(self, measurement: Any) -> list[dict[str, Any]]:
        """Per aggregate: mechanism, noise scale, and the 95% accuracy (half-width) where it is known."""
        at_alpha = _summary(measurement, ALPHA)
        has_avg = any(agg.kind == "avg" for agg in self.spec.aggregates)
        at_half = _summary(measurement, ALPHA / 2) if has_avg else {}
        out = []
        for i, agg in enumerate(self.spec.aggregates):
            info: dict[str, Any] = {"name": agg.alias, "kind": agg.kind, "column": agg.column}
            if agg.quantile is not None:
                info["quantile"] = agg.quantile
            if agg.kind == "avg":
                s, c = at_alpha[_internal(i, "_s")], at_alpha[_internal(i, "_c")]
                info |= {
                    "mechanism": f"{MECHANISM_NAMES.get(s['distribution'], s['distribution'])} on the sum, "
                    f"{MECHANISM_NAMES.get(c['distribution'], c['distribution'])} on the count",
                    "scale": {"sum": s["scale"], "count": c["scale"]},
                    "accuracy": None,
                    "accuracy_parts": {
                        "sum": at_half[_internal(i, "_s")]["accuracy"],
                        "count": at_half[_internal(i, "_c")]["accuracy"],
                    },
                    "bounds": list(self.bounds[agg.column]),
                }
            else:
                row = at_alpha[_internal(i)]
                info |= {
                    "mechanism": MECHANISM_NAMES.get(row["distribution"], row["distribution"]),
                    "scale": row["scale"],
                    "accuracy": row["accuracy"],
                }
                if agg.kind in ("sum", "quantile"):
                    info["bounds"] = list(self.bounds[agg.column]) if agg.column in self.bounds else None
            info["alpha"] = ALPHA
            out.append(info)
        return out

    def postprocess(self, raw: pl.DataFrame, described: list[dict[str, Any]]) -> dict[str, Any]:
        """Raw noisy columns -> the user's columns, with a 95% interval per value where one is known."""
        order = {k: {v: n for n, v in enumerate(self.metadata.column(k).categories)} for k in self.spec.group_by}  # type: ignore[union-attr]
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
                agg, info = self.spec.aggregates[i], described[i]
                value, bounds = self._value(i, agg, info, record)
                row[output.name] = value
                interval[output.name] = bounds
            rows.append(row)
            intervals.append(interval)
        return {"columns": [o.name for o in self.spec.outputs], "rows": rows, "intervals": intervals}

    def _value(self, i: int, agg: Aggregate, info: dict[str, Any], record: dict[str, Any]) -> tuple[Any, Any]:
        if agg.kind in ("count", "count_star"):
            noisy = record[_internal(i)]
            acc = info["accuracy"]
            return max(noisy, 0), [max(noisy - acc, 0.0), noisy + acc]
        if agg.kind == "sum":
            noisy = record[_internal(i)]
            acc = info["accuracy"]
            return noisy, [noisy - acc, noisy + acc]
        if agg.kind == "avg":
            lo, hi = self.bounds[agg.column]  # type: ignore[index]
            s, c = record[_internal(i, "_s")], record[_internal(i, "_c")]
            acc_s, acc_c = info["accuracy_parts"]["sum"], info["accuracy_parts"]["count"]
            value = min(max(lo + s / c, lo), hi) if c > 0 else (lo + hi) / 2
            # union bound over the two noises, each at alpha/2: the true mean lies within these with >= 95%
            low = lo + max(s - acc_s, 0.0) / (c + acc_c) if c + acc_c > 0 else lo
            high = lo + (s + acc_s) / (c - acc_c) if c - acc_c > 0 else hi
            return value, [max(min(low, hi), lo), min(max(high, lo), hi)]
        if agg.kind == "quantile":
            return record[_internal(i)], None
        raise QueryRejected(f"unknown aggregate {agg.kind}")  # pragma: no cover


def _summary(measurement: Any, alpha: float) -> dict[str, dict[str, Any]]:
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


# --- worker entry points: plain data in, plain data out ---------------------------------------------------


def preview_task(
    spec: dict[str, Any], metadata: dict[str, Any], epsilon: float, bounds: dict[str, Any] | None
) -> dict[str, Any]:
    plan = Plan.from_json(spec, metadata, bounds)
    measurement, scale, charged = plan.calibrate(epsilon)
    return {"scale": scale, "epsilon": charged, "delta": 0.0, "aggregates": plan.describe(measurement)}


# A warm worker keeps the measurements it built and the scans it opened: a repeated query shape pays only for
# its execution. Both are plain functions of their keys, so a cached entry is the same as a rebuilt one.
_MEASUREMENTS: OrderedDict[str, tuple[Plan, Any, float, list[dict[str, Any]]]] = OrderedDict()
_SCANS: OrderedDict[str, pl.LazyFrame] = OrderedDict()
_CACHE_SIZE = 256


def _prepared(spec: dict[str, Any], metadata: dict[str, Any], bounds: dict[str, Any] | None,
              scale: float) -> tuple[Plan, Any, float, list[dict[str, Any]]]:
    key = json.dumps([spec, metadata, bounds, scale], sort_keys=True)
    if key in _MEASUREMENTS:
        _MEASUREMENTS.move_to_end(key)
        return _MEASUREMENTS[key]
    plan = Plan.from_json(spec, metadata, bounds)
    measurement = plan.measurement(scale)
    entry = (plan, measurement, plan.cost(measurement), plan.describe(measurement))
    _MEASUREMENTS[key] = entry
    if len(_MEASUREMENTS) > _CACHE_SIZE:
        _MEASUREMENTS.popitem(last=False)
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
    scale: float,
    reserved_epsilon: float,
) -> dict[str, Any]:
    """Run the query at a scale fixed by a preview whose cost was reserved; refuse if the cost changed."""
    plan, measurement, charged, described = _prepared(spec, metadata, bounds, scale)
    if charged > reserved_epsilon:
        raise QueryRejected("the query's privacy cost changed since it was reserved; nothing was released")
    note_data_access()  # from here on, a failure can depend on the data: it will be charged
    raw = measurement(_scan(parquet_path)).collect()
    result = plan.postprocess(raw, described)
    return {"epsilon": charged, "delta": 0.0, "scale": scale, "aggregates": described, **result}
