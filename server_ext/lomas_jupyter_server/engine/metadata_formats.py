"""Metadata written for the peers, read as ours: Lomas's metadata YAML (`max_ids`, `rows`, `columns` with
`lower`/`upper`, `cardinality`/`categories`) and SmartNoise SQL's (collection > schema > table, options and columns
side by side). Each conversion says what it could not map, so an admin reviews it instead of trusting it.

The result is our metadata document, which `metadata.parse_metadata` then validates as any other.
"""

from __future__ import annotations

from typing import Any

from ..errors import MetadataError

OURS, LOMAS, SMARTNOISE = "lomas-jupyter", "lomas", "smartnoise"
FORMATS = ("auto", OURS, LOMAS, SMARTNOISE)

_TYPES = {"string": "string", "int": "int", "float": "float", "boolean": "bool", "bool": "bool", "date": "date",
          "datetime": "date"}
# table options the peers have and we do not: what each means here
_UNMAPPED_OPTIONS = {
    "censor_dims": "every public group is released (with its noise); nothing is censored",
    "clamp_counts": "released counts are always clamped at 0",
    "clamp_columns": "values are always clipped to their bounds",
    "sample_max_ids": "each individual's rows are bounded by privacy_unit, not sampled",
    "use_dpsu": "group keys are public (categories), never selected from the data",
    "max_contrib": "use max_ids",
}


def detect(doc: Any) -> str:
    """Which format a metadata document is in, from its shape."""
    if not isinstance(doc, dict):
        raise MetadataError("metadata must be a mapping")
    if "privacy_unit" in doc:
        return OURS
    if "columns" in doc and ("max_ids" in doc or "rows" in doc):
        return LOMAS
    if _smartnoise_tables(doc):
        return SMARTNOISE
    return OURS  # let parse_metadata name what is missing


def convert(doc: Any, fmt: str = "auto") -> tuple[dict[str, Any], list[str]]:
    """(our metadata document, notes on what was not mapped) for a document in `fmt` (or the detected one)."""
    if fmt not in FORMATS:
        raise MetadataError(f"unknown metadata format '{fmt}'; use one of {list(FORMATS)}")
    fmt = detect(doc) if fmt == "auto" else fmt
    if fmt == OURS:
        return doc, []
    if fmt == LOMAS:
        if not isinstance(doc, dict) or not isinstance(doc.get("columns"), dict):
            raise MetadataError("Lomas metadata needs 'max_ids', 'rows' and a 'columns' mapping")
        options = {k: v for k, v in doc.items() if k != "columns"}
        return _table(options, doc["columns"], nullable_default=False, source="Lomas")
    tables = _smartnoise_tables(doc)
    if len(tables) != 1:
        raise MetadataError(f"SmartNoise metadata with {len(tables)} tables: import one table per dataset "
                            "(keep one collection > schema > table)")
    (path, table), = tables.items()
    options = {k: v for k, v in table.items() if not _is_column(v)}
    columns = {k: v for k, v in table.items() if _is_column(v)}
    converted, notes = _table(options, columns, nullable_default=True, source="SmartNoise")
    return converted, [f"read table {path}", *notes]


def _is_column(value: Any) -> bool:
    return isinstance(value, dict) and "type" in value


def _smartnoise_tables(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    tables = {}
    for collection, schemas in doc.items():
        if not isinstance(schemas, dict):
            continue
        for schema, schema_tables in schemas.items():
            if not isinstance(schema_tables, dict):
                continue
            for name, table in schema_tables.items():
                if isinstance(table, dict) and any(_is_column(v) for v in table.values()):
                    tables[f"{collection}.{schema}.{name}"] = table
    return tables


def _positive(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MetadataError(f"{where} must be a positive whole number")
    return value


def _table(options: dict[str, Any], columns: dict[str, Any], nullable_default: bool, source: str
           ) -> tuple[dict[str, Any], list[str]]:
    notes: list[str] = []
    if options.get("row_privacy") is True:
        privacy_unit = 1
        if options.get("max_ids", 1) != 1:
            notes.append("row_privacy is true, so privacy_unit is 1 (max_ids ignored)")
    elif "max_ids" in options:
        privacy_unit = _positive(options["max_ids"], "max_ids")
    else:
        raise MetadataError(f"{source} metadata needs max_ids (rows per individual) or row_privacy: true")
    if "rows" not in options:
        raise MetadataError(f"{source} metadata needs rows: lomas needs a public bound on the row count (max_rows)")
    max_rows = _positive(options["rows"], "rows")
    notes.append(f"max_rows is {source}'s rows ({max_rows:,}): it must be at least the real row count, or the "
                 "import is refused")
    for key, meaning in _UNMAPPED_OPTIONS.items():
        if key in options:
            notes.append(f"{key} is not mapped: {meaning}")
    ours: dict[str, Any] = {}
    for name, spec in columns.items():
        column, column_notes = _column(str(name), spec, nullable_default)
        notes.extend(column_notes)
        if column is not None:
            ours[str(name)] = column
    if not ours:
        raise MetadataError(f"no column of the {source} metadata could be mapped")
    doc: dict[str, Any] = {"privacy_unit": privacy_unit, "max_rows": max_rows, "columns": ours}
    if isinstance(options.get("description"), str):
        doc["description"] = options["description"]
    return doc, notes


def _column(name: str, spec: Any, nullable_default: bool) -> tuple[dict[str, Any] | None, list[str]]:
    where = f"column '{name}'"
    if not isinstance(spec, dict):
        raise MetadataError(f"{where}: expected a mapping with 'type'")
    kind = _TYPES.get(str(spec.get("type")))
    if kind is None:
        return None, [f"{where} ({spec.get('type')}) is not imported: lomas has int, float, string, boolean and "
                      "date columns; drop it from the data or convert it (e.g. a year as int)"]
    notes = []
    column: dict[str, Any] = {"type": kind, "nullable": bool(spec.get("nullable", nullable_default))}
    if spec.get("private_id"):
        notes.append(f"{where} is the private id: imported without bounds or categories (never a group key); "
                     "privacy_unit bounds each individual's rows")
        return column, notes
    if "lower" in spec and "upper" in spec and kind in ("int", "float"):
        column["bounds"] = [spec["lower"], spec["upper"]]
    elif kind in ("int", "float"):
        notes.append(f"{where} has no lower and upper: it cannot be summed or averaged until bounds are added")
    if kind == "date":
        if spec.get("type") == "datetime":
            notes.append(f"{where} is a datetime: imported as a date (its time of day is not kept)")
        if "lower" in spec and "upper" in spec:
            column["bounds"] = [str(spec["lower"])[:10], str(spec["upper"])[:10]]  # ISO text or a YAML date
        else:
            notes.append(f"{where} has no lower and upper: its date parts cannot be grouped by until bounds are "
                         "added")
    if "categories" in spec:
        if kind == "float":
            notes.append(f"{where}: categories of a float column are not mapped")
        else:
            column["categories"] = list(spec["categories"])
            if "cardinality" in spec and spec["cardinality"] != len(spec["categories"]):
                notes.append(f"{where}: cardinality {spec['cardinality']} but {len(spec['categories'])} categories; "
                             "the categories are used")
    elif kind == "string":
        notes.append(f"{where} has no categories: it can be counted but not grouped by")
    elif kind == "bool":
        column["categories"] = [True, False]  # the type's own values: public
    for key in ("max_partition_length", "max_influenced_partitions", "max_partition_contributions",
                "missing_value", "sensitivity"):
        if key in spec:
            notes.append(f"{where}: {key} is not mapped")
    return column, notes
