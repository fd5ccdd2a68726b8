"""Dataset import: CSV or Parquet in, validated parquet in the service's data folder out.

The admin's metadata is checked against the data; a mismatch is refused with a message that names the column
and the rule, never a data value.
"""

from __future__ import annotations

import datetime
import io
import logging
import math
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ..engine import POLARS_TYPES, locations
from ..engine.engines import data_checks
from ..engine.exact import balanced
from ..engine.metadata import DatasetMetadata, parse_metadata
from ..errors import BadRequest, DatasetUnavailable, MetadataError
from ..store import AdminStore, DatasetRecord

NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
Progress = Callable[[str], None]


def check_dataset_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise BadRequest("dataset names are 1-64 letters, digits or underscores, not starting with a digit")
    return name


def _scan(source: str | Path | bytes, fmt: str | None, parse_dates: bool = False) -> pl.LazyFrame:
    remote = isinstance(source, str) and locations.is_remote(source)
    folder = not remote and not isinstance(source, bytes) and Path(source).is_dir()
    if fmt is None:
        if isinstance(source, bytes):
            raise BadRequest("say which format the uploaded data is in: csv or parquet")
        fmt = "parquet" if folder or (remote and source.endswith("/")) else Path(source).suffix.lower().lstrip(".")
    if folder:
        if fmt != "parquet":
            raise BadRequest("a folder of data must hold Parquet files (.parquet)")
        parts = locations.parquet_files(str(source))
        if not parts:
            raise BadRequest("the folder holds no .parquet files")
        try:
            return pl.scan_parquet(parts)
        except Exception:
            raise BadRequest("the data could not be read as PARQUET") from None
    if remote and fmt != "parquet":
        raise BadRequest("data in an object store must be Parquet: a .parquet file, or a folder URL ending in '/'")
    if fmt not in ("csv", "parquet"):
        raise BadRequest("data must be CSV or Parquet (.csv or .parquet)")
    if remote:
        if not locations.available(str(source)):
            raise BadRequest("the data could not be found in the object store (check the URL and the service's "
                             "object-store settings)")
        return locations.scan(str(source))
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise BadRequest("the data file does not exist or is not a file")
    try:
        if fmt == "csv":
            data = io.BytesIO(source) if isinstance(source, bytes) else source
            # a draft reads ISO dates as dates; an import reads text and casts to the declared types
            frame = pl.read_csv(data, null_values=["NA", "", "null", "NULL"], infer_schema_length=10_000,
                                try_parse_dates=parse_dates)
            return frame.lazy()
        if isinstance(source, bytes):
            return pl.read_parquet(io.BytesIO(source)).lazy()
        return pl.scan_parquet(source)
    except BadRequest:
        raise
    except Exception:
        raise BadRequest(f"the data could not be read as {fmt.upper()}") from None


DRAFT_MAX_STRING_CATEGORIES = 50
DRAFT_MAX_INT_CATEGORIES = 20


