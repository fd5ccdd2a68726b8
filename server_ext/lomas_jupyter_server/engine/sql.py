"""Restricted SQL -> query spec.

The client's SQL is parsed with sqlglot and walked against an allowlist; anything not on it is refused with a
message naming the construct. The result is a plain, JSON-able spec: the engine builds the OpenDP plan from it
with bounds and key sets taken from server metadata. No client text ever reaches polars.
"""

from __future__ import annotations

import datetime
import difflib
import json
import math
import re
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError

from ..errors import QueryRejected
from . import expressions
from .expressions import MAX_CASES, derived_column
from .expressions import text as expression_text
from .metadata import ColumnMetadata, DatasetMetadata

MAX_SQL_CHARS = 20_000
MAX_AGGREGATES = 20
MAX_IN_VALUES = 1000
MAX_CONDITIONS = 200  # comparisons, IN, BETWEEN and IS NULL tests in one WHERE
MAX_NESTING = 12  # levels of AND/OR/NOT inside one another (a chain of ORs is one level)
DEFAULT_MAX_GROUPS = 10_000

SUPPORTED = (
    "Supported: SELECT with COUNT(*), COUNT(col), COUNT(DISTINCT col), SUM(col), AVG(col), VARIANCE/VAR_POP/STDDEV/STDDEV_POP(col), "
    "MEDIAN(col), "
    "PERCENTILE_CONT(q) WITHIN GROUP (ORDER BY col) and aliases, of a column or of arithmetic on bounded columns "
    "(SUM(a * b)); arithmetic between aggregates; FROM <dataset>; "
    "WHERE with comparisons, AND/OR/NOT, IN, BETWEEN, IS [NOT] NULL; "
    "GROUP BY on columns with public categories or on a CASE WHEN ... THEN 'label' ... END (by the CASE, its alias "
    "or position), on FLOOR bands of a numeric column (FLOOR(age / 10) * 10) and CASTs of a column with categories, "
    "on date parts (YEAR(d), QUARTER, MONTH, DAY, EXTRACT(ISODOW FROM d)) of a date column with public bounds, "
    "or (with delta > 0, by a threshold) on string or int columns without public categories; HAVING, ORDER BY and LIMIT (or TOP) on the selected outputs (applied "
    "to the released values, free)."
)

_CLAUSE_NAMES = {
    "joins": "JOIN",
    "laterals": "LATERAL",
    "having": "HAVING",
    "order": "ORDER BY",
    "limit": "LIMIT",
    "offset": "OFFSET",
    "with_": "WITH",
    "with": "WITH",
    "distinct": "DISTINCT",
    "windows": "WINDOW",
    "qualify": "QUALIFY",
    "into": "INTO",
    "sample": "TABLESAMPLE",
    "locks": "FOR UPDATE",
    "prewhere": "PREWHERE",
    "connect": "CONNECT BY",
    "settings": "SETTINGS",
    "kind": "SELECT modifier",
    "hint": "hint",
    "cluster": "CLUSTER BY",
    "distribute": "DISTRIBUTE BY",
    "sort": "SORT BY",
    "match": "MATCH_RECOGNIZE",
}
_ALLOWED_ARGS = {"expressions", "from_", "from", "where", "group", "having", "order", "limit"}
MAX_LIMIT = 1_000_000

AGG_KINDS = ("count_star", "count", "count_distinct", "sum", "avg", "quantile", "var_samp", "var_pop", "stddev_samp", "stddev_pop")
SPREAD_KINDS = ("var_samp", "var_pop", "stddev_samp", "stddev_pop")


@dataclass(frozen=True)
class Aggregate:
    kind: str  # one of AGG_KINDS
    column: str | None
    alias: str
    quantile: float | None = None


@dataclass(frozen=True)
class Derived:
    """A value computed from columns before aggregation (`SUM(price * qty)`): aggregates name it as their column."""

    name: str  # __d0, __d1, ...
    expression: dict[str, Any]  # an `expressions` tree
    text: str  # how the query wrote it, for labels


@dataclass(frozen=True)
class OutputColumn:
    name: str
    key: str | None = None  # a group-by column
    aggregate: int | None = None  # index into QuerySpec.aggregates
    # arithmetic on released aggregates, computed after release: {"op": + - * /, "args": [...]}, leaves
    # {"agg": index} or {"const": number}
    expression: dict[str, Any] | None = None


@dataclass(frozen=True)
class QuerySpec:
    table: str
    group_by: tuple[str, ...]
    aggregates: tuple[Aggregate, ...]
    outputs: tuple[OutputColumn, ...]
    where: dict[str, Any] | None = None
    # HAVING / ORDER BY / LIMIT: applied to the released values, never to the data (engine.post)
    post: dict[str, Any] | None = None
    derived: tuple[Derived, ...] = ()

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        if not doc["derived"]:
            doc.pop("derived")
        for output in doc["outputs"]:  # absent unless used: the canonical text of older queries is unchanged
            if output.get("expression") is None:
                output.pop("expression", None)
        return doc

    def canonical(self) -> str:
        """A canonical text of what the query releases: equal for SQL that differs only in spelling or in its
        post-processing (HAVING, ORDER BY, LIMIT), which is computed from the same release for free."""
        doc = self.to_json()
        doc.pop("post", None)
        for derived in doc.get("derived", ()):  # its spelling is for labels; the tree is what is computed
            derived.pop("text")
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> QuerySpec:
        return cls(
            table=doc["table"],
            group_by=tuple(doc["group_by"]),
            aggregates=tuple(Aggregate(**a) for a in doc["aggregates"]),
            outputs=tuple(OutputColumn(**o) for o in doc["outputs"]),
            where=doc.get("where"),
            post=doc.get("post"),
            derived=tuple(Derived(**d) for d in doc.get("derived", ())),
        )

    def columns_used(self, metadata: DatasetMetadata) -> dict[str, dict[str, Any]]:
        """The public metadata of every column the query reads (keys, aggregates, WHERE, CASE, date parts): what
        several sites must agree on before one question is asked of all of them."""
        names = set(metadata.column_names)
        found: set[str] = set()

        def walk(node: Any) -> None:
            if isinstance(node, str):
                if node in names:
                    found.add(node)
            elif isinstance(node, dict):
                for value in node.values():
                    walk(value)
            elif isinstance(node, (list, tuple)):
                for value in node:
                    walk(value)

        doc = self.to_json()
        doc.pop("post", None)
        walk(doc)
        return {name: metadata.column(name).to_json() for name in sorted(found)}  # type: ignore[union-attr]

    def label(self, column: str | None) -> str | None:
        """A column's name as the query wrote it (a derived value's expression)."""
        for derived in self.derived:
            if derived.name == column:
                return derived.text
        return column


