"""Public dataset metadata: parsing, validation, and checking it against the data on import.

Everything in here is public by definition (it is shown to analysts); the data itself never is.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Any

import polars as pl

from ..errors import BadRequest, MetadataError, QueryRejected

COLUMN_TYPES = ("int", "float", "string", "bool", "date")
POLARS_TYPES: dict[str, pl.DataType] = {
    "int": pl.Int64(),
    "float": pl.Float64(),
    "string": pl.String(),
    "bool": pl.Boolean(),
    "date": pl.Date(),
}
MAX_CATEGORIES = 1000
MAX_CANDIDATES = 2000
DEFAULT_QUANTILE_CANDIDATES = 101


@dataclass(frozen=True)
class ColumnMetadata:
    name: str
    type: str
    nullable: bool = True
    bounds: tuple[float, float] | None = None
    categories: tuple[Any, ...] | None = None
    candidates: tuple[float, ...] | None = None
    description: str = ""

    @property
    def numeric(self) -> bool:
        return self.type in ("int", "float")

    @property
    def group_keys(self) -> tuple[Any, ...]:
        """Every group a GROUP BY on this column has: the public categories, and NULL when the column may hold
        it (that nulls can occur is public; SQL keeps them as a group)."""
        return tuple(self.categories or ()) + ((None,) if self.nullable else ())

    def quantile_candidates(self) -> list[float] | list[int]:
        """Candidates for quantiles: the declared list, else an even grid over the bounds."""
        if self.candidates:
            return list(self.candidates)
        if self.bounds is None:
            raise MetadataError(f"column '{self.name}' has no bounds, so quantiles are not available")
        lo, hi = self.bounds
        if self.type == "int":
            lo_i, hi_i = math.ceil(lo), math.floor(hi)
            step = max(1, math.ceil((hi_i - lo_i) / (DEFAULT_QUANTILE_CANDIDATES - 1)))
            return list(range(lo_i, hi_i + 1, step))
        n = DEFAULT_QUANTILE_CANDIDATES
        return [lo + (hi - lo) * i / (n - 1) for i in range(n)]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "nullable": self.nullable}
        if self.bounds is not None:
            out["bounds"] = [v.isoformat() if isinstance(v, datetime.date) else v for v in self.bounds]
        if self.categories is not None:
            out["categories"] = list(self.categories)
        if self.candidates is not None:
            out["candidates"] = list(self.candidates)
        if self.description:
            out["description"] = self.description
        return out


@dataclass(frozen=True)
class DatasetMetadata:
    privacy_unit: int
    max_rows: int
    columns: tuple[ColumnMetadata, ...]
    description: str = ""
    backend: str = "auto"  # which engine runs its queries (engines.choose_backend); public, as the rest
    # a query's values computed before aggregation (sql.Derived), as columns with derived bounds: a plan's own
    derived: tuple[ColumnMetadata, ...] = ()

    def column(self, name: str) -> ColumnMetadata | None:
        for col in (*self.columns, *self.derived):
            if col.name == name:
                return col
        return None

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def to_json(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "privacy_unit": self.privacy_unit,
            "max_rows": self.max_rows,
            "columns": {c.name: c.to_json() for c in self.columns},
            **({"backend": self.backend} if self.backend != "auto" else {}),
        }


_DATASET_KEYS = {"description", "privacy_unit", "max_rows", "columns", "backend"}
BACKEND_NAMES = ("auto", "polars", "embedded", "spark")  # the engines a dataset may name (engines.py)
AUTO, POLARS, EMBEDDED, SPARK = BACKEND_NAMES
_COLUMN_KEYS = {"type", "nullable", "bounds", "categories", "candidates", "description"}


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MetadataError(f"{where} must be a finite number")
    return value


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MetadataError(f"{where} must be a positive whole number")
    return value


def _typed_value(value: Any, col_type: str, where: str) -> Any:
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "string": isinstance(value, str),
        "bool": isinstance(value, bool),
    }[col_type]
    if not ok:
        raise MetadataError(f"{where} must be of the column's type ({col_type})")
    return float(value) if col_type == "float" else value


def _date(value: Any, where: str) -> datetime.date:
    """A date bound: an ISO date in text (YAML may already have read it as a date)."""
    if isinstance(value, datetime.datetime):
        raise MetadataError(f"{where} must be dates (YYYY-MM-DD), not times")
    if isinstance(value, datetime.date):
        return value
    try:
        return datetime.date.fromisoformat(value)
    except (TypeError, ValueError):
        raise MetadataError(f"{where} must be dates written YYYY-MM-DD") from None


def parse_column(name: str, spec: Any) -> ColumnMetadata:
    where = f"column '{name}'"
    if not isinstance(spec, dict):
        raise MetadataError(f"{where}: expected a mapping with at least 'type'")
    unknown = set(spec) - _COLUMN_KEYS
    if unknown:
        raise MetadataError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_COLUMN_KEYS)}")
    col_type = spec.get("type")
    if col_type not in COLUMN_TYPES:
        raise MetadataError(f"{where}: type must be one of {list(COLUMN_TYPES)}")
    nullable = spec.get("nullable", True)
    if not isinstance(nullable, bool):
        raise MetadataError(f"{where}: nullable must be true or false")
    bounds: Any = None
    if "bounds" in spec:
        if col_type not in ("int", "float", "date"):
            raise MetadataError(f"{where}: bounds are only for int, float and date columns")
        raw = spec["bounds"]
        if not isinstance(raw, (list, tuple)) or len(raw) != 2:
            raise MetadataError(f"{where}: bounds must be [lower, upper]")
    if "bounds" in spec and col_type == "date":  # the public range of a date column, for its date parts
        first, last = (_date(v, f"{where}: bounds") for v in spec["bounds"])
        if first >= last:
            raise MetadataError(f"{where}: the first date must be before the last")
        bounds = (first, last)
    elif "bounds" in spec:
        lo, hi = (_number(v, f"{where}: bounds") for v in raw)
        if col_type == "int" and not (float(lo).is_integer() and float(hi).is_integer()):
            raise MetadataError(f"{where}: bounds of an int column must be whole numbers")
        if lo >= hi:
            raise MetadataError(f"{where}: lower bound must be below upper bound")
        bounds = (int(lo), int(hi)) if col_type == "int" else (float(lo), float(hi))
    categories = None
    if "categories" in spec:
        raw = spec["categories"]
        if col_type in ("float", "date"):
            raise MetadataError(f"{where}: {col_type} columns cannot have categories"
                                + ("; group by a date part such as YEAR(...) instead" if col_type == "date" else ""))
        if not isinstance(raw, list) or not raw:
            raise MetadataError(f"{where}: categories must be a non-empty list")
        if len(raw) > MAX_CATEGORIES:
            raise MetadataError(f"{where}: at most {MAX_CATEGORIES} categories")
        values = tuple(_typed_value(v, col_type, f"{where}: each category") for v in raw)
        if len(set(values)) != len(values):
            raise MetadataError(f"{where}: categories must be unique")
        categories = values
    candidates = None
    if "candidates" in spec:
        raw = spec["candidates"]
        if col_type not in ("int", "float"):
            raise MetadataError(f"{where}: candidates are only for int and float columns")
        if not isinstance(raw, list) or len(raw) < 2 or len(raw) > MAX_CANDIDATES:
            raise MetadataError(f"{where}: candidates must be a list of 2 to {MAX_CANDIDATES} numbers")
        values = tuple(_typed_value(v, col_type, f"{where}: each candidate") for v in raw)
        if list(values) != sorted(set(values)):
            raise MetadataError(f"{where}: candidates must be strictly increasing")
        candidates = values
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise MetadataError(f"{where}: description must be text")
    return ColumnMetadata(name, col_type, nullable, bounds, categories, candidates, description)


def parse_metadata(doc: Any) -> DatasetMetadata:
    """Validate an admin-supplied metadata document (already loaded from YAML or JSON)."""
    if not isinstance(doc, dict):
        raise MetadataError("metadata must be a mapping with 'privacy_unit', 'max_rows' and 'columns'")
    unknown = set(doc) - _DATASET_KEYS
    if unknown:
        raise MetadataError(f"unknown metadata keys {sorted(unknown)}; allowed: {sorted(_DATASET_KEYS)}")
    for key in ("privacy_unit", "max_rows", "columns"):
        if key not in doc:
            raise MetadataError(f"metadata is missing '{key}'")
    privacy_unit = _positive_int(doc["privacy_unit"], "privacy_unit (max rows per individual)")
    max_rows = _positive_int(doc["max_rows"], "max_rows (public bound on the row count)")
    raw_columns = doc["columns"]
    if not isinstance(raw_columns, dict) or not raw_columns:
        raise MetadataError("columns must be a non-empty mapping of column name to its description")
    columns = []
    for name, spec in raw_columns.items():
        if not isinstance(name, str) or not name or name.startswith("__"):
            raise MetadataError("column names must be non-empty text not starting with '__'")
        columns.append(parse_column(name, spec))
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise MetadataError("description must be text")
    backend = doc.get("backend", "auto")
    if backend not in BACKEND_NAMES:
        raise MetadataError(f"backend must be one of {list(BACKEND_NAMES)}")
    return DatasetMetadata(privacy_unit, max_rows, tuple(columns), description, backend)


def polars_schema(metadata: DatasetMetadata) -> pl.Schema:
    return pl.Schema({c.name: POLARS_TYPES[c.type] for c in metadata.columns})


def effective_bounds(
    metadata: DatasetMetadata, overrides: dict[str, Any] | None
) -> dict[str, tuple[float, float]]:
    """Metadata bounds, narrowed (never widened) by the user's overrides."""
    # a date column's range is not a clipping bound: its date parts derive theirs from it (expressions.py)
    bounds = {c.name: c.bounds for c in metadata.columns if c.bounds is not None and c.numeric}
    for name, raw in (overrides or {}).items():
        col = metadata.column(name)
        if col is None:
            raise BadRequest(f"bounds: unknown column '{name}'")
        if col.bounds is None:
            raise BadRequest(f"bounds: column '{name}' has no public bounds to narrow")
        if not col.numeric:
            raise BadRequest(f"bounds: column '{name}' is a {col.type}: only numeric bounds can be narrowed")
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


@dataclass(frozen=True)
class BackendSettings:
    """The service's engine settings (LomasApp.embedded_from_rows and spark_remote)."""

    embedded_from_rows: int = 0
    spark_remote: str | None = None

    def choose(self, metadata: dict[str, Any]) -> str:
        """A dataset's backend: its metadata's `backend`; auto means the embedded engine from embedded_from_rows
        rows of public max_rows (0: never), OpenDP's polars plan below. Public: it depends on metadata only."""
        named = metadata.get("backend", AUTO)
        if named == SPARK and not self.spark_remote:
            raise QueryRejected("this dataset is served by Spark, but the service has no Spark cluster "
                                "configured (LomasApp.spark_remote)")
        if named != AUTO:
            return named
        if self.embedded_from_rows and metadata["max_rows"] >= self.embedded_from_rows:
            return EMBEDDED
        return POLARS
