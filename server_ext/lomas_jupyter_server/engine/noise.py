"""The noise stage for engines that compute the exact stage (`exact`): OpenDP's own measurements on its integers,
in this worker, once per query. Never on an executor.

Each statistic is `make_user_transformation` (the engine's work, declared stable from public metadata alone: one
row changes one key's term by at most `per_row`) chained with the noise the polars plan would add, at the scale
its summary names. The transformation's function picks the statistic's vector from the one result the engine
returned for all of them: the engine is deterministic, so one run serves every statistic. A quantile scores its
candidates from the counts below and above each (OpenDP's score, with the weights its polars plan uses), then
runs OpenDP's noisy max per key. What is charged is this measurement's `map(d_in)`, and the release refuses to run if that is
above the price the polars plan set: on every backend the same query costs the same.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import opendp.prelude as dp
import polars as pl

from .exact import ExactResult, ExactStage, compile_stage
from .metadata import POLARS_TYPES
from .plan import LAPLACE
from .statistics import statistic_name

dp.enable_features("contrib", "honest-but-curious")


def _is_exact(value: Any) -> bool:
    return isinstance(value, ExactResult)


EXACT_DOMAIN = dp.user_domain("LomasExactStage", _is_exact)


def _plain(j: int, per_row: int, size: int, scale: float, laplace: bool) -> Any:
    metric = dp.l1_distance(T="i64") if laplace else dp.l2_distance(T="i64")
    engine = dp.t.make_user_transformation(
        EXACT_DOMAIN, dp.symmetric_distance(), dp.vector_domain(dp.atom_domain(T="i64"), size=size), metric,
        function=lambda result: result.values[j],
        # one row is in one key and moves that key's term by at most per_row; d rows, by at most d * per_row in
        # L1 and (all in one key) in L2
        stability_map=lambda d_in: d_in * per_row,
    )
    return engine >> (dp.m.then_laplace(scale) if laplace else dp.m.then_gaussian(scale))


U64_MAX = 2**64 - 1


def score_weights(alpha: float, max_rows: int) -> tuple[int, int]:
    """(num, den) with num/den ~ alpha, as OpenDP's polars plan chooses them for a column of at most max_rows
    values: the float's exact fraction if its denominator is below (2^64 - 1) // max_rows, else that
    denominator and the numerator rounded to it. A candidate's score is |(den - num) * below - num * above|,
    which stays below 2^64."""
    exact = Fraction(alpha)
    finest = U64_MAX // max_rows
    if exact.denominator < finest:
        return exact.numerator, exact.denominator
    return math.floor(alpha * float(finest) + 0.5), finest


def _quantile(j: int, candidates: list[Any], alpha: float, max_rows: int, size: int, scale: float, measure: Any,
              grouped: bool) -> Any:
    num, den = score_weights(alpha, max_rows)
    noisy_max = dp.m.make_noisy_max(dp.vector_domain(dp.atom_domain(T="u64"), size=len(candidates)),
                                    dp.linf_distance(T="u64"), measure, scale, negate=True)

    def release(result: ExactResult) -> list[Any]:
        picked = []
        for below, above in result.values[j]:
            scores = [abs((den - num) * b - num * a) for b, a in zip(below, above)]
            picked.append(candidates[noisy_max(scores)])
        return picked

    def privacy_map(d_in: int) -> float:
        # a row moves every candidate's below or above by one: its score by at most max(num, den - num). Each
        # key's candidates are scored on that key's rows, so d rows reach at most min(d, keys) keys (parallel
        # composition over keys), each by d rows' worth, as the polars plan charges
        keys = min(d_in, size) if grouped else 1
        return keys * noisy_max.map(d_in * max(num, den - num))

    return dp.m.make_user_measurement(EXACT_DOMAIN, dp.symmetric_distance(), measure, release, privacy_map)


def noise_measurement(plan: Any, calibrated: Any, stage: ExactStage | None = None) -> tuple[Any, Any]:
    """(runs, charged): the measurement over the exact stage's result at the calibrated scales, and what it costs
    (its zCDP form converted to (epsilon, delta) as the polars plan's is)."""
    stage = stage or compile_stage(plan)
    laplace = calibrated.mechanism == LAPLACE
    measure = dp.max_divergence() if laplace else dp.zero_concentrated_divergence()
    summary = calibrated.summary
    parts = []
    for j, (stat, exact) in enumerate(zip(plan.statistics, stage.statistics)):
        scale = float(summary[statistic_name(j)]["scale"])
        if exact.kind == "quantile":
            parts.append(_quantile(j, list(exact.candidates), stat.quantile, plan.metadata.max_rows, stage.size,
                                   scale, measure, bool(stage.group_by)))
        else:  # a count, a distinct count (per_row 1: a row adds or removes one value of its group) or a sum
            parts.append(_plain(j, exact.per_row, stage.size, scale, laplace))
    runs = parts[0] if len(parts) == 1 else dp.c.make_composition(parts)
    if laplace:
        return runs, runs
    return runs, dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(runs), calibrated.delta_target)


def release_frame(plan: Any, stage: ExactStage, runs: Any, result: ExactResult) -> pl.DataFrame:
    """Noise once on the exact result -> the released statistics, shaped as the polars plan's frame."""
    released = runs(result)
    if len(stage.statistics) == 1:
        released = [released]
    columns: dict[str, pl.Series] = {}
    for n, key in enumerate(stage.group_by):
        dtype = POLARS_TYPES[plan.metadata.column(key).type]
        columns[key] = pl.Series(key, [k[n] for k in stage.keys], dtype=dtype)
    for j, values in enumerate(released):
        columns[statistic_name(j)] = pl.Series(statistic_name(j), list(values))
    return pl.DataFrame(columns)
