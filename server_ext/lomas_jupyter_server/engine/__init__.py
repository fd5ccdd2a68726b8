"""The engine room: SQL to a query spec, public metadata, statistics planning, calibration and accuracy, the
execution backends, and the worker processes that run them.

May import: `errors` and third-party libraries only (never `api`, `service`, `store` or `hub`). Backends: OpenDP's
polars plan (`polars_backend`) for small data; for big data, an exact stage (`exact`) that an engine runs
(`engines`: DuckDB, polars streaming, Spark) and a noise stage (`noise`) that OpenDP adds here. `tasks` is what
workers run; the service names them (`PREVIEW_TASK`, ...) and never imports them.

The names below load their module on first use (PEP 562): the service process needs metadata, SQL and the
worker pool, and should not pay for importing OpenDP, SciPy and the engines that only its workers run.
"""

from __future__ import annotations

import importlib
from typing import Any

# what workers run, by name (module:function): the service sends a name, the worker imports the function
PREVIEW_TASK = "lomas_jupyter_server.engine.tasks:preview_task"
RELEASE_TASK = "lomas_jupyter_server.engine.tasks:release_task"
METADATA_WARNINGS_TASK = "lomas_jupyter_server.engine.statistics:metadata_warnings"

_HOMES = {
    "metadata": ("EMBEDDED", "POLARS", "POLARS_TYPES", "SPARK", "BackendSettings", "effective_bounds",
                 "polars_schema"),
    "plan": ("ALPHA", "GAUSSIAN", "LAPLACE", "MECHANISM_NAMES", "Calibrated", "Plan", "noise_ratio", "summarize"),
    "polars_backend": ("build_plan", "collect_release", "input_domain"),
    "statistics": ("PLAIN", "QUANTILES", "Recipe", "Statistic", "centre", "fixed_point_step",
                   "float_sum_inflation", "metadata_warnings", "plan_statistics", "quantile_candidates",
                   "statistic_name"),
    "tasks": ("preview_task", "release_task"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = ["METADATA_WARNINGS_TASK", "PREVIEW_TASK", "RELEASE_TASK", *sorted(_MODULE_OF)]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next use is a plain attribute
    return value