def _reject(message: str) -> QueryRejected:
    return QueryRejected(f"{message}. {SUPPORTED}")


class _Compiler:
    def __init__(self, metadata: DatasetMetadata, table: str) -> None:
        self.metadata = metadata
        self.table = table
        self.conditions = 0
        self.derived: list[Derived] = []

    def column(self, node: exp.Expression, purpose: str) -> ColumnMetadata:
        if not isinstance(node, exp.Column):
            raise _reject(f"{purpose} must be a plain column name, not '{_short(node)}'")
        if node.table and node.table != self.table:
            raise _reject(f"column '{node.sql()}' refers to another table")
        col = self.metadata.column(node.name)
        if col is None:
            raise QueryRejected(
                f"unknown column '{node.name}'. Columns of {self.table}: {', '.join(self.metadata.column_names)}"
            )
        return col

    def literal(self, node: exp.Expression, col: ColumnMetadata) -> Any:
        negative = False
        while isinstance(node, exp.Paren):
            node = node.this
        if isinstance(node, exp.Neg):
            negative, node = True, node.this
        if (isinstance(node, exp.Cast) and node.to.is_type(exp.DataType.Type.DATE)
                and isinstance(node.this, exp.Literal) and node.this.is_string):  # DATE '2008-01-31'
            node = node.this
        if isinstance(node, exp.Boolean):
            value: Any = bool(node.this)
        elif isinstance(node, exp.Literal):
            if node.is_string:
                value = node.this
            else:
                text = node.this
                try:
                    value = int(text) if text.lstrip("-").isdigit() else float(text)
                except ValueError as err:
                    raise _reject(f"'{text}' is not a number") from err
        else:
            raise _reject(f"comparisons must be between a column and a literal value, not '{_short(node)}'")
        if negative:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise _reject("only numbers can be negated")
            value = -value
        if col.type in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise QueryRejected(f"column '{col.name}' is {col.type}: compare it with a number")
            if col.type == "float":
                value = float(value)
        elif col.type == "string":
            if not isinstance(value, str):
                raise QueryRejected(f"column '{col.name}' is text: compare it with a quoted string")
        elif col.type == "bool" and not isinstance(value, bool):
            raise QueryRejected(f"column '{col.name}' is boolean: compare it with TRUE or FALSE")
        elif col.type == "date":
            try:
                day = datetime.date.fromisoformat(value) if isinstance(value, str) and len(value) == 10 else None
            except ValueError:
                day = None
            if day is None:
                raise QueryRejected(f"column '{col.name}' is a date: compare it with a date written 'YYYY-MM-DD'")
            value = {"date": day.isoformat()}  # tagged, so the spec stays JSON and engines compare dates
        return value

    def predicate(self, node: exp.Expression, depth: int = 0) -> dict[str, Any]:
        """WHERE as a tree whose AND/OR nodes take any number of arguments: a chain of 200 ORs is one node,
        not 200 levels, so nothing downstream recurses deeply."""
        while isinstance(node, exp.Paren):
            node = node.this
        if isinstance(node, (exp.And, exp.Or, exp.Not)) and depth >= MAX_NESTING:
            raise QueryRejected(f"WHERE nests AND/OR/NOT more than {MAX_NESTING} levels deep")
        if isinstance(node, (exp.And, exp.Or)):
            kind = type(node)
            operands, pending = [], [node]
            while pending:  # flatten a same-operator chain without recursion
                item = pending.pop()
                while isinstance(item, exp.Paren):
                    item = item.this
                if isinstance(item, kind):
                    pending.extend([item.right, item.left])
                else:
                    operands.append(item)
            return {"op": "and" if kind is exp.And else "or",
                    "args": [self.predicate(operand, depth + 1) for operand in operands]}
        if isinstance(node, exp.Not):
            inner = node.this
            while isinstance(inner, exp.Paren):
                inner = inner.this
            if isinstance(inner, exp.Is):
                return self.is_null(inner, negate=True)
            return {"op": "not", "arg": self.predicate(node.this, depth + 1)}
        self.conditions += 1
        if self.conditions > MAX_CONDITIONS:
            raise QueryRejected(f"WHERE has more than {MAX_CONDITIONS} conditions; use IN (...) for lists of values")
        if isinstance(node, exp.Is):
            return self.is_null(node, negate=bool(node.args.get("negate")))
        comparisons = {exp.EQ: "==", exp.NEQ: "!=", exp.GT: ">", exp.GTE: ">=", exp.LT: "<", exp.LTE: "<="}
        flipped = {"==": "==", "!=": "!=", ">": "<", ">=": "<=", "<": ">", "<=": ">="}
        for cls, op in comparisons.items():
            if isinstance(node, cls):
                left, right = node.left, node.right
                if not isinstance(left, exp.Column) and isinstance(right, exp.Column):
                    left, right, op = right, left, flipped[op]
                col = self.column(left, "the left side of a comparison")
                return {"op": "cmp", "cmp": op, "column": col.name, "value": self.literal(right, col)}
        if isinstance(node, exp.In):
            if node.args.get("query") or node.args.get("unnest") or node.args.get("field"):
                raise _reject("IN accepts a list of literal values only (no subqueries)")
            col = self.column(node.this, "the left side of IN")
            if not node.expressions or len(node.expressions) > MAX_IN_VALUES:
                raise _reject(f"IN needs 1 to {MAX_IN_VALUES} values")
            values = [self.literal(v, col) for v in node.expressions]
            return {"op": "in", "column": col.name, "values": values}
        if isinstance(node, exp.Between):
            col = self.column(node.this, "the left side of BETWEEN")
            low = self.literal(node.args["low"], col)
            high = self.literal(node.args["high"], col)
            return {"op": "between", "column": col.name, "low": low, "high": high}
        raise _reject(f"unsupported condition in WHERE: '{_short(node)}'")

    def is_null(self, node: exp.Is, negate: bool) -> dict[str, Any]:
        if not isinstance(node.expression, exp.Null):
            raise _reject("IS is supported only as IS NULL / IS NOT NULL")
        col = self.column(node.this, "the left side of IS NULL")
        return {"op": "is_null", "column": col.name, "negate": negate}

    def numeric_column(self, node: exp.Expression, fn: str) -> ColumnMetadata:
        while isinstance(node, exp.Paren):
            node = node.this
        if not isinstance(node, exp.Column):
            return self.derive(node, fn)
        col = self.column(node, f"the argument of {fn}")
        if not col.numeric:
            raise QueryRejected(f"{fn}({col.name}): column '{col.name}' is {col.type}, not numeric")
        if col.bounds is None and not (fn in ("MEDIAN", "PERCENTILE_CONT") and col.candidates):
            raise QueryRejected(
                f"{fn}({col.name}): column '{col.name}' has no public bounds in the metadata, so it cannot be aggregated"
            )
        return col

    def derive(self, node: exp.Expression, fn: str) -> ColumnMetadata:
        """Arithmetic on bounded columns inside an aggregate, as one more (derived) column with bounds derived
        from the columns' public bounds; identical expressions share one."""
        tree = self.value_tree(node, fn, 0)
        for derived in self.derived:
            if derived.expression == tree:
                break
        else:
            derived = Derived(f"__d{len(self.derived)}", tree, expression_text(tree))
            self.derived.append(derived)
        bounds = {c.name: c.bounds for c in self.metadata.columns if c.bounds is not None}
        return derived_column(derived.name, tree, self.metadata, bounds)  # type: ignore[arg-type]

    def case_key(self, node: exp.Case) -> str:
        """A CASE that maps rows into labels, as a group key (a derived column whose categories are its labels);
        identical CASEs share one."""
        branches = node.args.get("ifs") or []
        if not branches or len(branches) > MAX_CASES:
            raise QueryRejected(f"a CASE needs 1 to {MAX_CASES} WHEN branches")
        subject = node.this
        cases = []
        for branch in branches:
            condition = branch.this
            if subject is not None:  # CASE col WHEN value THEN ...: an equality on that column
                condition = exp.EQ(this=subject.copy(), expression=condition.copy())
            cases.append({"when": self.predicate(condition), "then": self.label(branch.args.get("true"))})
        default = node.args.get("default")
        tree: dict[str, Any] = {"case": cases, "else": None if default is None else self.label(default)}
        values = [v for v in (tree["else"], *(c["then"] for c in cases)) if v is not None]
        if not values or len({type(v) for v in values}) > 1:
            raise _reject("a CASE's THEN and ELSE values must all be text, or all whole numbers")
        for derived in self.derived:
            if derived.expression == tree:
                return derived.name
        derived = Derived(f"__k{len(self.derived)}", tree, node.sql(dialect="postgres"))
        self.derived.append(derived)
        return derived.name

    def band_key(self, node: exp.Expression) -> str | None:
        """FLOOR bands and CASTs of categories as group keys, or None if `node` is neither. Each is rewritten as the
        CASE it stands for, with edges and labels from public metadata alone: `FLOOR(age / 10) * 10` over bounds
        [17, 90] is the CASE of labels 10, 20, ..., 90; `CAST(year AS VARCHAR)` maps each category to its text."""
        while isinstance(node, exp.Paren):
            node = node.this
        text = node.sql(dialect="postgres")
        part = self.date_part(node)
        if part is not None:
            return self._key(part, text)
        if isinstance(node, exp.Cast):
            inner = node.this
            while isinstance(inner, exp.Paren):
                inner = inner.this
            target = _cast_target(node)
            if isinstance(inner, exp.Column):
                return self._key(self.cast_categories(self.column(inner, "CAST"), target, text), text)
            band = self.floor_band(inner, text)
            if band is None:
                raise QueryRejected(f"{_short(node)}: CAST of a computed value rounds differently across "
                                    "SQL engines; band it with FLOOR(...) (e.g. FLOOR(age / 10) * 10)")
            return self._key(_relabel(band, target, text), text)
        band = self.floor_band(node, text)
        return None if band is None else self._key(band, text)

    def date_part(self, node: exp.Expression) -> dict[str, Any] | None:
        """YEAR(d), QUARTER, MONTH, DAY, EXTRACT(... FROM d) or DATE_PART('...', d) of a date column, as a tree
        whose range follows from the column's public first and last dates; None if `node` is none of these."""
        named = {exp.Year: "year", exp.Quarter: "quarter", exp.Month: "month", exp.Day: "day",
                 exp.DayOfMonth: "day"}
        if isinstance(node, exp.Extract):
            unit, arg = node.this.name.lower(), node.expression
            part = {"year": "year", "quarter": "quarter", "month": "month", "day": "day", "isodow": "dow"}.get(unit)
            if part is None:
                why = ("engines number DOW differently; use EXTRACT(ISODOW FROM ...), 1 Monday to 7 Sunday"
                       if unit == "dow" else "the date parts are YEAR, QUARTER, MONTH, DAY and ISODOW")
                raise QueryRejected(f"{_short(node)}: {why}")
        elif type(node) in named:
            part, arg = named[type(node)], node.this
        elif isinstance(node, exp.DayOfWeek):
            raise QueryRejected(f"{_short(node)}: engines number the days of the week differently; use "
                                "EXTRACT(ISODOW FROM ...), 1 Monday to 7 Sunday")
        else:
            return None
        while isinstance(arg, exp.Paren):
            arg = arg.this
        if not isinstance(arg, exp.Column):
            raise _reject(f"{_short(node)}: a date part takes a date column")
        col = self.column(arg, f"the argument of {part.upper()}")
        if col.type != "date":
            raise QueryRejected(f"{_short(node)}: column '{col.name}' is {col.type}, not a date")
        if col.bounds is None:
            raise QueryRejected(f"{_short(node)}: column '{col.name}' has no public first and last dates (bounds) "
                                "in the metadata, so its date parts have no public range")
        lo, hi = expressions.date_part_range(part, *col.bounds)
        return {"part": part, "of": col.name, "range": [lo, hi]}

    def floor_band(self, node: exp.Expression, text: str) -> dict[str, Any] | None:
        """FLOOR(e), FLOOR(e) * w or w * FLOOR(e), for e an increasing affine function of one bounded column, as a
        CASE tree; None if `node` has another shape."""
        width: Fraction = Fraction(1)
        if isinstance(node, exp.Mul):
            for floor, other in ((node.left, node.right), (node.right, node.left)):
                while isinstance(floor, exp.Paren):
                    floor = floor.this
                if isinstance(floor, exp.Floor) and isinstance(other, exp.Literal) and not other.is_string:
                    node, width = floor, Fraction(other.this)
                    break
            else:
                return None
        if not isinstance(node, exp.Floor):
            return None
        if node.args.get("decimals") is not None:
            raise _reject(f"{text}: FLOOR takes one argument in a band")
        tree = self.value_tree(node.this, "FLOOR", 0)
        names = set(expressions.columns_of(tree))
        affine = expressions.affine(tree)
        if len(names) != 1 or affine is None or affine[0] <= 0:
            raise QueryRejected(f"{text}: a FLOOR band takes an increasing linear function of one column, such as "
                                "FLOOR(age / 10) or FLOOR((income - 1000) / 500)")
        col = self.metadata.column(names.pop())
        assert col is not None and col.bounds is not None  # value_tree checked both
        slope, offset = affine
        first = math.floor(slope * Fraction(col.bounds[0]) + offset)
        last = math.floor(slope * Fraction(col.bounds[1]) + offset)
        bands = last - first + 1
        if bands < 2 or bands > MAX_CASES:
            raise QueryRejected(f"{text} makes {bands} band{'s' if bands != 1 else ''} over {col.name}'s public bounds "
                                f"{list(col.bounds)}; a band key needs 2 to {MAX_CASES}: change the width")
        labels = [k * width for k in range(first, last + 1)]
        if any(label.denominator != 1 for label in labels):
            raise QueryRejected(f"{text}: band labels must be whole numbers; multiply FLOOR(...) by a whole number")
        cases: list[dict[str, Any]] = []
        if col.nullable:  # NULL is its own group, as the column's NULL is in SQL
            cases.append({"when": {"op": "is_null", "column": col.name, "negate": False}, "then": None})
        for k, label in zip(range(first, last), labels):
            edge = (k + 1 - offset) / slope  # where band k ends: e < k + 1 exactly when the column < edge
            value: Any = math.ceil(edge) if col.type == "int" else float(edge)
            cases.append({"when": {"op": "cmp", "cmp": "<", "column": col.name, "value": value},
                          "then": int(label)})
        return {"case": cases, "else": int(labels[-1])}  # values beyond the bounds fall in the end bands (clipping)

    def cast_categories(self, col: ColumnMetadata, target: str, text: str) -> dict[str, Any]:
        if col.categories is None:
            raise QueryRejected(f"GROUP BY {text}: column '{col.name}' has no public categories; band a numeric "
                                "column with FLOOR(...) instead (e.g. FLOOR(age / 10) * 10)")
        labels = [_cast_label(value, target, text) for value in col.categories]
        if len(labels) > MAX_CASES:
            raise QueryRejected(f"GROUP BY {text}: {col.name} has {len(labels)} categories; a CAST key takes at most "
                                f"{MAX_CASES}")
        # NULL is a group where the column may hold it; otherwise the last category is the ELSE (no NULL group)
        listed = col.categories if col.nullable else col.categories[:-1]
        cases = [{"when": {"op": "cmp", "cmp": "==", "column": col.name, "value": value}, "then": label}
                 for value, label in zip(listed, labels)]
        return {"case": cases, "else": None if col.nullable else labels[-1]}

    def _key(self, tree: dict[str, Any], text: str) -> str:
        values = [v for v in expressions.labels(tree) if v is not None] if "case" in tree else []
        if len({type(v) for v in values}) > 1:  # pragma: no cover - labels are converted to one type
            raise _reject(f"{text}: its labels must be all text or all whole numbers")
        for derived in self.derived:
            if derived.expression == tree:
                return derived.name
        derived = Derived(f"__k{len(self.derived)}", tree, text)
        self.derived.append(derived)
        return derived.name

    def label(self, node: exp.Expression | None) -> Any:
        while isinstance(node, exp.Paren):
            node = node.this
        if isinstance(node, exp.Null):
            return None
        if isinstance(node, exp.Literal):
            if node.is_string:
                return node.this
            if node.this.isdigit():
                return int(node.this)
        if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal) and node.this.this.isdigit():
            return -int(node.this.this)
        raise _reject(f"a CASE's THEN and ELSE take a text or whole-number literal (its groups are public), not "
                      f"'{_short(node) if node is not None else ''}'")

    def value_tree(self, node: exp.Expression, fn: str, depth: int) -> dict[str, Any]:
        if depth > MAX_NESTING:
            raise QueryRejected(f"an expression inside {fn} nests more than {MAX_NESTING} levels deep")
        while isinstance(node, exp.Paren):
            node = node.this
        part = self.date_part(node)
        if part is not None:
            return part
        if isinstance(node, exp.Column):
            col = self.column(node, f"a column inside {fn}")
            if not col.numeric or col.bounds is None:
                why = f"is {col.type}" if not col.numeric else "has no public bounds"
                raise QueryRejected(f"{fn}({_short(node)}...): column '{col.name}' {why}, so it cannot be used in "
                                    "arithmetic")
            return {"col": col.name}
        if isinstance(node, exp.Literal) and not node.is_string:
            return {"const": _number(node.this)}
        if isinstance(node, exp.Neg):
            inner = self.value_tree(node.this, fn, depth + 1)
            if "const" in inner:
                return {"const": -inner["const"]}
            return {"op": "*", "args": [{"const": -1}, inner]}
        ops = {exp.Add: "+", exp.Sub: "-", exp.Mul: "*", exp.Div: "/"}
        for cls, op in ops.items():
            if isinstance(node, cls):
                left = self.value_tree(node.left, fn, depth + 1)
                right = self.value_tree(node.right, fn, depth + 1)
                if op == "/" and ("const" not in right or right["const"] == 0):
                    raise _reject(f"inside {fn}, divide by a non-zero number only, not '{_short(node.right)}' "
                                  "(a ratio of aggregates, e.g. SUM(a) / SUM(b), is computed after release)")
                tree = {"op": op, "args": [left, right]}
                if "const" in left and "const" in right:
                    raise _reject(f"'{_short(node)}' inside {fn} is a constant: aggregate a column")
                return tree
        if isinstance(node, (exp.AggFunc, exp.Window)):
            raise _reject(f"aggregates cannot be nested: '{_short(node)}' inside {fn}")
        raise _reject(f"unsupported expression inside {fn}: '{_short(node)}'; inside an aggregate, arithmetic "
                      "(+ - * and / by a number) on bounded numeric columns is supported")

    def quantile_value(self, node: exp.Expression) -> float:
        if not isinstance(node, exp.Literal) or node.is_string:
            raise _reject("the quantile must be a number between 0 and 1")
        q = float(node.this)
        if not 0.0 < q < 1.0:
            raise QueryRejected(f"the quantile must be strictly between 0 and 1, got {node.this}")
        return q

    def aggregate(self, node: exp.Expression) -> tuple[str, str | None, float | None]:
        """Returns (kind, column, quantile) for an allowed aggregate."""
        if isinstance(node, exp.Count):
            arg = node.this
            if isinstance(arg, exp.Star):
                return "count_star", None, None
            if isinstance(arg, exp.Distinct):
                if len(arg.expressions) != 1:
                    raise _reject("COUNT(DISTINCT ...) takes one column")
                return "count_distinct", self.column(arg.expressions[0], "the argument of COUNT(DISTINCT ...)").name, None
            if isinstance(arg, exp.Literal) and not arg.is_string and arg.this == "1":
                return "count_star", None, None
            while isinstance(arg, exp.Paren):
                arg = arg.this
            if not isinstance(arg, exp.Column):
                return "count", self.derive(arg, "COUNT").name, None
            return "count", self.column(arg, "the argument of COUNT").name, None
        if isinstance(node, exp.Sum):
            return "sum", self.numeric_column(node.this, "SUM").name, None
        if isinstance(node, exp.Avg):
            return "avg", self.numeric_column(node.this, "AVG").name, None
        spreads = ((exp.VariancePop, "var_pop", "VAR_POP"), (exp.Variance, "var_samp", "VARIANCE"),
                   (exp.StddevPop, "stddev_pop", "STDDEV_POP"), (exp.StddevSamp, "stddev_samp", "STDDEV_SAMP"),
                   (exp.Stddev, "stddev_samp", "STDDEV"))
        for cls, kind, fn in spreads:
            if isinstance(node, cls):
                col = self.numeric_column(node.this, fn)
                if col.bounds is None:
                    raise QueryRejected(f"{fn}({col.name}): column '{col.name}' has no public bounds")
                return kind, col.name, None
        if isinstance(node, exp.Anonymous) and node.name.upper() in _SPREAD_ALIASES and len(node.expressions) == 1:
            kind = _SPREAD_ALIASES[node.name.upper()]  # SQL Server's names: VAR, VARP, STDEV, STDEVP
            return kind, self.numeric_column(node.expressions[0], node.name.upper()).name, None
        if isinstance(node, exp.Median):
            return "quantile", self.numeric_column(node.this, "MEDIAN").name, 0.5
        if isinstance(node, exp.Quantile):
            col = self.numeric_column(node.this, "PERCENTILE_CONT")
            return "quantile", col.name, self.quantile_value(node.args["quantile"])
        if isinstance(node, exp.WithinGroup) and isinstance(node.this, (exp.PercentileCont, exp.PercentileDisc)):
            order = node.expression
            if not isinstance(order, exp.Order) or len(order.expressions) != 1:
                raise _reject("PERCENTILE_CONT needs WITHIN GROUP (ORDER BY <column>)")
            ordered = order.expressions[0]
            if ordered.args.get("desc"):
                raise _reject("PERCENTILE_CONT supports ascending order only")
            col = self.numeric_column(ordered.this, "PERCENTILE_CONT")
            return "quantile", col.name, self.quantile_value(node.this.this)
        if isinstance(node, exp.Window):
            raise _reject("window functions (OVER ...) are not supported")
        if isinstance(node, exp.AggFunc) or isinstance(node, exp.Anonymous):
            name = node.name.upper() if isinstance(node, exp.Anonymous) else node.sql_name()
            raise _reject(f"aggregate function {name} is not supported")
        raise _reject(f"unsupported select item '{_short(node)}'")


