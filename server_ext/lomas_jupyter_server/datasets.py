"""Dataset import: CSV or Parquet in, validated parquet in the service's data folder out.

The admin's metadata is checked against the data; a mismatch is refused with a message that names the column
and the rule, never a data value.
"""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from .engine import POLARS_TYPES
from .errors import BadRequest, MetadataError
from .metadata import DatasetMetadata, parse_metadata
from .store import AdminStore, DatasetRecord

NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
Progress = Callable[[str], None]


def check_dataset_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise BadRequest("dataset names are 1-64 letters, digits or underscores, not starting with a digit")
    return name


def _scan(source: str | Path | bytes, fmt: str | None) -> pl.LazyFrame:
    if fmt is None:
        if isinstance(source, bytes):
            raise BadRequest("say which format the uploaded data is in: csv or parquet")
        fmt = Path(source).suffix.lower().lstrip(".")
    if fmt not in ("csv", "parquet"):
        raise BadRequest("data must be CSV or Parquet (.csv or .parquet)")
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise BadRequest("the data file does not exist or is not a file")
    try:
        if fmt == "csv":
            data = io.BytesIO(source) if isinstance(source, bytes) else source
            frame = pl.read_csv(data, null_values=["NA", "", "null", "NULL"], infer_schema_length=10_000)
            return frame.lazy()
        if isinstance(source, bytes):
            return pl.read_parquet(io.BytesIO(source)).lazy()
        return pl.scan_parquet(source)
    except BadRequest:
        raise
    except Exception:
        raise BadRequest(f"the data could not be read as {fmt.upper()}") from None


def validate_frame(frame: pl.LazyFrame, metadata: DatasetMetadata) -> pl.LazyFrame:
    """Cast to the declared types and check every declared property; returns the typed frame."""
    try:
        schema = frame.collect_schema()
    except Exception:
        raise BadRequest("the data could not be read") from None
    missing = [c for c in metadata.column_names if c not in schema]
    if missing:
        raise MetadataError(f"the data has no column(s) {missing} that the metadata describes")
    extra = [c for c in schema.names() if c not in metadata.column_names]
    if extra:
        raise MetadataError(
            f"the data has column(s) {extra} that the metadata does not describe; describe or drop them"
        )
    typed = []
    for col in metadata.columns:
        expr = pl.col(col.name)
        if schema[col.name] in (pl.Float32, pl.Float64):
            expr = expr.fill_nan(None)
        typed.append(expr.cast(POLARS_TYPES[col.type], strict=True).alias(col.name))
    casted = frame.select(typed)
    checks: list[pl.Expr] = [pl.len().alias("__rows")]
    for col in metadata.columns:
        c = pl.col(col.name)
        checks.append(c.null_count().alias(f"{col.name}__nulls"))
        if col.bounds is not None:
            lo, hi = col.bounds
            checks.append(((c < lo) | (c > hi)).sum().alias(f"{col.name}__outside"))
        if col.categories is not None:
            checks.append((c.is_not_null() & ~c.is_in(list(col.categories))).sum().alias(f"{col.name}__unknown"))
    try:
        stats = casted.select(checks).collect().row(0, named=True)
    except Exception:
        for col in metadata.columns:  # find the column whose values do not fit, to name it
            try:
                frame.select(pl.col(col.name).cast(POLARS_TYPES[col.type], strict=True)).collect()
            except Exception:
                raise MetadataError(
                    f"column '{col.name}': values do not fit the declared type '{col.type}'"
                ) from None
        raise BadRequest("the data could not be checked against the metadata") from None
    if stats["__rows"] > metadata.max_rows:
        raise MetadataError(f"the data has more rows than the declared max_rows ({metadata.max_rows})")
    if stats["__rows"] == 0:
        raise MetadataError("the data has no rows")
    for col in metadata.columns:
        if not col.nullable and stats[f"{col.name}__nulls"]:
            raise MetadataError(f"column '{col.name}' has missing values but the metadata says nullable: false")
        if stats.get(f"{col.name}__outside"):
            raise MetadataError(
                f"column '{col.name}' has values outside its declared bounds {list(col.bounds or ())}; "
                "widen the bounds or clean the data"
            )
        if stats.get(f"{col.name}__unknown"):
            raise MetadataError(
                f"column '{col.name}' has values that are not in its public category list; "
                "list every category or clean the data"
            )
    return casted


def import_dataset(
    store: AdminStore,
    data_dir: str | Path,
    name: str,
    source: str | Path | bytes,
    metadata_doc: Any,
    description: str | None = None,
    fmt: str | None = None,
    actor: str = "admin",
    progress: Progress | None = None,
) -> DatasetRecord:
    say = progress or (lambda _msg: None)
    check_dataset_name(name)
    metadata = parse_metadata(metadata_doc)
    say("reading the data")
    frame = _scan(source, fmt)
    say("checking the data against the metadata")
    typed = validate_frame(frame, metadata)
    target_dir = Path(data_dir) / "datasets" / name
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{uuid.uuid4().hex}.parquet"
    tmp = target.with_suffix(".tmp")
    say("writing parquet")
    typed.sink_parquet(tmp)
    tmp.rename(target)
    record = store.put_dataset(
        name,
        description if description is not None else metadata.description,
        metadata.to_json(),
        str(target),
        actor,
    )
    say(f"dataset '{name}' version {record.version} is ready")
    return record


DUMMY_ROWS = 1000


def dummy_frame(metadata: DatasetMetadata, rows: int, seed: int = 0) -> pl.DataFrame:
    """Rows made from public metadata alone (types, bounds, categories); they say nothing about the data."""
    rng = np.random.default_rng(seed)
    columns: dict[str, pl.Series] = {}
    for col in metadata.columns:
        dtype = POLARS_TYPES[col.type]
        if col.categories is not None:
            values: Any = rng.choice(np.array(col.categories, dtype=object), rows).tolist()
        elif col.type == "int":
            lo, hi = col.bounds or (0, 100)
            values = rng.integers(int(lo), int(hi) + 1, rows).tolist()
        elif col.type == "float":
            lo, hi = col.bounds or (0.0, 1.0)
            values = rng.uniform(lo, hi, rows).tolist()
        elif col.type == "bool":
            values = (rng.random(rows) < 0.5).tolist()
        else:
            values = [f"{col.name}_{i}" for i in rng.integers(0, 50, rows)]
        if col.nullable:
            values = [None if missing else v for v, missing in zip(values, rng.random(rows) < 0.05)]
        columns[col.name] = pl.Series(col.name, values, dtype=dtype)
    return pl.DataFrame(columns)


def dummy_parquet(storage_dir: str | Path, record: DatasetRecord) -> Path:
    """The dataset version's dummy table on disk (made once), so dummy queries run like real ones."""
    path = Path(storage_dir) / "dummy" / f"{record.name}-v{record.version}.parquet"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = min(DUMMY_ROWS, parse_metadata(record.metadata).max_rows)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        dummy_frame(parse_metadata(record.metadata), rows, seed=record.version).write_parquet(tmp)
        tmp.rename(path)
    return path
