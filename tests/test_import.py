"""Dataset import: metadata is checked against the data; a mismatch is refused without revealing values."""

from __future__ import annotations

import copy
from datetime import date
from pathlib import Path

import polars as pl
import pytest

from lomas_jupyter_server.demo import penguins_csv, penguins_metadata
from lomas_jupyter_server.engine.metadata import parse_metadata
from lomas_jupyter_server.errors import BadRequest, LomasError, MetadataError
from lomas_jupyter_server.service.importing import import_dataset, propose_metadata
from lomas_jupyter_server.store import SQLStore


@pytest.fixture
def store(tmp_path: Path) -> SQLStore:
    return SQLStore(tmp_path / "s.sqlite3")


def test_demo_import_writes_typed_parquet(store: SQLStore, tmp_path: Path) -> None:
    steps: list[str] = []
    record = import_dataset(store, tmp_path, "penguins", penguins_csv(), penguins_metadata(), progress=steps.append)
    assert record.version == 1 and len(steps) >= 3
    frame = pl.read_parquet(record.parquet_path)
    assert frame.schema["flipper_length_mm"] == pl.Int64 and frame.schema["bill_length_mm"] == pl.Float64
    assert frame.height == 344
    again = import_dataset(store, tmp_path, "penguins", penguins_csv(), penguins_metadata())
    assert again.version == 2
    assert "parquet_path" not in again.to_public_json()


def _meta(**changes: dict) -> dict:
    meta = copy.deepcopy(penguins_metadata())
    for column, spec in changes.items():
        if spec is None:
            del meta["columns"][column]
        else:
            meta["columns"][column] = spec
    return meta


MISMATCHES = [
    (_meta(bill_length_mm={"type": "float", "bounds": [40.0, 60.0]}), "bill_length_mm", "outside its declared bounds"),
    (_meta(species={"type": "string", "categories": ["Adelie", "Gentoo"]}), "species", "not in its public category"),
    (_meta(sex={"type": "string", "nullable": False}), "sex", "nullable: false"),
    (_meta(island={"type": "int"}), "island", "declared type 'int'"),
    (_meta(year=None), "year", "does not describe"),
    (_meta(extra={"type": "int"}), "extra", "has no column"),
]


@pytest.mark.parametrize(("metadata", "column", "expected"), MISMATCHES)
def test_mismatch_is_refused_by_name(store: SQLStore, tmp_path: Path, metadata: dict, column: str,
                                     expected: str) -> None:
    with pytest.raises(MetadataError) as info:
        import_dataset(store, tmp_path, "penguins", penguins_csv(), metadata)
    message = info.value.message
    assert column in message and expected in message
    for value in ("Chinstrap", "Torgersen", "32.1", "male", str(tmp_path)):
        assert value not in message
    assert store.get_dataset("penguins") is None


def test_row_bound_is_checked(store: SQLStore, tmp_path: Path) -> None:
    meta = penguins_metadata() | {"max_rows": 100}
    with pytest.raises(MetadataError, match="max_rows"):
        import_dataset(store, tmp_path, "penguins", penguins_csv(), meta)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"privacy_unit": 1, "columns": {"x": {"type": "int"}}}, "missing 'max_rows'"),
        ({"privacy_unit": 0, "max_rows": 5, "columns": {"x": {"type": "int"}}}, "privacy_unit"),
        ({"privacy_unit": 1, "max_rows": 5, "columns": {"x": {"type": "decimal"}}}, "type must be one of"),
        ({"privacy_unit": 1, "max_rows": 5, "columns": {"x": {"type": "int", "bounds": [5, 1]}}}, "lower bound"),
        ({"privacy_unit": 1, "max_rows": 5, "columns": {"x": {"type": "int", "colour": 1}}}, "unknown keys"),
        ({"privacy_unit": 1, "max_rows": 5, "columns": {"x": {"type": "string", "bounds": [0, 1]}}}, "only for int"),
        ("not a mapping", "must be a mapping"),
    ],
)
def test_bad_metadata_documents(store: SQLStore, tmp_path: Path, doc: object, expected: str) -> None:
    with pytest.raises(MetadataError, match=expected):
        import_dataset(store, tmp_path, "t", penguins_csv(), doc)