_SPREAD_ALIASES = {"VAR": "var_samp", "VARP": "var_pop", "STDEV": "stddev_samp", "STDEVP": "stddev_pop"}
_VALUE_OPERATORS = (exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Neg)


def _select_item_named(node: exp.Expression, items: list[exp.Expression], metadata: DatasetMetadata
                       ) -> exp.Expression:
    """A GROUP BY item as written, or the CASE it names: by position (GROUP BY 1) or by its alias where no column
    has that name (as PostgreSQL resolves it)."""
    while isinstance(node, exp.Paren):
        node = node.this
    target = None
    if isinstance(node, exp.Literal) and not node.is_string and node.this.isdigit():
        position = int(node.this)
        if not 1 <= position <= len(items):
            raise QueryRejected(f"GROUP BY {position}: there are {len(items)} select items")
        target = items[position - 1]
    elif isinstance(node, exp.Column) and not node.table and metadata.column(node.name) is None:
        target = next((i for i in items if isinstance(i, exp.Alias) and i.alias == node.name), None)
    if target is None:
        return node
    target = target.this if isinstance(target, exp.Alias) else target
    while isinstance(target, exp.Paren):
        target = target.this
    return target


_TEXT_TYPES = {"VARCHAR", "TEXT", "CHAR", "NVARCHAR", "NCHAR", "BPCHAR", "NAME"}
_INT_TYPES = {"INT", "BIGINT", "SMALLINT", "TINYINT", "UBIGINT", "UINT", "USMALLINT", "UTINYINT"}


