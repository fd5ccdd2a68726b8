"""What worker processes run: plain data in, plain data out (a spec, public metadata, a price, a file path).
The service calls these through the worker pool; they never see a request or a user."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import polars as pl

from ..errors import DatasetUnavailable, QueryRejected
from . import engines, locations, noise
from .exact import ExactStage, compile_stage
from .metadata import POLARS
from .plan import Calibrated, Plan
from .workers import note_data_access


def preview_task(
    spec: dict[str, Any], metadata: dict[str, Any], epsilon: float, delta: float, bounds: dict[str, Any] | None,
    backend: str = POLARS,
) -> dict[str, Any]:
    plan = Plan.from_json(spec, metadata, bounds)
    calibrated = plan.calibrate(epsilon, delta)
    if backend != POLARS:
        # the exact stage's own refusals (a sum that could overflow int64) come now, before anything is charged
        _exact_entry(plan, calibrated)
    return {"epsilon": calibrated.epsilon, "delta": calibrated.delta, "delta_target": calibrated.delta_target,
            "plan": plan.describe(calibrated) | {"backend": backend}}


def _exact_entry(plan: Plan, calibrated: Calibrated) -> tuple[ExactStage, Any]:
    """The exact stage and the noise measurement that runs on it, refused if that measurement would cost more
    than the polars plan the price came from (checked once, when built: both are functions of the plan)."""
    stage = compile_stage(plan)
    runs, charged = noise.noise_measurement(plan, calibrated, stage)
    epsilon, delta = plan.cost(charged)
    if epsilon > calibrated.epsilon + 1e-12 or delta > calibrated.delta + 1e-15:  # pragma: no cover - invariant
        raise QueryRejected("the exact-stage engine would cost more than the plan; nothing was released")
    return stage, runs


# A warm worker keeps the measurements it built and the scans it opened: a repeated query shape pays only for
# its execution. Both are plain functions of their keys, so a cached entry is the same as a rebuilt one.
_PREPARED: OrderedDict[str, tuple[Plan, Calibrated, dict[str, Any], list[Any]]] = OrderedDict()
_EXACT: OrderedDict[str, tuple[ExactStage, Any]] = OrderedDict()  # same keys as _PREPARED
_SCANS: OrderedDict[str, pl.LazyFrame] = OrderedDict()
_CACHE_SIZE = 256


def _prepared(key: str, spec: dict[str, Any], metadata: dict[str, Any], bounds: dict[str, Any] | None,
              mechanism: str, scale: float, delta: float) -> tuple[Plan, Calibrated, dict[str, Any], list[Any]]:
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
        _SCANS[parquet_path] = locations.scan(parquet_path)
        if len(_SCANS) > _CACHE_SIZE:
            _SCANS.popitem(last=False)
    return _SCANS[parquet_path]


def _exact_prepared(key: str, plan: Plan, calibrated: Calibrated) -> tuple[ExactStage, Any]:
    if key not in _EXACT:
        _EXACT[key] = _exact_entry(plan, calibrated)
        if len(_EXACT) > _CACHE_SIZE:
            _EXACT.popitem(last=False)
    return _EXACT[key]


def release_task(
    spec: dict[str, Any],
    metadata: dict[str, Any],
    bounds: dict[str, Any] | None,
    parquet_path: str,
    price: dict[str, Any],
    backend: str = POLARS,
    spark_remote: str | None = None,
) -> dict[str, Any]:
    """Run the query with the mechanism and scale a preview fixed and whose cost was reserved; refuse if the
    cost changed. The polars backend runs OpenDP's plan on the data; the others run the exact stage in their
    engine, then add the noise here."""
    plan_doc = price["plan"]
    key = json.dumps([spec, metadata, bounds, plan_doc["mechanism"], plan_doc["scale"], price["delta_target"]],
                     sort_keys=True)
    plan, calibrated, described, tables = _prepared(key, spec, metadata, bounds, plan_doc["mechanism"],
                                                    plan_doc["scale"], price["delta_target"])
    if calibrated.epsilon > price["epsilon"] or calibrated.delta > price["delta"]:
        raise QueryRejected("the query's privacy cost changed since it was reserved; nothing was released")
    if backend != POLARS:
        stage, runs = _exact_prepared(key, plan, calibrated)
    if not locations.available(parquet_path):  # moved, deleted or unreachable: nothing was read
        raise DatasetUnavailable("the dataset's data is missing on the service (an admin has been told); nothing "
                                 "was released")
    note_data_access()  # from here on, a failure can depend on the data: it will be charged
    if backend == POLARS:
        raw = calibrated.release(_scan(parquet_path))
    else:
        raw = noise.release_frame(plan, stage, runs, engines.run_stage(stage, parquet_path, backend, spark_remote))
    result = plan.postprocess(raw, described, tables)
    described = described | {"choice": price["plan"].get("choice"), "backend": backend}
    return {"epsilon": calibrated.epsilon, "delta": calibrated.delta, "plan": described,
            "aggregates": described["aggregates"], **result}
