"""Issue 21.6: metadata written for the peers (Lomas's metadata YAML, SmartNoise SQL's) imports as ours, with a
note for everything that could not be mapped; `lomas-admin dataset import` detects the format."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from lomas_jupyter_server.demo import penguins_csv
from lomas_jupyter_server.engine.metadata import parse_metadata
from lomas_jupyter_server.engine.metadata_formats import LOMAS, SMARTNOISE, convert, detect
from lomas_jupyter_server.errors import MetadataError

from .servers import BIN, lomas_admin

LOMAS_PENGUINS = """
max_ids: 1
rows: 1000
row_privacy: true
censor_dims: false
columns:
  species: {type: string, cardinality: 3, categories: [Adelie, Chinstrap, Gentoo]}
  island: {type: string, cardinality: 3, categories: [Biscoe, Dream, Torgersen]}
  bill_length_mm: {type: float, precision: 64, lower: 30.0, upper: 60.0, nullable: true}
  bill_depth_mm: {type: float, precision: 64, lower: 13.0, upper: 22.0, nullable: true}
  flipper_length_mm: {type: int, precision: 32, lower: 170, upper: 235, nullable: true}
  body_mass_g: {type: int, precision: 32, lower: 2500, upper: 6500, nullable: true}
  sex: {type: string, cardinality: 3, categories: [female, male], nullable: true}
  year: {type: int, precision: 32, lower: 2007, upper: 2009}
"""

SMARTNOISE_PENGUINS = """
Zoo:
  Antarctica:
    penguins:
      max_ids: 2
      rows: 1000
      clamp_counts: true
      species: {type: string}
      island: {type: string}
      bill_length_mm: {type: float, lower: 30.0, upper: 60.0}
      bill_depth_mm: {type: float, lower: 13.0, upper: 22.0}
      flipper_length_mm: {type: int, lower: 170, upper: 235}
      body_mass_g: {type: int, lower: 2500, upper: 6500}
      sex: {type: string}
      year: {type: int}
      seen: {type: datetime}
      tag: {type: uuid}
"""


def test_lomas_metadata_maps_bounds_categories_nullability_and_the_privacy_unit() -> None:
    doc = yaml.safe_load(LOMAS_PENGUINS)
    assert detect(doc) == LOMAS
    ours, notes = convert(doc)
    meta = parse_metadata(ours)
    assert (meta.privacy_unit, meta.max_rows) == (1, 1000)
    assert meta.column("species").categories == ("Adelie", "Chinstrap", "Gentoo")
    assert meta.column("species").nullable is False  # Lomas's default
    assert meta.column("bill_length_mm").bounds == (30.0, 60.0) and meta.column("bill_length_mm").nullable
    assert meta.column("year").bounds == (2007, 2009) and meta.column("year").categories is None
    assert any("censor_dims is not mapped" in n for n in notes)
    assert any("cardinality 3 but 2 categories" in n for n in notes)
    assert any("max_rows is Lomas's rows" in n for n in notes)


def test_smartnoise_metadata_maps_its_one_table_and_says_what_it_could_not() -> None:
    doc = yaml.safe_load(SMARTNOISE_PENGUINS)
    assert detect(doc) == SMARTNOISE
    ours, notes = convert(doc)
    meta = parse_metadata(ours)
    assert (meta.privacy_unit, meta.max_rows) == (2, 1000)
    assert meta.column("seen").type == "date" and meta.column("seen").bounds is None
    assert any("'seen' is a datetime: imported as a date" in n for n in notes)
    assert any("'seen' has no lower and upper: its date parts" in n for n in notes)
    assert any("'tag' (uuid) is not imported" in n for n in notes) and meta.column("tag") is None
    dated = yaml.safe_load(LOMAS_PENGUINS)
    dated["columns"]["seen"] = {"type": "datetime", "lower": "2007-01-01T00:00:00", "upper": "2009-12-31T23:59:59"}
    assert parse_metadata(convert(dated)[0]).column("seen").to_json()["bounds"] == ["2007-01-01", "2009-12-31"]
    assert meta.column("species").categories is None and meta.column("species").nullable  # SmartNoise's default
    assert any("'species' has no categories: it can be counted but not grouped by" in n for n in notes)
    assert any("'year' has no lower and upper" in n for n in notes)
    assert any("clamp_counts is not mapped" in n for n in notes) and notes[0] == "read table Zoo.Antarctica.penguins"
    two = yaml.safe_load(SMARTNOISE_PENGUINS)
    two["Zoo"]["Antarctica"]["other"] = {"rows": 5, "max_ids": 1, "x": {"type": "int"}}
    with pytest.raises(MetadataError, match="2 tables"):
        convert(two)
    with pytest.raises(MetadataError, match="needs rows"):
        convert({"columns": {"x": {"type": "int"}}, "max_ids": 1}, LOMAS)


def test_lomas_admin_imports_a_peers_metadata_and_prints_its_notes(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    lomas_admin(storage, "user", "add", "boss", "--role", "admin")
    for name, text in (("lomas", LOMAS_PENGUINS), ("smartnoise", SMARTNOISE_PENGUINS.replace(
            "      seen: {type: datetime}\n      tag: {type: uuid}\n", ""))):
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        out = subprocess.run([str(BIN / "lomas-admin"), "--storage-dir", str(storage), "dataset", "import",
                              f"birds_{name}", str(penguins_csv()), "--metadata", str(path)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "note: max_rows is" in out.stderr
        listed = json.loads(lomas_admin(storage, "--json", "dataset", "list"))
        meta = next(d for d in listed if d["name"] == f"birds_{name}")["metadata"]
        assert meta["columns"]["body_mass_g"]["bounds"] == [2500, 6500]
        assert meta["privacy_unit"] == (1 if name == "lomas" else 2)
    wrong = subprocess.run([str(BIN / "lomas-admin"), "--storage-dir", str(storage), "dataset", "import", "x",
                            str(penguins_csv()), "--metadata", str(tmp_path / "lomas.yaml"),
                            "--metadata-format", "smartnoise"], capture_output=True, text=True)
    assert wrong.returncode != 0 and "0 tables" in wrong.stderr and "Traceback" not in wrong.stderr