def _cast_target(node: exp.Cast) -> str:
    """'text' or 'int': the CAST targets a group key can have (its labels are text or whole numbers)."""
    name = node.to.this.name if isinstance(node.to, exp.DataType) else ""
    if name in _TEXT_TYPES:
        return "text"
    if name in _INT_TYPES:
        return "int"
    raise QueryRejected(f"{_short(node)}: a CAST in GROUP BY is to text (VARCHAR) or a whole number (INT), not "
                        f"{node.to.sql(dialect='postgres')}")


def _cast_label(value: Any, target: str, text: str) -> Any:
    """A category as CAST makes it, as PostgreSQL writes it (TRUE as 'true' or 1)."""
    if target == "text":
        return ("true" if value else "false") if isinstance(value, bool) else str(value)
    if isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise QueryRejected(f"{text}: the category {value!r} is not a whole number, so it cannot be CAST to INT")


def _relabel(tree: dict[str, Any], target: str, text: str) -> dict[str, Any]:
    """A band's CASE with its labels as the CAST makes them."""
    def cast(value: Any) -> Any:
        return None if value is None else _cast_label(value, target, text)

    return {"case": [{"when": c["when"], "then": cast(c["then"])} for c in tree["case"]], "else": cast(tree["else"])}


def _key_columns(derived: list[Derived], metadata: DatasetMetadata) -> list[ColumnMetadata]:
    return [derived_column(d.name, d.expression, metadata, {}) for d in derived
            if "case" in d.expression or "part" in d.expression]


