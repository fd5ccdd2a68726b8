"""The engine room: SQL to a query spec, public metadata, statistics planning, calibration and accuracy, the
execution backend (OpenDP's polars plan today), and the worker processes that run it.

May import: `errors` and third-party libraries only (never `api`, `service`, `store` or `hub`). Backends: OpenDP's
polars plan (`polars_backend`) for small data; for big data, an exact stage (`exact`) that an engine runs
(`engines`: DuckDB, polars streaming, Spark) and a noise stage (`noise`) that OpenDP adds here. `tasks` is what
workers run.
"""

from __future__ import annotations

from .engines import EMBEDDED, POLARS, SPARK, BackendSettings
from .plan import (
    ALPHA,
    GAUSSIAN,
    LAPLACE,
    MECHANISM_NAMES,
    Calibrated,
    Plan,
    check_epsilon,
    noise_ratio,
    summarize,
)
from .polars_backend import build_plan, collect_release, input_domain
from .statistics import (
    PLAIN,
    POLARS_TYPES,
    QUANTILES,
    Recipe,
    Statistic,
    centre,
    effective_bounds,
    fixed_point_step,
    float_sum_inflation,
    metadata_warnings,
    plan_statistics,
    polars_schema,
    quantile_candidates,
    statistic_name,
)
from .tasks import preview_task, release_task

__all__ = [
    "ALPHA", "EMBEDDED", "GAUSSIAN", "LAPLACE", "MECHANISM_NAMES", "PLAIN", "POLARS", "POLARS_TYPES", "QUANTILES",
    "SPARK", "BackendSettings", "Calibrated", "Plan",
    "Recipe", "Statistic", "build_plan", "centre", "check_epsilon", "collect_release", "effective_bounds",
    "fixed_point_step", "float_sum_inflation", "input_domain", "metadata_warnings", "noise_ratio",
    "plan_statistics", "polars_schema", "preview_task", "quantile_candidates", "release_task", "statistic_name",
    "summarize",
]