def _nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten above value (strictly: a file of 500 rows must not propose
    500, which would publish its size): a public-looking row bound."""
    magnitude = 1
    while True:
        for factor in (1, 2, 5):
            if factor * magnitude > value:
                return factor * magnitude
        magnitude *= 10


def _outward_bounds(lo: float, hi: float, whole: bool) -> tuple[float, float]:
    """Round [lo, hi] outward to the order of magnitude of its span, so no bound sits at a data value."""
    span = hi - lo
    step = 10.0 ** math.floor(math.log10(span)) if span > 0 else 10.0 ** math.floor(math.log10(abs(lo) or 1))
    if whole:
        step = max(step, 1.0)
    low, high = math.floor(lo / step) * step, math.ceil(hi / step) * step
    if span == 0:  # a constant column: keep its value strictly inside
        low, high = low - step, high + step
    return (int(low), int(high)) if whole else (round(low, 12), round(high, 12))


def propose_metadata(source: str | Path | bytes, fmt: str | None = None) -> dict[str, Any]:
    """A first draft of the metadata, for the data owner to review; nothing in it is saved or shown to analysts.

    Everything proposed from the data is data-dependent, so each such choice comes with a review note: bounds
    are rounded outward, small integer ranges get every value in the range (not the values seen), and string
    categories list what the data holds, which the owner must prune to what is public knowledge.
    """
    frame = _scan(source, fmt, parse_dates=True)
    try:
        schema = frame.collect_schema()
        stats_exprs: list[pl.Expr] = [pl.len().alias("__rows")]
        for name, dtype in schema.items():
            c = pl.col(name)
            stats_exprs.append(c.null_count().alias(f"{name}__nulls"))
            if dtype.is_numeric() or dtype == pl.Date:
                finite = c.fill_nan(None) if dtype.is_float() else c
                stats_exprs += [finite.min().alias(f"{name}__min"), finite.max().alias(f"{name}__max")]
            elif dtype != pl.Boolean:
                stats_exprs.append(c.n_unique().alias(f"{name}__distinct"))
        stats = frame.select(stats_exprs).collect().row(0, named=True)
    except Exception:
        raise BadRequest("the data could not be read to propose metadata") from None
    rows = stats["__rows"]
    review: list[dict[str, Any]] = []

    def note(column: str | None, field: str, text: str) -> None:
        review.append({"column": column, "field": field, "note": text})

    note(None, "privacy_unit", "1 assumes each person has at most one row; set the most rows one person can have")
    note(None, "max_rows", "the data's row count rounded up; it is public, so choose a bound that does not "
         "reveal the exact size")
    columns: dict[str, dict[str, Any]] = {}
    for name, dtype in schema.items():
        spec: dict[str, Any] = {"nullable": bool(stats[f"{name}__nulls"])}
        if dtype == pl.Boolean:
            spec["type"] = "bool"
        elif dtype == pl.Date:
            spec["type"] = "date"
            first, last = stats[f"{name}__min"], stats[f"{name}__max"]
            if first is not None and last is not None:  # whole years around the data's dates
                spec["bounds"] = [f"{first.year}-01-01", f"{last.year}-12-31"]
                note(name, "bounds", "the first and last days of the years the data's dates fall in; confirm they "
                     "follow from public knowledge (its date parts, YEAR(...) and so on, take their groups from them)")
            else:
                note(name, "bounds", "no dates to propose a range from; add bounds to group by its date parts")
        elif dtype.is_integer() or dtype.is_float():
            whole = dtype.is_integer()
            spec["type"] = "int" if whole else "float"
            lo, hi = stats[f"{name}__min"], stats[f"{name}__max"]
            if lo is not None and hi is not None:
                bounds = _outward_bounds(float(lo), float(hi), whole)
                spec["bounds"] = list(bounds)
                if whole and bounds[1] - bounds[0] < DRAFT_MAX_INT_CATEGORIES:
                    spec["categories"] = list(range(int(bounds[0]), int(bounds[1]) + 1))
                note(name, "bounds", "from the data's smallest and largest values, rounded outward; confirm "
                     "they follow from public knowledge")
            else:
                note(name, "bounds", "no values to propose bounds from; add bounds to use it in sums")
        else:
            spec["type"] = "string"
            distinct = stats.get(f"{name}__distinct") or 0
            if dtype != pl.String:
                note(name, "type", f"its {dtype} values are kept as text")
            if 0 < distinct - spec["nullable"] <= DRAFT_MAX_STRING_CATEGORIES:
                values = (frame.select(pl.col(name).cast(pl.String).drop_nulls().unique().sort())
                          .collect().to_series().to_list())
                spec["categories"] = values
                note(name, "categories", "every value in the data; remove any that is not public knowledge "
                     "(a rare value listed here tells that someone has it)")
            else:
                note(name, "categories", "too many distinct values to list, so analysts cannot group by it")
        spec = {"type": spec.pop("type"), **spec}
        columns[name] = spec
    metadata = {"description": "", "privacy_unit": 1, "max_rows": _nice_ceiling(max(rows, 1)), "columns": columns}
    parse_metadata(metadata)  # a draft is always a valid starting point
    return {"metadata": metadata, "review": review, "rows": rows}


def validate_frame(frame: pl.LazyFrame, metadata: DatasetMetadata, parts: list[str] | None = None,
                   progress: Progress | None = None, in_place: bool = False) -> pl.LazyFrame:
    """Cast to the declared types and check every declared property; returns the typed frame. The checks stream,
    part by part when the data is a folder of parts (or a bucket prefix), with a progress line per part: local
    data used in place in DuckDB, the rest in polars' streaming engine (both in bounded memory). Data used in
    place must already have the declared types and use null, not NaN, for a missing float (every backend reads
    it as it is)."""
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
    if in_place:
        for col in metadata.columns:
            if schema[col.name] != POLARS_TYPES[col.type]:
                raise MetadataError(f"column '{col.name}' is stored as {schema[col.name]}, not the declared "
                                    f"'{col.type}'; data used in place must have the declared types (import a "
                                    "copy instead, which converts them)")
    typed = []
    for col in metadata.columns:
        expr = pl.col(col.name)
        if schema[col.name] in (pl.Float32, pl.Float64) and not in_place:
            expr = expr.fill_nan(None)
        typed.append(expr.cast(POLARS_TYPES[col.type], strict=True).alias(col.name))
    checks: list[pl.Expr] = [pl.len().alias("__rows")]
    for col in metadata.columns:
        c = pl.col(col.name)
        checks.append(c.null_count().alias(f"{col.name}__nulls"))
        if in_place and col.type == "float":
            checks.append(c.is_nan().sum().alias(f"{col.name}__nan"))
        if col.bounds is not None:
            lo, hi = col.bounds
            checks.append(((c < lo) | (c > hi)).sum().alias(f"{col.name}__outside"))
        if col.categories is not None:
            # equalities, not is_in: polars' streaming engine holds a whole string column for is_in (with it, the
            # checks of a 10^8-row part took 3.1 GB, growing with the rows; like this, 82 MB)
            known = balanced([c == value for value in col.categories], "or")
            checks.append((c.is_not_null() & ~known).sum().alias(f"{col.name}__unknown"))
    say = progress or (lambda _msg: None)
    # local data used in place (already typed) is checked by DuckDB, part by part, in bounded memory; the rest
    # by polars' streaming engine after the casts
    local_in_place = in_place and parts is not None and not locations.is_remote(parts[0])
    scans: list[Any] = list(parts) if local_in_place else (
        [pl.scan_parquet(part) for part in parts] if parts and len(parts) > 1 else [frame])
    stats: dict[str, int] = {}
    try:
        for n, scan in enumerate(scans, 1):
            if local_in_place:
                part = data_checks(scan, metadata)
            else:
                part = scan.select(typed).select(checks).collect(engine="streaming").row(0, named=True)
            for key, value in part.items():
                stats[key] = stats.get(key, 0) + int(value or 0)
            if len(scans) > 1:
                say(f"checked part {n} of {len(scans)} ({stats['__rows']:,} rows so far)")
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
        if stats.get(f"{col.name}__nan"):
            raise MetadataError(f"column '{col.name}' holds NaN values; data used in place must use null for a "
                                "missing value (import a copy instead, which converts them)")
        if not col.nullable and stats[f"{col.name}__nulls"]:
            raise MetadataError(f"column '{col.name}' has missing values but the metadata says nullable: false")
        if stats.get(f"{col.name}__outside"):
            raise MetadataError(
                f"column '{col.name}' has values outside its declared bounds {col.to_json().get('bounds')}; "
                "widen the bounds or clean the data"
            )
        if stats.get(f"{col.name}__unknown"):
            raise MetadataError(
                f"column '{col.name}' has values that are not in its public category list; "
                "list every category or clean the data"
            )
    return frame.select(typed)


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
    target_url: str | None = None,
    in_place: bool = False,
) -> DatasetRecord:
    """Check the data against its metadata, then keep a typed parquet copy: in the storage folder, or under the
    object-store prefix `target_url`; with `in_place`, an object-store source is checked and used where it is."""
    say = progress or (lambda _msg: None)
    check_dataset_name(name)
    metadata = parse_metadata(metadata_doc)
    if in_place and isinstance(source, bytes):
        raise BadRequest("uploaded data cannot be used in place; it is copied")
    if target_url is not None and not locations.is_remote(target_url):
        raise BadRequest("the import target must be an object-store URL (s3://bucket/prefix)")
    say("reading the data")
    frame = _scan(source, fmt)
    say("checking the data against the metadata")
    local = not isinstance(source, bytes) and not locations.is_remote(str(source))
    parts = locations.parquet_files(str(source)) if local and (in_place or Path(source).is_dir()) else None
    if in_place and not local and str(source).endswith("/"):  # a bucket prefix: checked part by part too
        try:
            parts = locations.remote_parquet_files(str(source))
        except OSError:  # the message names the endpoint
            raise BadRequest("the object store could not be listed (check the object-store settings)") from None
        if not parts:
            raise BadRequest("no parquet files under that prefix")
    if in_place and local and Path(source).suffix.lower() == ".csv":
        raise BadRequest("only Parquet data can be used in place; CSV is copied")
    typed = validate_frame(frame, metadata, parts, say, in_place)
    if in_place:
        # absolute: the service may run in another folder than the one the admin imported from
        location = str(Path(source).resolve()) if local else str(source)
    elif target_url is not None:
        location = f"{target_url.rstrip('/')}/{name}/{uuid.uuid4().hex}.parquet"
        say("writing parquet to the object store")
        try:
            typed.sink_parquet(location)  # one PUT: the object appears whole or not at all
        except Exception:
            raise BadRequest("the data could not be written to the object store (check the service's "
                             "object-store settings)") from None
    else:
        # absolute: a service started from another folder than `lomas-admin --storage-dir store` finds it
        target_dir = Path(data_dir).resolve() / "datasets" / name
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / f"{uuid.uuid4().hex}.parquet"
        tmp = target.with_suffix(".tmp")
        say("writing parquet")
        typed.sink_parquet(tmp)
        tmp.rename(target)
        location = str(target)
    record = store.put_dataset(
        name,
        description if description is not None else metadata.description,
        metadata.to_json(),
        location,
        actor,
    )
    say(f"dataset '{name}' version {record.version} is ready")
    return record


DUMMY_ROWS = 1000


def data_file(storage_dir: str | Path, record: DatasetRecord) -> Path:
    """Where a dataset version's parquet file is. Stores made before paths were stored absolute hold a path
    relative to the folder `lomas-admin` ran in; such a file is looked up where every import writes it."""
    path = Path(record.parquet_path)
    if not path.is_absolute():
        path = Path(storage_dir).resolve() / "datasets" / record.name / path.name
    return path


def check_data_file(storage_dir: str | Path, record: DatasetRecord) -> str:
    """The dataset's file, or DatasetUnavailable (and a line in the service's log for the admin). The message
    names the dataset, never the path."""
    if locations.is_remote(record.parquet_path):
        return record.parquet_path  # the worker checks it is there, without reading a row, before it reads
    path = data_file(storage_dir, record)
    if not path.exists():
        logging.getLogger("lomas_jupyter_server").error(
            "dataset '%s' version %s: its data file %s is missing; re-import the dataset", record.name,
            record.version, path)
        raise DatasetUnavailable(f"dataset '{record.name}' is unavailable: its data is missing on the service "
                                 "(an admin has been told). Nothing was charged")
    return str(path)


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
        elif col.type == "date":
            first, last = col.bounds or (datetime.date(2000, 1, 1), datetime.date(2000, 12, 31))
            values = [first + datetime.timedelta(days=int(d)) for d in rng.integers(0, (last - first).days + 1, rows)]
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