def _number(text: str) -> int | float:
    try:
        return int(text) if text.isdigit() else float(text)
    except ValueError:
        raise _reject(f"'{text}' is not a number") from None


def _short(node: exp.Expression) -> str:
    text = node.sql()
    return text if len(text) <= 60 else text[:57] + "..."


def _default_alias(kind: str, column: str | None, quantile: float | None) -> str:
    if kind == "count_star":
        return "count"
    if kind == "quantile":
        if quantile == 0.5:
            return f"median_{column}"
        return f"p{round(quantile * 100, 2):g}_{column}".replace(".", "_")
    return f"{kind}_{column}"


def compile_sql(sql: str, table: str, metadata: DatasetMetadata,
                max_groups: int = DEFAULT_MAX_GROUPS) -> QuerySpec:
    """Parse and check `sql` against the allowlist and the dataset's metadata, and bound the work it asks for
    (groups, conditions, nesting) from public information alone, before anything runs."""
    try:
        return _compile(sql, table, metadata, max_groups)
    except RecursionError:
        raise QueryRejected("the query is nested too deeply") from None


_TOP = re.compile(r"\s*SELECT\s+TOP\s*\(?\s*\d+", re.IGNORECASE)
STATEMENT_WORDS = {"SELECT", "WITH", "INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "ALTER", "COPY", "ATTACH",
                   "PRAGMA", "EXPLAIN", "SET", "SHOW", "DESCRIBE", "VALUES", "TABLE", "GRANT", "TRUNCATE", "CALL"}


