"""Values computed from columns before aggregation, as one more column of the query with public metadata derived
from the columns' metadata alone, never from the data:

- arithmetic (`SUM(price * qty)`, `AVG(age - 18)`): {"col": name} | {"const": number} |
  {"op": "+" | "-" | "*" | "/", "args": [tree, tree]} (division by a number only). Each column is clipped to its
  bounds before the arithmetic, so every value lies within the bounds interval arithmetic derives.
- a CASE that maps rows into public categories (`CASE WHEN age < 18 THEN 'minor' ELSE 'adult' END`, for GROUP
  BY): {"case": [{"when": condition, "then": label}, ...], "else": label | None}, conditions as in WHERE. Its
  categories are its labels (and NULL when it has no ELSE).
- a date part of a date column (`YEAR(d)`, `EXTRACT(MONTH FROM d)`): {"part": "year" | "quarter" | "month" |
  "day" | "dow", "of": name, "range": [lo, hi]}, a whole number whose range follows from the column's public
  first and last dates (recorded in the tree, so the tree alone says what it can be). Day of week is ISO's:
  1 is Monday, 7 Sunday, on every engine. A date part alone is a group key over every value of its range.
"""

from __future__ import annotations

import datetime
import math
from fractions import Fraction
from typing import Any

from ..errors import QueryRejected
from .metadata import MAX_CATEGORIES, ColumnMetadata, DatasetMetadata

MAX_MAGNITUDE = 2.0**52  # beyond this a float no longer holds every whole number: refuse the expression
OPERATORS = ("+", "-", "*", "/")


MAX_CASES = 50  # WHEN branches in one CASE
DATE_PARTS = ("year", "quarter", "month", "day", "dow")


