"""Post-processing: HAVING, ORDER BY and LIMIT applied to a released table, never to the data. Free (the DP
guarantee survives any computation on its output), and so computed from the same release whatever the
post-processing: a query that differs only here is a free replay."""

from __future__ import annotations

import operator
from typing import Any

_COMPARE = {"==": operator.eq, "!=": operator.ne, ">": operator.gt, ">=": operator.ge, "<": operator.lt,
            "<=": operator.le}
NOTE = ("HAVING, ORDER BY and LIMIT were applied to the noisy values after release (free): a HAVING on a noisy "
        "number may keep a group whose true value misses the threshold, or drop one that meets it")


def _holds(condition: dict[str, Any], row: dict[str, Any]) -> bool:
    op = condition["op"]
    if op == "and":
        return all(_holds(c, row) for c in condition["args"])
    if op == "or":
        return any(_holds(c, row) for c in condition["args"])
    if op == "not":
        return not _holds(condition["arg"], row)
    value = row.get(condition["output"])
    if value is None or isinstance(value, str):  # SQL: a comparison with NULL is not true
        return False
    return bool(_COMPARE[condition["cmp"]](value, condition["value"]))


def apply_post(result: dict[str, Any], post: dict[str, Any] | None) -> dict[str, Any]:
    """The released table (columns, rows, intervals) after HAVING, ORDER BY and LIMIT, with a note saying what
    was applied; unchanged without post-processing."""
    if not post:
        return result
    pairs = list(zip(result["rows"], result["intervals"]))
    if "having" in post:
        pairs = [(row, interval) for row, interval in pairs if _holds(post["having"], row)]
    for key in reversed(post.get("order", [])):  # stable sorts, last key first
        name, desc = key["output"], key["desc"]
        present = [p for p in pairs if p[0].get(name) is not None]
        missing = [p for p in pairs if p[0].get(name) is None]
        present.sort(key=lambda p: p[0][name], reverse=desc)
        pairs = missing + present if desc else present + missing  # NULLs first when descending, as PostgreSQL
    if "limit" in post:
        pairs = pairs[: post["limit"]]
    applied = [clause for clause in ("having", "order", "limit") if clause in post]
    return result | {"rows": [p[0] for p in pairs], "intervals": [p[1] for p in pairs],
                     "post_processing": {"applied": applied, "note": NOTE}}
