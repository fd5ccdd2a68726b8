"""The noise stage for engines that compute the exact stage (`exact`): OpenDP's own measurements on its integers,
in this worker, once per query. Never on an executor.

Each statistic is `make_user_transformation` (the engine's work, declared stable from public metadata alone: one
row changes one key's term by at most `per_row`) chained with the noise the polars plan would add, at the scale
its summary names. The transformation's function picks the statistic's vector from the one result the engine
returned for all of them: the engine is deterministic, so one run serves every statistic. A quantile scores its
candidates from the counts below and above each (OpenDP's score, with OpenDP's own weights), then runs OpenDP's
noisy max per key. What is charged is this measurement's `map(d_in)`, and the release refuses to run if that is
above the price the polars plan set: on every backend the same query costs the same.
"""

from __future__ import annotations

from typing import Any

import opendp.prelude as dp
import polars as pl

from .exact import ExactResult, ExactStage, compile_stage
from .statistics import POLARS_TYPES, statistic_name

dp.enable_features("contrib", "honest-but-curious")

LAPLACE = "laplace"  # as plan.LAPLACE (plan imports this module)


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


def _score_weights(candidates: list[Any], alpha: float, atom: str) -> tuple[Any, int, int]:
    """OpenDP's score transformation and its weights: score = |(den - num) * below - num * above|, read from
    OpenDP itself on two public one-value inputs (one below every candidate, one above)."""
    atoms = dp.atom_domain(T=atom) if atom == "i64" else dp.atom_domain(T=atom, nan=False)
    score = dp.t.make_quantile_score_candidates(dp.vector_domain(atoms), dp.symmetric_distance(), candidates, alpha)
    pad = 1 if atom == "i64" else 1.0
    num = int(score([max(candidates) + pad])[0])  # below 0, above 1
    rest = int(score([min(candidates) - pad])[0])  # below 1, above 0
    return score, num, rest


def _quantile(j: int, candidates: list[Any], alpha: float, atom: str, size: int, scale: float, measure: Any,
              grouped: bool) -> Any:
    score, num, rest = _score_weights(candidates, alpha, atom)
    noisy_max = dp.m.make_noisy_max(dp.vector_domain(dp.atom_domain(T="u64"), size=len(candidates)),
                                    dp.linf_distance(T="u64"), measure, scale, negate=True)

    def release(result: ExactResult) -> list[Any]:
        picked = []
        for below, above in result.values[j]:
            scores = [abs(rest * b - num * a) for b, a in zip(below, above)]
            picked.append(candidates[noisy_max(scores)])
        return picked

    def privacy_map(d_in: int) -> float:
        # each key's candidates are scored on that key's rows: d rows reach at most min(d, keys) keys (parallel
        # composition over keys), each by OpenDP's score sensitivity for d rows, as the polars plan charges
        keys = min(d_in, size) if grouped else 1
        return keys * noisy_max.map(score.map(d_in))

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
            col = plan.metadata.column(stat.column)
            atom = "i64" if col.type == "int" else "f64"
            parts.append(_quantile(j, list(exact.candidates), stat.quantile, atom, stage.size, scale, measure,
                                   bool(stage.group_by)))
        else:
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