def date_part_range(part: str, first: datetime.date, last: datetime.date) -> tuple[int, int]:
    """The least range of a date part over dates from `first` to `last`: the years between them; within one
    year, the months (quarters) between; otherwise the part's whole cycle."""
    if part == "year":
        return first.year, last.year
    if part in ("month", "quarter") and first.year == last.year:
        return (first.month, last.month) if part == "month" else ((first.month + 2) // 3, (last.month + 2) // 3)
    if part == "day" and (first.year, first.month) == (last.year, last.month):
        return first.day, last.day
    if part == "dow" and (last - first).days < 6 and first.isoweekday() <= last.isoweekday():
        return first.isoweekday(), last.isoweekday()
    return {"month": (1, 12), "quarter": (1, 4), "day": (1, 31), "dow": (1, 7)}[part]


def literal_value(value: Any) -> Any:
    """A WHERE value as engines compare it: a tagged date ({"date": "2008-01-31"}) is a date; others are themselves."""
    return datetime.date.fromisoformat(value["date"]) if isinstance(value, dict) else value


def date_part_of(part: str, value: datetime.date) -> int:
    """A date part of one date, the slow and obvious way (references in tests)."""
    return {"year": value.year, "quarter": (value.month + 2) // 3, "month": value.month, "day": value.day,
            "dow": value.isoweekday()}[part]


def dates_of(tree: dict[str, Any]) -> list[str]:
    """The date columns whose parts a tree takes."""
    if "part" in tree:
        return [tree["of"]]
    return [name for arg in tree.get("args", ()) for name in dates_of(arg)]


def columns_of(tree: dict[str, Any]) -> list[str]:
    """The columns an arithmetic tree clips (a CASE's conditions clip nothing)."""
    if "case" in tree or "part" in tree:
        return []
    if "col" in tree:
        return [tree["col"]]
    if "const" in tree:
        return []
    return [name for arg in tree["args"] for name in columns_of(arg)]


def labels(tree: dict[str, Any]) -> list[Any]:
    """A CASE's labels, by branch: the ELSE (None without one) first, then each WHEN's."""
    return [tree.get("else"), *(branch["then"] for branch in tree["case"])]


def affine(tree: dict[str, Any]) -> tuple[Fraction, Fraction] | None:
    """(slope, offset), exactly, when the tree is slope * column + offset (one column, + - and * or / by numbers);
    None for anything else (a product of columns). FLOOR bands invert it to find their edges."""
    if "col" in tree:
        return Fraction(1), Fraction(0)
    if "const" in tree:
        return Fraction(0), Fraction(str(tree["const"]))
    if "op" not in tree:  # a CASE, or a date part (a band of one takes a column)
        return None
    left, right = (affine(a) for a in tree["args"])
    if left is None or right is None:
        return None
    op = tree["op"]
    if op == "+":
        return left[0] + right[0], left[1] + right[1]
    if op == "-":
        return left[0] - right[0], left[1] - right[1]
    if op == "*":
        if left[0] and right[0]:
            return None
        (slope, offset), factor = (left, right[1]) if not right[0] else (right, left[1])
        return slope * factor, offset * factor
    if right[0] or not right[1]:
        return None
    return left[0] / right[1], left[1] / right[1]


def text(tree: dict[str, Any]) -> str:
    """A canonical spelling of the tree, for labels: fully parenthesised below the top."""
    if "case" in tree:
        return "CASE ... END"
    if "part" in tree:
        return f"{tree['part'].upper()}({tree['of']})"
    if "col" in tree:
        return tree["col"]
    if "const" in tree:
        value = tree["const"]
        return f"{value:g}" if isinstance(value, float) else str(value)
    left, right = (text(a) if "op" not in a else f"({text(a)})" for a in tree["args"])
    return f"{left} {tree['op']} {right}"


def is_integer(tree: dict[str, Any], metadata: DatasetMetadata) -> bool:
    """Whole numbers throughout: int columns, date parts, whole constants, no division."""
    if "part" in tree:
        return True
    if "col" in tree:
        return metadata.column(tree["col"]).type == "int"  # type: ignore[union-attr]
    if "const" in tree:
        return isinstance(tree["const"], int)
    return tree["op"] != "/" and all(is_integer(a, metadata) for a in tree["args"])


def value_range(tree: dict[str, Any], bounds: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """The least interval holding the tree's value when each column lies within its bounds."""
    if "part" in tree:
        lo, hi = tree["range"]
        return lo, hi
    if "col" in tree:
        return bounds[tree["col"]]
    if "const" in tree:
        return tree["const"], tree["const"]
    (a0, a1), (b0, b1) = (value_range(a, bounds) for a in tree["args"])
    op = tree["op"]
    if op == "+":
        return a0 + b0, a1 + b1
    if op == "-":
        return a0 - b1, a1 - b0
    if op == "*":
        products = [a0 * b0, a0 * b1, a1 * b0, a1 * b1]
        return min(products), max(products)
    if b0 != b1 or b0 == 0:  # pragma: no cover - the compiler allows division by a non-zero number only
        raise QueryRejected("division is by a non-zero number only")
    ends = sorted((a0 / b0, a1 / b0))
    return ends[0], ends[1]


def derived_column(name: str, tree: dict[str, Any], metadata: DatasetMetadata,
                   bounds: dict[str, tuple[float, float]]) -> ColumnMetadata:
    """The column a tree stands for: its type, nullability (NULL if any of its columns is) and public bounds; for a
    CASE, its categories."""
    if "case" in tree:
        values = labels(tree)  # the groups in the order the CASE lists them, its ELSE last
        categories = tuple(dict.fromkeys(v for v in (*values[1:], values[0]) if v is not None))
        kind = "string" if isinstance(categories[0], str) else "int"
        return ColumnMetadata(name, kind, None in values, None, categories)
    nullable = any(metadata.column(c).nullable for c in (*columns_of(tree), *dates_of(tree)))  # type: ignore[union-attr]
    if "part" in tree:  # a group key over its whole range, or a bounded value to aggregate
        lo, hi = tree["range"]
        keys = tuple(range(lo, hi + 1)) if hi - lo < MAX_CATEGORIES else None
        return ColumnMetadata(name, "int", nullable, (lo, hi) if lo < hi else None, keys)
    integer = is_integer(tree, metadata)
    lo, hi = value_range(tree, bounds)
    if not (math.isfinite(lo) and math.isfinite(hi)) or max(abs(lo), abs(hi)) > MAX_MAGNITUDE:
        raise QueryRejected(f"'{text(tree)}' can reach {max(abs(lo), abs(hi)):.3g} within the columns' bounds, "
                            "too large to aggregate exactly")
    if lo >= hi:
        raise QueryRejected(f"'{text(tree)}' takes a single value within the columns' bounds: aggregate a column "
                            "instead")
    if integer:
        return ColumnMetadata(name, "int", nullable, (int(lo), int(hi)))
    return ColumnMetadata(name, "float", nullable, (float(lo), float(hi)))


def build(v: Any, tree: dict[str, Any], bounds: dict[str, tuple[float, float]]) -> Any:
    """The tree in an engine's vocabulary (`col`, `lit`, `clip` and Python operators), each column clipped to its
    bounds first. Types follow the engines' own promotion: int op int is int, anything with a float (or a
    division) is a float, as `is_integer` says."""
    if "part" in tree:  # always within its range: nothing to clip
        return v.date_part(v.col(tree["of"]), tree["part"])
    if "col" in tree:
        lo, hi = bounds[tree["col"]]
        return v.clip(v.col(tree["col"]), v.lit(lo), v.lit(hi))
    if "const" in tree:
        return v.lit(tree["const"])
    left, right = (build(v, a, bounds) for a in tree["args"])
    op = tree["op"]
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    return left / right


def evaluate(tree: dict[str, Any], row: dict[str, Any], bounds: dict[str, tuple[float, float]],
             holds: Any = None) -> Any:
    """The tree's value on one row, the slow and obvious way (NULL if any column is): for references in tests.
    `holds(condition, row)` judges a CASE's conditions (True, False or None for unknown)."""
    if "case" in tree:
        for branch in tree["case"]:
            if holds(branch["when"], row) is True:
                return branch["then"]
        return tree.get("else")
    if "part" in tree:
        return None if row[tree["of"]] is None else date_part_of(tree["part"], row[tree["of"]])
    if "col" in tree:
        value = row[tree["col"]]
        if value is None:
            return None
        lo, hi = bounds[tree["col"]]
        return min(max(value, lo), hi)
    if "const" in tree:
        return tree["const"]
    left, right = (evaluate(a, row, bounds) for a in tree["args"])
    if left is None or right is None:
        return None
    return {"+": lambda: left + right, "-": lambda: left - right, "*": lambda: left * right,
            "/": lambda: left / right}[tree["op"]]()