def test_bad_sources(store: SQLStore, tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="does not exist"):
        import_dataset(store, tmp_path, "t", tmp_path / "nope.csv", penguins_metadata())
    with pytest.raises(BadRequest, match="CSV or Parquet"):
        import_dataset(store, tmp_path, "t", tmp_path / "x.xlsx", penguins_metadata())
    with pytest.raises(BadRequest, match="could not be read as PARQUET"):
        import_dataset(store, tmp_path, "t", b"not parquet", penguins_metadata(), fmt="parquet")
    with pytest.raises(LomasError, match="dataset names"):
        import_dataset(store, tmp_path, "../etc", penguins_csv(), penguins_metadata())


def test_import_warns_when_max_rows_costs_accuracy(tmp_path: Path) -> None:
    """The real CLI: a loose max_rows on a float column is flagged at import (and fixed point named); a tight
    one is not."""
    import subprocess

    import yaml

    from lomas_jupyter_server.demo import penguins_csv, penguins_metadata

    from .servers import BIN

    def run(max_rows: int) -> str:
        doc = penguins_metadata() | {"max_rows": max_rows}
        meta = tmp_path / f"meta{max_rows}.yaml"
        meta.write_text(yaml.safe_dump(doc))
        out = subprocess.run([str(BIN / "lomas-admin"), "--storage-dir", str(tmp_path / "s"), "dataset", "import",
                              f"p{max_rows}", str(penguins_csv()), "--metadata", str(meta)],
                             capture_output=True, text=True, check=True)
        return out.stderr

    loose = run(10**9)
    assert "warning: column 'bill_length_mm'" in loose and "fixed point" in loose and "max_rows" in loose
    assert "warning" not in run(1000)


def test_a_draft_is_valid_marks_what_came_from_the_data_and_is_never_stored(store: SQLStore,
                                                                           tmp_path: Path) -> None:
    raw = pl.read_csv(penguins_csv(), null_values=["NA"])
    draft = propose_metadata(penguins_csv())
    meta = draft["metadata"]
    assert draft["rows"] == raw.height and meta["max_rows"] >= raw.height
    assert parse_metadata(meta).column_names == raw.columns
    for name in ("bill_length_mm", "body_mass_g", "flipper_length_mm"):
        lo, hi = meta["columns"][name]["bounds"]
        assert lo <= raw[name].min() and raw[name].max() <= hi
        assert (lo, hi) != (raw[name].min(), raw[name].max())  # rounded outward, not at data values
    assert meta["columns"]["body_mass_g"]["type"] == "int" and meta["columns"]["bill_depth_mm"]["type"] == "float"
    assert meta["columns"]["species"]["categories"] == ["Adelie", "Chinstrap", "Gentoo"]
    assert meta["columns"]["sex"]["nullable"] is True and meta["columns"]["species"]["nullable"] is False
    # a small integer range: every value in the range, whichever were seen
    assert meta["columns"]["year"]["categories"] == [2007, 2008, 2009]
    noted = {(n["column"], n["field"]) for n in draft["review"]}
    assert {(None, "privacy_unit"), (None, "max_rows"), ("species", "categories"),
            ("bill_length_mm", "bounds")} <= noted
    assert store.list_datasets() == [] and not (tmp_path / "datasets").exists()
    # the draft imports as it is (the admin reviews it first; nothing forces that here)
    assert import_dataset(store, tmp_path, "p", penguins_csv(), meta).version == 1


def test_a_draft_of_many_distinct_strings_lists_no_categories(tmp_path: Path) -> None:
    path = tmp_path / "people.parquet"
    pl.DataFrame({"name": [f"person{i}" for i in range(80)], "born": [date(1990, 1, 1 + i % 28) for i in range(80)],
                  "score": [0.5] * 80, "ok": [True, False] * 40}).write_parquet(path)
    draft = propose_metadata(path)
    columns = draft["metadata"]["columns"]
    assert "categories" not in columns["name"] and columns["ok"] == {"type": "bool", "nullable": False}
    assert columns["born"] == {"type": "date", "nullable": False, "bounds": ["1990-01-01", "1990-12-31"]}
    lo, hi = columns["score"]["bounds"]
    assert lo < 0.5 < hi  # a constant column still gets a proper interval
    notes = {(n["column"], n["field"]): n["note"] for n in draft["review"]}
    assert "cannot group by" in notes[("name", "categories")]
    assert "first and last days of the years" in notes[("born", "bounds")]
    assert all("person1" not in n["note"] and "1990" not in n["note"] for n in draft["review"])


