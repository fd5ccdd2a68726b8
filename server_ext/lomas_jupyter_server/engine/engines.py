"""The engines that run an exact stage (`exact`) over a dataset's parquet data and hand back plain rows, one per
key seen: DuckDB (embedded, out of core, the default for big data), polars' streaming engine (embedded, for data
in an object store, which DuckDB cannot read here without downloading an extension) and Spark (a cluster, through
`spark_remote`: a master URL, or `sc://` for Spark Connect). Each supplies the vocabulary `exact` writes the stage
in; none of them sees anything of the client's, and none adds noise.

Which backend a dataset uses (`BackendSettings.choose`) is public: its metadata may name one, else big datasets (by
their public max_rows) use DuckDB and the rest OpenDP's polars plan.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import polars as pl

from ..errors import QueryRejected
from . import locations
from .exact import ExactResult, ExactStage, aggregations, balanced, densify
from .metadata import SPARK

DUCKDB, POLARS_STREAMING = "duckdb", "polars-streaming"  # the embedded backend's two engines


def engine_for(backend: str, location: str) -> str:
    """The embedded backend runs on DuckDB, except for data in an object store (polars' streaming engine)."""
    if backend == SPARK:
        return SPARK
    return POLARS_STREAMING if locations.is_remote(location) else DUCKDB


def run_stage(stage: ExactStage, location: str, backend: str, spark_remote: str | None = None) -> ExactResult:
    return densify(stage, exact_rows(stage, location, engine_for(backend, location), spark_remote))


def exact_rows(stage: ExactStage, location: str, engine: str, spark_remote: str | None = None
               ) -> list[dict[str, Any]]:
    """One engine's rows for the stage. Only workers (and tests) call this: the API has no way to reach it, and
    the exact numbers it returns go to `noise` and nowhere else."""
    if engine == SPARK:
        return _run_spark(stage, location, spark_remote)
    if engine == POLARS_STREAMING:
        return _run_polars_streaming(stage, location)
    return _run_duckdb(stage, location)


# --- polars' streaming engine -----------------------------------------------------------------------------------


class PolarsWords:
    """polars expressions; integer literals are Int64 so no sum is taken in 32 bits."""

    def col(self, name: str) -> pl.Expr:
        return pl.col(name)

    def lit(self, value: Any) -> pl.Expr:
        if isinstance(value, int) and not isinstance(value, bool):
            return pl.lit(value, dtype=pl.Int64)
        return pl.lit(value)

    def when(self, condition: pl.Expr, then: pl.Expr, otherwise: pl.Expr) -> pl.Expr:
        return pl.when(condition).then(then).otherwise(otherwise)

    def present(self, value: pl.Expr) -> pl.Expr:
        return value.is_not_null()

    def count(self, value: pl.Expr, name: str) -> pl.Expr:
        return value.count().cast(pl.Int64).alias(name)

    def count_distinct(self, value: pl.Expr, name: str) -> pl.Expr:
        return value.drop_nulls().n_unique().cast(pl.Int64).alias(name)

    def clip(self, value: pl.Expr, lo: pl.Expr, hi: pl.Expr) -> pl.Expr:
        return value.clip(lo, hi)

    def round_int64(self, value: pl.Expr) -> pl.Expr:
        return (value + 0.5).floor().cast(pl.Int64)

    def date_part(self, value: pl.Expr, part: str) -> pl.Expr:
        dt = value.dt
        return {"year": dt.year, "quarter": dt.quarter, "month": dt.month, "day": dt.day,
                "dow": dt.weekday}[part]().cast(pl.Int64)  # polars' weekday is ISO's

    def sum(self, value: pl.Expr, name: str) -> pl.Expr:
        return value.sum().alias(name)

    def rows(self, name: str) -> pl.Expr:
        return pl.len().cast(pl.Int64).alias(name)


def _run_polars_streaming(stage: ExactStage, location: str) -> list[dict[str, Any]]:
    words = PolarsWords()
    frame = locations.scan(location)
    computed = stage.computed_keys(words)
    if computed:
        frame = frame.with_columns([value.alias(name) for name, value in computed])
    aggs = aggregations(words, stage)
    query = frame.group_by(list(stage.group_by)).agg(aggs) if stage.group_by else frame.select(aggs)
    return query.collect(engine="streaming").to_dicts()


# --- DuckDB -----------------------------------------------------------------------------------------------------


class DuckDBWords:
    def __init__(self) -> None:
        import duckdb

        self.duckdb = duckdb

    def col(self, name: str) -> Any:
        return self.duckdb.ColumnExpression(name)  # it quotes the name itself

    def lit(self, value: Any) -> Any:
        return self.duckdb.ConstantExpression(value)

    def when(self, condition: Any, then: Any, otherwise: Any) -> Any:
        return self.duckdb.CaseExpression(condition, then).otherwise(otherwise)

    def present(self, value: Any) -> Any:
        return value.isnotnull()

    def count(self, value: Any, name: str) -> Any:
        return self.duckdb.FunctionExpression("count", value).alias(name)

    def count_distinct(self, value: Any, name: str) -> Any:
        # the expression API has no DISTINCT flag: the number of entries of the value histogram (memory grows
        # with the distinct values, not the rows; NULL is skipped; no rows give NULL, which densify reads as 0)
        histogram = self.duckdb.FunctionExpression("histogram", value)
        return self.duckdb.FunctionExpression("cardinality", histogram).alias(name)

    def clip(self, value: Any, lo: Any, hi: Any) -> Any:
        return self.duckdb.CaseExpression(value < lo, lo).when(value > hi, hi).otherwise(value)

    def date_part(self, value: Any, part: str) -> Any:
        name = {"year": "year", "quarter": "quarter", "month": "month", "day": "day", "dow": "isodow"}[part]
        return self.duckdb.FunctionExpression(name, value).cast(self.duckdb.sqltype("BIGINT"))

    def round_int64(self, value: Any) -> Any:
        # floor(v + 0.5): exact here (|v| <= 2^40, a float's step below 2^52), and a BIGINT in DuckDB
        half = self.duckdb.ConstantExpression(0.5)
        return self.duckdb.FunctionExpression("floor", value + half).cast(self.duckdb.sqltype("BIGINT"))

    def sum(self, value: Any, name: str) -> Any:
        # int64 throughout: compile_stage proved max_rows terms cannot overflow, so DuckDB's 128-bit SUM is not
        # needed (sum_no_overflow keeps the total in 64 bits, about a fifth faster)
        return self.duckdb.FunctionExpression("sum_no_overflow", value).alias(name)

    def rows(self, name: str) -> Any:
        return self.duckdb.FunctionExpression("count_star").alias(name)


def _quoted(name: str, quote: str) -> str:
    return quote + name.replace(quote, quote * 2) + quote


# DuckDB's settings for a worker: as many threads as the machine has (at most 8), a memory cap it spills past
# (LOMAS_DUCKDB_MEMORY, default 1GB), and its spill files in the system's temporary folder.
_DUCKDB: dict[str, Any] = {}
_DUCKDB_LOCK = threading.Lock()


def _duckdb_connection() -> Any:
    with _DUCKDB_LOCK:
        if "connection" not in _DUCKDB:
            import duckdb

            _DUCKDB["connection"] = duckdb.connect(config={
                "threads": min(os.cpu_count() or 1, 8),
                "memory_limit": os.environ.get("LOMAS_DUCKDB_MEMORY", "1GB"),
                "preserve_insertion_order": False,
            })
        return _DUCKDB["connection"]


def _run_duckdb(stage: ExactStage, location: str) -> list[dict[str, Any]]:
    words = DuckDBWords()
    con = _duckdb_connection().cursor()
    try:
        relation = con.read_parquet(locations.parquet_files(location))
        computed = stage.computed_keys(words)
        if computed:
            relation = relation.select(words.duckdb.StarExpression(), *[v.alias(n) for n, v in computed])
        aggs = aggregations(words, stage)
        if stage.group_by:
            keys = [words.col(k) for k in stage.group_by]
            query = relation.aggregate(keys + aggs, ", ".join(_quoted(k, '"') for k in stage.group_by))
        else:
            query = relation.aggregate(aggs)
        names = query.columns
        rows = query.fetchall()
    finally:
        con.close()
    # the key columns come back under their own names, the sums under theirs
    return [dict(zip(names, row)) for row in rows]


def data_checks(path: str, metadata: Any) -> dict[str, int]:
    """An import's checks of one local parquet file, in DuckDB (out of core: memory does not grow with the
    rows, where polars' streaming engine took about 4 GB per 10^8-row part): rows, and per column its nulls,
    NaNs, values outside the bounds and values outside the categories. The counts go to the admin's import only."""
    words = DuckDBWords()
    one, zero = words.lit(1), words.lit(0)
    checks = [words.rows("__rows")]
    for col in metadata.columns:
        c = words.col(col.name)
        checks.append(words.sum(words.when(c.isnull(), one, zero), f"{col.name}__nulls"))
        if col.type == "float":
            nan = words.duckdb.FunctionExpression("isnan", c)
            checks.append(words.sum(words.when(nan, one, zero), f"{col.name}__nan"))
        if col.bounds is not None:
            lo, hi = (words.lit(b) for b in col.bounds)
            checks.append(words.sum(words.when((c < lo) | (c > hi), one, zero), f"{col.name}__outside"))
        if col.categories is not None:
            known = balanced([c == words.lit(v) for v in col.categories], "or")
            checks.append(words.sum(words.when(c.isnotnull() & ~known, one, zero), f"{col.name}__unknown"))
    con = _duckdb_connection().cursor()
    try:
        query = con.read_parquet([path]).aggregate(checks)
        row = query.fetchall()[0]
        return {name: int(value or 0) for name, value in zip(query.columns, row)}
    finally:
        con.close()


# --- Spark ------------------------------------------------------------------------------------------------------


class SparkWords:
    def __init__(self) -> None:
        from pyspark.sql import functions

        self.f = functions

    def col(self, name: str) -> Any:
        return self.f.col(_quoted(name, "`"))

    def lit(self, value: Any) -> Any:
        return self.f.lit(value)

    def when(self, condition: Any, then: Any, otherwise: Any) -> Any:
        return self.f.when(condition, then).otherwise(otherwise)

    def present(self, value: Any) -> Any:
        return value.isNotNull()

    def count(self, value: Any, name: str) -> Any:
        return self.f.count(value).alias(name)

    def count_distinct(self, value: Any, name: str) -> Any:
        return self.f.countDistinct(value).alias(name)

    def clip(self, value: Any, lo: Any, hi: Any) -> Any:
        return self.f.when(value < lo, lo).when(value > hi, hi).otherwise(value)

    def date_part(self, value: Any, part: str) -> Any:
        if part == "dow":  # Spark's dayofweek counts from Sunday (1); ISO's from Monday
            return ((self.f.dayofweek(value) + 5) % 7 + 1).cast("long")
        fn = {"year": self.f.year, "quarter": self.f.quarter, "month": self.f.month, "day": self.f.dayofmonth}[part]
        return fn(value).cast("long")

    def round_int64(self, value: Any) -> Any:
        # floor(v + 0.5), a long in Spark: one addition and a floor per value, in double arithmetic (Spark's own
        # round goes through a decimal per value, 6x slower over 10^9 rows); exact, as |v| <= 2^40
        return self.f.floor(value + self.f.lit(0.5))

    def sum(self, value: Any, name: str) -> Any:
        return self.f.sum(value).alias(name)

    def rows(self, name: str) -> Any:
        return self.f.count(self.f.lit(1)).alias(name)


_SPARK: dict[str, Any] = {}


def spark_session(remote: str) -> Any:
    """One Spark session per worker process and cluster, kept warm. A master URL (spark://host:port, local[n])
    starts a driver in this worker; sc://host:port connects to a Spark Connect server. ANSI mode stays on: no
    sum can overflow (compile_stage rules it out from public bounds), so an ANSI error never depends on data."""
    if remote not in _SPARK:
        from pyspark.sql import SparkSession

        builder = SparkSession.builder.appName("lomas-exact-stage")
        if remote.startswith("sc://"):
            builder = builder.remote(remote)
        else:
            host = os.environ.get("LOMAS_SPARK_DRIVER_HOST", "127.0.0.1")
            builder = (builder.master(remote)
                       .config("spark.driver.host", host)
                       .config("spark.driver.bindAddress", host)
                       .config("spark.ui.enabled", "false")
                       .config("spark.ui.showConsoleProgress", "false")
                       .config("spark.sql.shuffle.partitions", str(min(os.cpu_count() or 1, 8)))
                       .config("spark.executor.memory", os.environ.get("LOMAS_SPARK_EXECUTOR_MEMORY", "1g")))
            if os.environ.get("LOMAS_SPARK_CORES_MAX"):  # each worker's driver is one application on the cluster:
                # without a cap, the first takes every core and the others wait for it to end
                builder = builder.config("spark.cores.max", os.environ["LOMAS_SPARK_CORES_MAX"])
        session = builder.config("spark.sql.ansi.enabled", "true").getOrCreate()
        if not remote.startswith("sc://"):
            session.sparkContext.setLogLevel("ERROR")
        _SPARK[remote] = session
    return _SPARK[remote]


_SPARK_FRAMES: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_SPARK_FRAMES_KEPT = 16


def spark_frame(remote: str, location: str) -> Any:
    """The dataset as a Spark DataFrame, kept between queries while its files are unchanged: a fresh read lists
    the files and reads their footers again, about half of a warm COUNT(*) at 2x10^7 rows. A local folder is
    read as its .parquet files (as the other engines read it) and kept by each file's size and change time; any
    other location (hdfs://, s3a://, a path only the cluster has) is read as the cluster sees it, afresh each
    time, since nothing here can tell that its files changed."""
    if locations.is_remote(location) or not Path(location).exists():
        return spark_session(remote).read.parquet(location)
    files = locations.parquet_files(location)
    key = (remote, *((f, st.st_size, st.st_mtime_ns) for f in files for st in [os.stat(f)]))
    if key not in _SPARK_FRAMES:
        _SPARK_FRAMES[key] = spark_session(remote).read.parquet(*files)
        if len(_SPARK_FRAMES) > _SPARK_FRAMES_KEPT:
            _SPARK_FRAMES.popitem(last=False)
    _SPARK_FRAMES.move_to_end(key)
    return _SPARK_FRAMES[key]


def _run_spark(stage: ExactStage, location: str, remote: str | None) -> list[dict[str, Any]]:
    if not remote:
        raise QueryRejected("the service has no Spark cluster configured (LomasApp.spark_remote)")
    words = SparkWords()
    frame = spark_frame(remote, location)
    computed = stage.computed_keys(words)
    if computed:
        frame = frame.select("*", *[value.alias(name) for name, value in computed])
    aggs = aggregations(words, stage)
    query = frame.groupBy(*[words.col(k) for k in stage.group_by]).agg(*aggs) if stage.group_by else frame.agg(*aggs)
    return [row.asDict() for row in query.collect()]
