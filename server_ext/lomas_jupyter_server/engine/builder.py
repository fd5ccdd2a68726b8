"""The dataframe-style query form: the JSON description that the kernel's builder (`lj.col(...)`) sends, turned
into the SQL that the one compiler (`sql.compile_sql`) reads.

The description is data, never code. Each node is checked against a short allowlist and rebuilt as a SQL tree
with quoted identifiers and typed literals; the SQL then goes through the same compiler, allowlist and metadata
checks as any SQL. So a builder query and its SQL twin become one query spec: one price, and each replays the
other for free. The form (also in the OpenAPI document, `QueryDescription`):

    {"filter": EXPR, "group_by": ["species"], "agg": [EXPR, ...],      # WHERE, GROUP BY, the aggregates
     "having": EXPR, "sort": [{"by": "n", "descending": true}], "limit": 5}   # on the released table, free

    EXPR: {"col": "year"} | {"lit": 2008} | {"len": true}                       # COUNT(*)
          {"fn": "sum" | "mean" | "count" | "n_unique" | "median" | "var" | "std" | "quantile", "arg": EXPR,
           "ddof": 1, "q": 0.25}                                                   # ddof: var and std; q: quantile
          {"op": "==" | "!=" | "<" | "<=" | ">" | ">=" | "+" | "-" | "*" | "/" | "and" | "or", "args": [EXPR, EXPR]}
          {"op": "not" | "is_null" | "is_not_null", "args": [EXPR]}
          {"op": "is_in", "args": [EXPR], "values": [...]} | {"op": "is_between", "args": [EXPR, EXPR, EXPR]}
          {"dt": "year" | "quarter" | "month" | "day" | "weekday", "arg": EXPR}    # a date part (weekday: ISO's)
          {"alias": "name", "expr": EXPR}
    group_by items are column names, or EXPRs (a date part, aliased or not).
"""

from __future__ import annotations

import math
from typing import Any

from sqlglot import exp

from ..errors import BadRequest

MAX_DEPTH = 40  # nested nodes in one expression (the compiler bounds the rest: conditions, nesting, length)
QUERY_KEYS = ("filter", "group_by", "agg", "having", "sort", "limit")
_COMPARISONS: dict[str, type[exp.Expression]] = {
    "==": exp.EQ, "!=": exp.NEQ, "<": exp.LT, "<=": exp.LTE, ">": exp.GT, ">=": exp.GTE}
_ARITHMETIC: dict[str, type[exp.Expression]] = {"+": exp.Add, "-": exp.Sub, "*": exp.Mul, "/": exp.Div}
_UNARY = ("not", "is_null", "is_not_null")
OPERATORS = (*_COMPARISONS, *_ARITHMETIC, "and", "or", *_UNARY, "is_in", "is_between")
FUNCTIONS = ("sum", "mean", "count", "n_unique", "median", "var", "std", "quantile")
DATE_PARTS = {"year": "YEAR", "quarter": "QUARTER", "month": "MONTH", "day": "DAY", "weekday": "ISODOW"}


