"""A polars-shaped way to write a DP query: `lj.col`, `lj.lit`, `lj.len` and `Client().table(name)`.

    q = (Client().table("penguins").filter(lj.col("year") >= 2008).group_by("species")
         .agg(lj.len(), lj.col("body_mass_g").mean()))
    q.preview(epsilon=0.5); q.release(epsilon=0.5); q.dummy(); q.sql()

Nothing here runs anything: each method returns a new description, and `preview`, `release` and `dummy` send it
as JSON (never code, never a polars plan) for the service to check and compile like SQL. A builder query and its
SQL twin are one query (one price; each replays the other for free). Outputs are named as in SQL (`count`,
`avg_body_mass_g`) unless given an `.alias(...)`. A `filter` after `agg` filters the released table (SQL's
HAVING); `sort` and `limit` work on the released table too: all three are free and act on noisy values.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Client, Release


class Expr:
    """One node of a query description; operators build bigger ones."""

    def __init__(self, node: dict[str, Any]) -> None:
        self.node = node

    def __repr__(self) -> str:
        return f"Expr({self.node!r})"

    # comparisons and logic (a WHERE, or a HAVING after agg)
    def _op(self, op: str, *others: Any) -> Expr:
        return Expr({"op": op, "args": [self.node, *(_node(o) for o in others)]})

    def __eq__(self, other: object) -> Expr:  # type: ignore[override]
        return self._op("==", other)

    def __ne__(self, other: object) -> Expr:  # type: ignore[override]
        return self._op("!=", other)

    def __lt__(self, other: Any) -> Expr:
        return self._op("<", other)

    def __le__(self, other: Any) -> Expr:
        return self._op("<=", other)

    def __gt__(self, other: Any) -> Expr:
        return self._op(">", other)

    def __ge__(self, other: Any) -> Expr:
        return self._op(">=", other)

    def __and__(self, other: Any) -> Expr:
        return self._op("and", other)

    def __or__(self, other: Any) -> Expr:
        return self._op("or", other)

    def __invert__(self) -> Expr:
        return self._op("not")

    def __bool__(self) -> bool:
        raise TypeError("a query expression has no truth value: combine conditions with & and |, not 'and'/'or'")

    __hash__ = None  # type: ignore[assignment]  # == builds an expression

    def is_null(self) -> Expr:
        return self._op("is_null")

    def is_not_null(self) -> Expr:
        return self._op("is_not_null")

    def is_in(self, values: list[Any] | tuple[Any, ...]) -> Expr:
        return Expr({"op": "is_in", "args": [self.node], "values": [_node(v)["lit"] for v in values]})

    def is_between(self, lower: Any, upper: Any) -> Expr:
        return self._op("is_between", lower, upper)

    # arithmetic: between released aggregates (free post-processing)
    def __add__(self, other: Any) -> Expr:
        return self._op("+", other)

    def __radd__(self, other: Any) -> Expr:
        return Expr({"op": "+", "args": [_node(other), self.node]})

    def __sub__(self, other: Any) -> Expr:
        return self._op("-", other)

    def __rsub__(self, other: Any) -> Expr:
        return Expr({"op": "-", "args": [_node(other), self.node]})

    def __mul__(self, other: Any) -> Expr:
        return self._op("*", other)

    def __rmul__(self, other: Any) -> Expr:
        return Expr({"op": "*", "args": [_node(other), self.node]})

    def __truediv__(self, other: Any) -> Expr:
        return self._op("/", other)

    def __rtruediv__(self, other: Any) -> Expr:
        return Expr({"op": "/", "args": [_node(other), self.node]})

    # aggregates
    def _fn(self, fn: str, **extra: Any) -> Expr:
        return Expr({"fn": fn, "arg": self.node, **extra})

    def sum(self) -> Expr:
        return self._fn("sum")

    def mean(self) -> Expr:
        return self._fn("mean")

    def count(self) -> Expr:
        """Non-null values (polars' `count`); `lj.len()` counts rows."""
        return self._fn("count")

    def n_unique(self) -> Expr:
        """Distinct non-null values (SQL's COUNT(DISTINCT ...))."""
        return self._fn("n_unique")

    def median(self) -> Expr:
        return self._fn("median")

    def quantile(self, quantile: float) -> Expr:
        return self._fn("quantile", q=quantile)

    def var(self, ddof: int = 1) -> Expr:
        return self._fn("var", ddof=ddof)

    def std(self, ddof: int = 1) -> Expr:
        return self._fn("std", ddof=ddof)

    def alias(self, name: str) -> Expr:
        return Expr({"alias": name, "expr": self.node})

    @property
    def dt(self) -> DateParts:
        """Date parts of a date column, as polars names them: `lj.col("visit").dt.year()`."""
        return DateParts(self)


class DateParts:
    """`.dt` of a date column: each part is a whole number (a group key over the range the public dates allow)."""

    def __init__(self, of: Expr) -> None:
        self.of = of

    def _part(self, part: str) -> Expr:
        return Expr({"dt": part, "arg": self.of.node})

    def year(self) -> Expr:
        return self._part("year")

    def quarter(self) -> Expr:
        return self._part("quarter")

    def month(self) -> Expr:
        return self._part("month")

    def day(self) -> Expr:
        return self._part("day")

    def weekday(self) -> Expr:
        """1 Monday to 7 Sunday, as polars counts."""
        return self._part("weekday")


def col(name: str) -> Expr:
    return Expr({"col": name})


def lit(value: Any) -> Expr:
    return Expr(_node(value))


def len() -> Expr:  # noqa: A001  # polars' name: pl.len()
    """The number of rows (COUNT(*))."""
    return Expr({"len": True})


def _node(value: Any) -> dict[str, Any]:
    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        return {"lit": value.isoformat()}  # JSON has no dates: the service reads ISO text against a date column
    return value.node if isinstance(value, Expr) else {"lit": value}


class Query:
    """A query on one dataset, built step by step; immutable (each step returns a new query)."""

    def __init__(self, client: Client, dataset: str, description: dict[str, Any] | None = None) -> None:
        self.client = client
        self.dataset = dataset
        self.description: dict[str, Any] = description or {}

    def __repr__(self) -> str:
        return f"Query({self.dataset!r}, {self.description!r})"

    def _with(self, **changes: Any) -> Query:
        return Query(self.client, self.dataset, {**self.description, **changes})

    def filter(self, condition: Expr) -> Query:
        """Before `agg`: which rows count (WHERE). After `agg`: which released rows to keep (HAVING, free)."""
        key = "having" if "agg" in self.description else "filter"
        if key in self.description:
            condition = Expr({"op": "and", "args": [self.description[key], condition.node]})
        return self._with(**{key: condition.node})

    def group_by(self, *keys: str | Expr) -> Query:
        """Column names, or date parts (`lj.col("visit").dt.year().alias("year")`)."""
        return self._with(group_by=[k.node if isinstance(k, Expr) else k for k in keys])

    def agg(self, *exprs: Expr) -> Query:
        return self._with(agg=[e.node for e in exprs])

    def sort(self, by: str, descending: bool = False) -> Query:
        """Order the released table (free)."""
        return self._with(sort=[*self.description.get("sort", []), {"by": by, "descending": descending}])

    def limit(self, rows: int) -> Query:
        """Keep the first rows of the released table (free)."""
        return self._with(limit=rows)

    def to_json(self) -> dict[str, Any]:
        """What is sent: the description, for the request's `query` field."""
        return dict(self.description)

    def sql(self) -> str:
        """The SQL the service compiles this query to (asked with a free preview; nothing is read)."""
        return self.preview(epsilon=0.1)["sql"]

    def preview(self, epsilon: float, delta: float = 0.0,
                bounds: dict[str, list[float]] | None = None) -> dict[str, Any]:
        return self.client.preview(self.dataset, epsilon=epsilon, delta=delta, bounds=bounds, query=self.to_json())

    def release(self, epsilon: float, delta: float = 0.0, bounds: dict[str, list[float]] | None = None,
                fresh: bool = False) -> Release:
        """A DP release, charged (asking the same again is a free replay unless `fresh=True`)."""
        return self.client.query(self.dataset, epsilon=epsilon, delta=delta, bounds=bounds, fresh=fresh,
                                 query=self.to_json())

    def federated(self, epsilon: float, delta: float = 0.0, sites: list[str] | None = None,
                  allow_partial: bool = False, preview: bool = False) -> Any:
        """The same query at several sites (`Client.sites`), combined; see `Client.federated`."""
        return self.client.federated(self.dataset, epsilon=epsilon, delta=delta, sites=sites,
                                     allow_partial=allow_partial, preview=preview, query=self.to_json())

    def dummy(self, epsilon: float = 1.0, delta: float = 0.0) -> Release:
        """The same query on dummy rows: free, labelled, nothing of the data."""
        return self.client.query(self.dataset, epsilon=epsilon, delta=delta, dummy=True, query=self.to_json())