def test_a_drafts_row_bound_never_equals_the_files_row_count(tmp_path: Path) -> None:
    """Issue 24.11: a 500-row file proposed max_rows 500, publishing its size; the bound is strictly above."""
    for rows, bound in ((500, 1000), (344, 500), (1, 2), (999, 1000)):
        path = tmp_path / f"r{rows}.csv"
        path.write_text("x\n" + "".join(f"{i % 7}\n" for i in range(rows)))
        assert propose_metadata(path)["metadata"]["max_rows"] == bound, rows


def _parts(folder: Path, frame: pl.DataFrame, size: int) -> Path:
    folder.mkdir()
    for n, part in enumerate(frame.iter_slices(size)):
        part.write_parquet(folder / f"part-{n:03d}.parquet")
    return folder


def test_a_folder_of_parquet_parts_is_checked_part_by_part_and_used_in_place(store: SQLStore,
                                                                              tmp_path: Path) -> None:
    """The checks stream over each part with a progress line; in place, nothing is copied and every part is
    one table to every backend."""
    typed = import_dataset(store, tmp_path / "copy", "p", penguins_csv(), penguins_metadata())
    frame = pl.read_parquet(typed.parquet_path)
    folder = _parts(tmp_path / "parts", frame, 100)
    steps: list[str] = []
    record = import_dataset(store, tmp_path / "s", "parts", folder, penguins_metadata(), progress=steps.append,
                            in_place=True)
    assert record.parquet_path == str(folder.resolve()) and not (tmp_path / "s" / "datasets").exists()
    checked = [s for s in steps if s.startswith("checked part")]
    assert len(checked) == 4 and checked[-1] == f"checked part 4 of 4 ({frame.height:,} rows so far)"
    copied = import_dataset(store, tmp_path / "s", "copied", folder, penguins_metadata())  # or copied, whole
    assert pl.read_parquet(copied.parquet_path).equals(frame)
    # a part with a value outside the bounds is found, whichever part it is in
    bad = frame.with_columns(pl.when(pl.int_range(pl.len()) == 300).then(9999).otherwise(pl.col("body_mass_g"))
                             .alias("body_mass_g"))
    with pytest.raises(MetadataError, match="body_mass_g.*outside its declared bounds"):
        import_dataset(store, tmp_path / "s", "bad", _parts(tmp_path / "bad", bad, 100), penguins_metadata(),
                       in_place=True)


def test_data_used_in_place_must_have_the_declared_types_and_no_nan(store: SQLStore, tmp_path: Path) -> None:
    typed = import_dataset(store, tmp_path / "copy", "p", penguins_csv(), penguins_metadata())
    frame = pl.read_parquet(typed.parquet_path)
    frame.with_columns(pl.col("year").cast(pl.Int32)).write_parquet(tmp_path / "int32.parquet")
    with pytest.raises(MetadataError, match="'year' is stored as Int32"):
        import_dataset(store, tmp_path, "t", tmp_path / "int32.parquet", penguins_metadata(), in_place=True)
    frame.with_columns(pl.col("bill_length_mm").fill_null(float("nan"))).write_parquet(tmp_path / "nan.parquet")
    with pytest.raises(MetadataError, match="'bill_length_mm' holds NaN"):
        import_dataset(store, tmp_path, "t", tmp_path / "nan.parquet", penguins_metadata(), in_place=True)
    with pytest.raises(BadRequest, match="CSV is copied"):
        import_dataset(store, tmp_path, "t", penguins_csv(), penguins_metadata(), in_place=True)
    # a copy converts both
    assert import_dataset(store, tmp_path, "t", tmp_path / "nan.parquet", penguins_metadata()).version == 1