def description_to_sql(doc: Any, table: str) -> str:
    """The SQL of a query description on `table` (the request's dataset); BadRequest names the bad part."""
    if not isinstance(doc, dict):
        raise BadRequest("'query' must be an object: {\"agg\": [...], \"group_by\": [...], \"filter\": ...}")
    unknown = sorted(set(doc) - set(QUERY_KEYS))
    if unknown:
        raise BadRequest(f"query: unknown key(s) {unknown}; a query description takes {list(QUERY_KEYS)}")
    aggs = doc.get("agg")
    if not isinstance(aggs, list) or not aggs:
        raise BadRequest("query.agg: a non-empty list of aggregates is required (e.g. lj.len(), "
                         "lj.col('x').mean())")
    group_by = doc.get("group_by", [])
    if not isinstance(group_by, list) or not all((isinstance(g, str) and g) or isinstance(g, dict) for g in group_by):
        raise BadRequest("query.group_by must be a list of column names or date parts")
    keys = [_identifier_column(g) if isinstance(g, str) else _expr(g, f"query.group_by[{i}]", 0)
            for i, g in enumerate(group_by)]
    items = [*keys, *(_expr(a, f"query.agg[{i}]", 0) for i, a in enumerate(aggs))]
    select = exp.select(*items).from_(exp.Table(this=exp.to_identifier(table, quoted=True)))
    if doc.get("filter") is not None:
        select = select.where(_expr(doc["filter"], "query.filter", 0))
    if group_by:  # each key by itself, its alias dropped (the compiler matches it to the selected one)
        select = select.group_by(*(k.this.copy() if isinstance(k, exp.Alias) else k.copy() for k in keys))
    if doc.get("having") is not None:
        select = select.having(_expr(doc["having"], "query.having", 0))
    for i, item in enumerate(_list(doc.get("sort", []), "query.sort")):
        if not isinstance(item, dict) or not isinstance(item.get("by"), str) or set(item) - {"by", "descending"}:
            raise BadRequest(f"query.sort[{i}] must be {{\"by\": <output name>, \"descending\": true|false}}")
        descending = item.get("descending", False)
        if not isinstance(descending, bool):
            raise BadRequest(f"query.sort[{i}].descending must be true or false")
        select = select.order_by(exp.Ordered(this=_identifier_column(item["by"]), desc=descending))
    limit = doc.get("limit")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise BadRequest("query.limit must be a whole number of rows")
        select = select.limit(limit)
    return select.sql(dialect="postgres")


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise BadRequest(f"{where} must be a list")
    return value


def _identifier_column(name: str) -> exp.Expression:
    return exp.column(name, quoted=True)