def _parse_problem(sql: str, err: ParseError) -> str:
    """Name the bad token, not just a column: a misspelt first keyword is the usual culprit."""
    first_word = sql.strip().split(None, 1)[0]
    if first_word.upper() not in STATEMENT_WORDS:
        hint = " (did you mean SELECT?)" if difflib.get_close_matches(first_word.upper(), ["SELECT"], cutoff=0.6) else ""
        return f"it must start with SELECT, not '{first_word[:30]}'{hint}"
    first = err.errors[0] if err.errors else {}
    token = (first.get("highlight") or "").strip()
    place = f" at line {first.get('line')}, column {first.get('col')}" if first.get("line") else ""
    return (f"unexpected '{token[:30]}'{place}" if token else f"it could not be read{place}")


def _compile(sql: str, table: str, metadata: DatasetMetadata, max_groups: int) -> QuerySpec:
    if not isinstance(sql, str) or not sql.strip():
        raise QueryRejected("the query is empty. " + SUPPORTED)
    if len(sql) > MAX_SQL_CHARS:
        raise QueryRejected(f"the query is longer than {MAX_SQL_CHARS} characters")
    dialect = "tsql" if _TOP.match(sql) else "postgres"  # SELECT TOP n: SQL Server's LIMIT, as peers' corpora use
    try:
        trees = [t for t in sqlglot.parse(sql, read=dialect) if t is not None]
    except ParseError as err:
        raise QueryRejected(f"the query is not valid SQL: {_parse_problem(sql, err)}. {SUPPORTED}") from None
    except Exception:  # sqlglot tokenizer errors have several types
        raise QueryRejected(f"the query is not valid SQL. {SUPPORTED}") from None
    if len(trees) != 1:
        raise _reject("send exactly one statement")
    select = trees[0]
    if not isinstance(select, exp.Select):
        statement = sql.strip().split(None, 1)[0].upper()[:20]
        raise _reject(f"only SELECT statements are supported, not '{statement}'")
    for key, value in select.args.items():
        if value and key not in _ALLOWED_ARGS:
            raise _reject(f"unsupported clause: {_CLAUSE_NAMES.get(key, key.upper())}")

    source = select.args.get("from_") or select.args.get("from")
    if source is None:
        raise _reject(f"the query needs FROM {table}")
    src = source.this
    if not isinstance(src, exp.Table) or not isinstance(src.this, exp.Identifier):
        raise _reject(f"FROM must name the dataset table {table} (no subqueries or table functions)")
    if src.args.get("db") or src.args.get("catalog"):
        raise _reject(f"FROM must name the dataset table {table} without a schema")
    if src.name != table:
        raise QueryRejected(f"FROM {src.name}: this query runs on dataset '{table}', so write FROM {table}")
    if any(src.args.get(k) for k in ("joins", "laterals", "pivots", "sample")):
        raise _reject("unsupported clause on the table")
    compiler = _Compiler(metadata, src.alias or table)

    group_by: list[str] = []
    group = select.args.get("group")
    if group:
        if any(group.args.get(k) for k in ("rollup", "cube", "grouping_sets")):
            raise _reject("ROLLUP, CUBE and GROUPING SETS are not supported")
        for node in group.expressions:
            node = _select_item_named(node, select.expressions, metadata)
            if isinstance(node, exp.Case) or (band := compiler.band_key(node)) is not None:
                name = compiler.case_key(node) if isinstance(node, exp.Case) else band
                if name in group_by:
                    raise _reject(f"GROUP BY lists '{_short(node)}' twice")
                group_by.append(name)
                continue
            col = compiler.column(node, "GROUP BY items")
            if col.type == "date":
                raise QueryRejected(f"GROUP BY {col.name}: a date column's days are not public groups; group by a "
                                    f"date part, such as YEAR({col.name}) or EXTRACT(MONTH FROM {col.name})")
            if col.categories is None and col.type == "float":
                raise QueryRejected(
                    f"GROUP BY {col.name}: column '{col.name}' is a float with no public category list, so its "
                    "values are not groups. Group by a CASE WHEN band of it, or by a column with public categories."
                )
            if col.name in group_by:
                raise _reject(f"GROUP BY lists '{col.name}' twice")
            group_by.append(col.name)
        keys = {c.name: c for c in _key_columns(compiler.derived, metadata)}
        # a key without public categories (private keys, released by a threshold) has no known size here
        sizes = [len((metadata.column(name) or keys[name]).group_keys) for name in group_by  # type: ignore[union-attr]
                 if (metadata.column(name) or keys[name]).categories is not None]
        groups = math.prod(sizes)
        if groups > max_groups:
            product = " x ".join(f"{size:,}" for size in sizes)
            raise QueryRejected(
                f"GROUP BY {', '.join(group_by)} makes {product} = {groups:,} groups; this service releases at "
                f"most {max_groups:,} groups per query. Group by fewer columns."
            )

    aggregates: list[Aggregate] = []
    outputs: list[OutputColumn] = []
    names: set[str] = set()
    for item in select.expressions:
        alias = item.alias if isinstance(item, exp.Alias) else None
        node = item.this if isinstance(item, exp.Alias) else item
        while isinstance(node, exp.Paren):  # (SUM(age)) is SUM(age)
            node = node.this
        if isinstance(node, exp.Star):
            raise _reject("SELECT * would release rows; select aggregates instead")
        if isinstance(node, exp.Case) or (band := compiler.band_key(node)) is not None:
            name = compiler.case_key(node) if isinstance(node, exp.Case) else band
            if name not in group_by:
                raise QueryRejected(f"'{_short(node)}' is selected but not in GROUP BY: group by it (GROUP BY its "
                                    "alias, position or the same CASE) to release a count per label")
            output = OutputColumn(alias or _short(node), key=name)
        elif isinstance(node, exp.Column):
            col = compiler.column(node, "select items")
            if col.name not in group_by:
                raise QueryRejected(
                    f"'{col.name}' is selected but not aggregated: individual rows are never released. "
                    f"Aggregate it (e.g. {'AVG' if col.numeric else 'COUNT'}({col.name})) or add it to GROUP BY "
                    "if it has public categories."
                )
            output = OutputColumn(alias or col.name, key=col.name)
        elif isinstance(node, (exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Neg)):
            expression = _arithmetic(node, compiler, aggregates, 0)
            if not _uses_aggregate(expression):
                raise _reject(f"'{_short(node)}' computes no aggregate")
            output = OutputColumn(alias or _short(node), expression=expression)
        else:
            kind, column, quantile = compiler.aggregate(node)
            derived = column is not None and column.startswith("__")
            name = alias or (_short(node) if derived else _default_alias(kind, column, quantile))
            aggregates.append(Aggregate(kind, column, name, quantile))
            output = OutputColumn(name, aggregate=len(aggregates) - 1)
        if output.name in names:
            raise QueryRejected(f"two output columns are named '{output.name}': give them distinct aliases")
        names.add(output.name)
        outputs.append(output)
    if not aggregates:
        raise _reject("the query must compute at least one aggregate")
    if len(aggregates) > MAX_AGGREGATES:
        raise QueryRejected(f"at most {MAX_AGGREGATES} aggregates per query")

    where = select.args.get("where")
    predicate = compiler.predicate(where.this) if where is not None else None
    post = _post_processing(select, compiler, outputs, aggregates)
    return QuerySpec(table, tuple(group_by), tuple(aggregates), tuple(outputs), predicate, post,
                     tuple(compiler.derived))


