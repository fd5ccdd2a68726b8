"""Numbers as people read them (the JSON keeps exact values): no scientific notation for ordinary magnitudes,
integers as integers, a few significant digits."""

from __future__ import annotations

import pytest

from lomas_jupyter.display import Table, fmt, plain, span


@pytest.mark.parametrize(("value", "text"), [
    (18977, "18,977"), (29540.3, "29,540"), (66666.67, "66,667"), (2.3999999999986, "2.4"),
    (550829.201113, "550,829"), (0.002595123, "0.002595"), (1e-6, "0.000001"), (1e-9, "1e-09"), (0.0, "0"),
    (-3.25, "-3.25"), (12.0, "12"), (3.0000000000030003, "3"), (None, "NULL"), ("Adelie", "Adelie"),
])
def test_numbers_read_well(value: object, text: str) -> None:
    assert fmt(value) == text


def test_intervals_years_and_tables() -> None:
    assert span([8417, 29540.2]) == "8,417 – 29,540"  # a dash between numbers that carry commas
    assert plain(2009) == "2009" and plain(6500.0) == "6500"
    table = Table([{"column": "species", "GROUP BY keys": "Adelie, Chinstrap, Gentoo"}])
    assert "Adelie, Chinstrap, Gentoo" in repr(table) and "Adelie, Chinstrap, Gentoo" in table._repr_html_()
    assert repr(Table([], ["a"])) == "(none)"


def test_the_spending_plots_time_axis_reads_as_clock_time() -> None:
    """Issue 24.12: releases seconds apart labelled the axis '.950', '.250'."""
    from lomas_jupyter.charts import spending_spec

    archive = [{"id": i, "dataset": "penguins", "epsilon": 0.1, "created_at": f"2026-12-01T10:00:0{i}.950+00:00"}
               for i in range(3)]
    axis = spending_spec(archive)["encoding"]["x"]["axis"]
    assert axis["format"] == "%H:%M:%S"
    archive.append({"id": 9, "dataset": "penguins", "epsilon": 0.1, "created_at": "2026-12-04T10:00:00+00:00"})
    assert spending_spec(archive)["encoding"]["x"]["axis"]["format"] == "%b %d %H:%M"


def test_a_variances_accuracy_is_per_group_not_a_rank() -> None:
    from lomas_jupyter.display import accuracy_summary, preview_text

    preview = {"cost": {"epsilon": 0.5}, "plan": {"statistics": []},
               "aggregates": [{"name": "v", "kind": "var_samp", "accuracy": None, "covers": "the sample variance"}]}
    assert accuracy_summary(preview) == "v (interval per group)"
    assert "v: interval per group" in preview_text(preview) and "rank" not in preview_text(preview)