def _literal(value: Any, where: str) -> exp.Expression:
    if value is None:
        return exp.Null()
    if isinstance(value, bool):
        return exp.Boolean(this=value)
    if isinstance(value, int):
        return exp.Literal.number(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadRequest(f"{where}: numbers must be finite")
        return exp.Literal.number(repr(value))
    if isinstance(value, str):
        return exp.Literal.string(value)
    raise BadRequest(f"{where}: a literal is a number, text, true/false or null")


def _expr(node: Any, where: str, depth: int) -> exp.Expression:
    if depth > MAX_DEPTH:
        raise BadRequest(f"{where}: the expression nests more than {MAX_DEPTH} levels deep")
    if not isinstance(node, dict) or not node:
        raise BadRequest(f"{where}: an expression is an object such as {{\"col\": \"x\"}}")
    keys = set(node)
    if keys == {"col"}:
        if not isinstance(node["col"], str) or not node["col"]:
            raise BadRequest(f"{where}: 'col' names a column")
        return _identifier_column(node["col"])
    if keys == {"lit"}:
        return _literal(node["lit"], where)
    if keys == {"len"}:
        return exp.Count(this=exp.Star())
    if keys == {"alias", "expr"}:
        if not isinstance(node["alias"], str) or not node["alias"]:
            raise BadRequest(f"{where}: 'alias' is a name")
        inner = _expr(node["expr"], where, depth + 1)
        return exp.Alias(this=inner, alias=exp.to_identifier(node["alias"], quoted=True))
    if keys == {"dt", "arg"}:
        if node["dt"] not in DATE_PARTS:
            raise BadRequest(f"{where}: unknown date part {node['dt']!r}; use one of {list(DATE_PARTS)}")
        arg = _expr(node["arg"], f"{where}.arg", depth + 1)
        return exp.Extract(this=exp.Var(this=DATE_PARTS[node["dt"]]), expression=arg)
    if "fn" in node:
        return _function(node, where, depth)
    if "op" in node:
        return _operator(node, where, depth)
    raise BadRequest(f"{where}: unknown expression {sorted(keys)}; expected col, lit, len, fn, op, dt or alias")


def _function(node: dict[str, Any], where: str, depth: int) -> exp.Expression:
    fn = node["fn"]
    allowed = {"fn", "arg"} | ({"ddof"} if fn in ("var", "std") else set()) | ({"q"} if fn == "quantile" else set())
    if fn not in FUNCTIONS:
        raise BadRequest(f"{where}: unknown function {fn!r}; use one of {list(FUNCTIONS)} (or len)")
    if set(node) - allowed or "arg" not in node:
        raise BadRequest(f"{where}: {fn} takes {sorted(allowed)}")
    arg = _expr(node["arg"], f"{where}.arg", depth + 1)
    if fn in ("var", "std"):
        ddof = node.get("ddof", 1)
        if ddof not in (0, 1) or isinstance(ddof, bool):
            raise BadRequest(f"{where}: ddof is 1 (sample) or 0 (population)")
        sample = ddof == 1
        cls = (exp.Variance if sample else exp.VariancePop) if fn == "var" else (
            exp.StddevSamp if sample else exp.StddevPop)
        return cls(this=arg)
    if fn == "quantile":
        q = node.get("q")
        if isinstance(q, bool) or not isinstance(q, (int, float)):
            raise BadRequest(f"{where}: quantile needs q, a number between 0 and 1")
        order = exp.Order(expressions=[exp.Ordered(this=arg)])
        return exp.WithinGroup(this=exp.PercentileCont(this=_literal(float(q), where)), expression=order)
    if fn == "n_unique":  # COUNT(DISTINCT arg)
        return exp.Count(this=exp.Distinct(expressions=[arg]))
    cls = {"sum": exp.Sum, "mean": exp.Avg, "count": exp.Count, "median": exp.Median}[fn]
    return cls(this=arg)


def _operator(node: dict[str, Any], where: str, depth: int) -> exp.Expression:
    op = node["op"]
    if op not in OPERATORS:
        raise BadRequest(f"{where}: unknown operator {op!r}; use one of {list(OPERATORS)}")
    allowed = {"op", "args", "values"} if op == "is_in" else {"op", "args"}
    if set(node) - allowed:
        raise BadRequest(f"{where}: {op} takes {sorted(allowed)}")
    arity = 1 if op in (*_UNARY, "is_in") else 3 if op == "is_between" else 2
    args = _list(node.get("args"), f"{where}.args")
    if len(args) != arity:
        raise BadRequest(f"{where}: {op} takes {arity} argument(s), not {len(args)}")
    a = [_grouped(_expr(x, f"{where}.args[{i}]", depth + 1)) for i, x in enumerate(args)]
    if op in _COMPARISONS:
        return _COMPARISONS[op](this=a[0], expression=a[1])
    if op == "/":  # as the compiler's own parser reads a / in SQL (typed: no CAST in the text)
        return exp.Div(this=a[0], expression=a[1], typed=True, safe=False)
    if op in _ARITHMETIC:
        return _ARITHMETIC[op](this=a[0], expression=a[1])
    if op in ("and", "or"):
        return (exp.And if op == "and" else exp.Or)(this=a[0], expression=a[1])
    if op == "not":
        return exp.Not(this=a[0])
    if op == "is_null":
        return exp.Is(this=a[0], expression=exp.Null())
    if op == "is_not_null":
        return exp.Not(this=exp.Is(this=a[0], expression=exp.Null()))
    if op == "is_between":
        return exp.Between(this=a[0], low=a[1], high=a[2])
    values = _list(node.get("values"), f"{where}.values")
    return exp.In(this=a[0], expressions=[_literal(v, f"{where}.values[{i}]") for i, v in enumerate(values)])


def _grouped(node: exp.Expression) -> exp.Expression:
    """An operand that is itself an operation keeps its grouping in the SQL text: (a + b) * c."""
    binary = (exp.Add, exp.Sub, exp.Mul, exp.Div, exp.And, exp.Or, exp.Not, *_COMPARISONS.values())
    return exp.Paren(this=node) if isinstance(node, binary) else node