def _arithmetic(node: exp.Expression, compiler: _Compiler, aggregates: list[Aggregate], depth: int) -> dict[str, Any]:
    """+ - * / between aggregates and numbers, computed from the released values (free post-processing). Each
    aggregate used is released once (shared with an identical select item); one used only here is released
    under an internal name."""
    if depth > MAX_NESTING:
        raise QueryRejected(f"an expression in SELECT nests more than {MAX_NESTING} levels deep")
    while isinstance(node, exp.Paren):
        node = node.this
    ops = {exp.Add: "+", exp.Sub: "-", exp.Mul: "*", exp.Div: "/"}
    for cls, op in ops.items():
        if isinstance(node, cls):
            return {"op": op, "args": [_arithmetic(node.left, compiler, aggregates, depth + 1),
                                       _arithmetic(node.right, compiler, aggregates, depth + 1)]}
    if isinstance(node, exp.Neg):
        return {"op": "*", "args": [{"const": -1.0}, _arithmetic(node.this, compiler, aggregates, depth + 1)]}
    if isinstance(node, exp.Literal) and not node.is_string:
        try:
            return {"const": float(node.this)}
        except ValueError:
            raise _reject(f"'{node.this}' is not a number") from None
    if isinstance(node, exp.Column):
        raise QueryRejected(f"'{node.name}' in an expression outside an aggregate: rows are never released. Put the "
                            f"arithmetic inside the aggregate (e.g. SUM({node.name} * 2)) or between aggregates "
                            f"(e.g. SUM({node.name}) / COUNT(*))")
    kind, column, quantile = compiler.aggregate(node)
    for i, agg in enumerate(aggregates):
        if (agg.kind, agg.column, agg.quantile) == (kind, column, quantile):
            return {"agg": i}
    aggregates.append(Aggregate(kind, column, f"__{_default_alias(kind, column, quantile)}", quantile))
    return {"agg": len(aggregates) - 1}


