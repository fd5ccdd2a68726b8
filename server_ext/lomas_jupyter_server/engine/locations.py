"""Where a dataset's parquet lives: a local file, or an object-store URL (`s3://bucket/key.parquet`, or a
folder `s3://bucket/prefix/` of parquet parts).

Object-store endpoint and credentials come only from the process environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ...; the service sets them from `LomasApp.object_store` before its workers start). They are
never passed as polars `storage_options`, which a serialized plan would carry, and never stored with a dataset.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import polars as pl

REMOTE_SCHEMES = ("s3://", "s3a://")

# LomasApp.object_store keys and the environment variables polars' object store reads
OBJECT_STORE_ENV = {
    "endpoint_url": "AWS_ENDPOINT_URL",
    "access_key_id": "AWS_ACCESS_KEY_ID",
    "secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "session_token": "AWS_SESSION_TOKEN",
    "region": "AWS_REGION",
    "allow_http": "AWS_ALLOW_HTTP",
}


def is_remote(location: str) -> bool:
    return location.startswith(REMOTE_SCHEMES)


def scan(location: str) -> pl.LazyFrame:
    """The data as a lazy scan (a folder, or a folder URL ending in '/', scans every parquet part under it)."""
    if not is_remote(location) and Path(location).is_dir():
        return pl.scan_parquet(parquet_files(location))
    return pl.scan_parquet(location)


def parquet_files(location: str) -> list[str]:
    """A local dataset's parquet files: the file itself, or every .parquet file under a folder, in name order."""
    path = Path(location)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*.parquet"))
    return [location]


def remote_parquet_files(location: str) -> list[str]:
    """The parquet objects under an object-store folder URL (`s3://bucket/prefix/`), in name order. Listed with
    pyarrow's S3 client, configured from the same environment variables polars reads, so an import can check a
    bucket prefix part by part, with progress. Raises OSError when the store cannot be listed."""
    from pyarrow import fs

    options: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        options["endpoint_override"], options["scheme"] = (host, scheme) if host else (scheme, "https")
    for option, variable in (("region", "AWS_REGION"), ("access_key", "AWS_ACCESS_KEY_ID"),
                             ("secret_key", "AWS_SECRET_ACCESS_KEY"), ("session_token", "AWS_SESSION_TOKEN")):
        if os.environ.get(variable):
            options[option] = os.environ[variable]
    scheme, _, path = location.partition("://")
    listing = fs.S3FileSystem(**options).get_file_info(fs.FileSelector(path.rstrip("/"), recursive=True))
    return sorted(f"{scheme}://{info.path}" for info in listing
                  if info.type == fs.FileType.File and info.path.endswith(".parquet"))


def available(location: str) -> bool:
    """Whether the data is there, judged without reading a row: a local file exists, or the object store
    answers with the parquet footers (schema only)."""
    if not is_remote(location):
        return os.path.exists(location)
    try:
        scan(location).collect_schema()
    except Exception:  # unreachable, missing, refused: the message names the endpoint, so it is dropped
        return False
    return True


def object_store_environment(options: dict[str, str]) -> dict[str, str]:
    """Environment variables for `LomasApp.object_store` options; unknown keys are refused by name."""
    unknown = sorted(set(options) - set(OBJECT_STORE_ENV))
    if unknown:
        raise ValueError(f"unknown object_store option(s) {unknown}; known: {sorted(OBJECT_STORE_ENV)}")
    return {OBJECT_STORE_ENV[key]: str(value) for key, value in options.items()}