def _uses_aggregate(tree: dict[str, Any]) -> bool:
    return "agg" in tree or any(_uses_aggregate(a) for a in tree.get("args", []))


def _post_processing(select: exp.Select, compiler: _Compiler, outputs: list[OutputColumn],
                     aggregates: list[Aggregate]) -> dict[str, Any] | None:
    """HAVING, ORDER BY and LIMIT as operations on the released table (by output name); None if absent."""

    def output_of(node: exp.Expression, clause: str) -> str:
        while isinstance(node, exp.Paren):
            node = node.this
        if isinstance(node, exp.Column) and not node.table:
            for output in outputs:
                if node.name in (output.name, output.key):
                    return output.name
            raise QueryRejected(f"{clause} '{node.name}': not a selected column or alias; {clause} works on the "
                                "query's outputs")
        try:
            kind, column, quantile = compiler.aggregate(node)
        except QueryRejected:
            raise _reject(f"{clause} may use the selected columns and aggregates only, not '{_short(node)}'") from None
        for i, agg in enumerate(aggregates):
            if (agg.kind, agg.column, agg.quantile) == (kind, column, quantile):
                named = [o.name for o in outputs if o.aggregate == i]
                if named:
                    return named[0]
        raise QueryRejected(f"{clause} {_short(node)}: it is not selected, and only what the query releases can be "
                            "used after release; add it to SELECT")

    def condition(node: exp.Expression, depth: int = 0) -> dict[str, Any]:
        while isinstance(node, exp.Paren):
            node = node.this
        if depth > MAX_NESTING:
            raise QueryRejected(f"HAVING nests more than {MAX_NESTING} levels deep")
        if isinstance(node, (exp.And, exp.Or)):
            return {"op": "and" if isinstance(node, exp.And) else "or",
                    "args": [condition(node.left, depth + 1), condition(node.right, depth + 1)]}
        if isinstance(node, exp.Not):
            return {"op": "not", "arg": condition(node.this, depth + 1)}
        comparisons = {exp.EQ: "==", exp.NEQ: "!=", exp.GT: ">", exp.GTE: ">=", exp.LT: "<", exp.LTE: "<="}
        flipped = {"==": "==", "!=": "!=", ">": "<", ">=": "<=", "<": ">", "<=": ">="}
        for cls, op in comparisons.items():
            if isinstance(node, cls):
                left, right = node.left, node.right
                if isinstance(left, (exp.Literal, exp.Neg)) and not isinstance(right, (exp.Literal, exp.Neg)):
                    left, right, op = right, left, flipped[op]
                negative = isinstance(right, exp.Neg)
                literal = right.this if negative else right
                if not isinstance(literal, exp.Literal) or literal.is_string:
                    raise _reject(f"HAVING compares an output with a number, not '{_short(node)}'")
                value = float(literal.this) * (-1 if negative else 1)
                return {"op": "cmp", "cmp": op, "output": output_of(left, "HAVING"), "value": value}
        raise _reject(f"unsupported condition in HAVING: '{_short(node)}'")

    post: dict[str, Any] = {}
    having = select.args.get("having")
    if having is not None:
        post["having"] = condition(having.this)
    order = select.args.get("order")
    if order is not None:
        post["order"] = []
        for item in order.expressions:
            node = item.this
            if isinstance(node, exp.Literal) and not node.is_string and node.this.isdigit():
                position = int(node.this)
                if not 1 <= position <= len(outputs):
                    raise QueryRejected(f"ORDER BY {position}: there are {len(outputs)} output columns")
                name = outputs[position - 1].name
            else:
                name = output_of(node, "ORDER BY")
            post["order"].append({"output": name, "desc": bool(item.args.get("desc"))})
    limit = select.args.get("limit")
    if limit is not None:
        count = limit.expression
        if not isinstance(count, exp.Literal) or count.is_string or not count.this.isdigit():
            raise _reject("LIMIT takes a whole number")
        if int(count.this) > MAX_LIMIT:
            raise QueryRejected(f"LIMIT is at most {MAX_LIMIT:,}")
        post["limit"] = int(count.this)
    return post or None
