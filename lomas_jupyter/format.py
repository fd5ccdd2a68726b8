"""Numbers formatted for reading (the JSON and the ledger keep exact values). Shared by tables, charts and the
widget; imports nothing of the package."""

from __future__ import annotations

import math
from typing import Any

SIGNIFICANT = 4


def fmt(value: Any) -> str:
    """Readable numbers: integers with thousands separators, floats to 4 significant digits, never scientific
    notation for ordinary magnitudes (18,977 [8,417, 29,540]; 0.002595; 2.4)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        magnitude = math.floor(math.log10(abs(value)))
        if magnitude >= 15 or magnitude < -6:
            return f"{value:.{SIGNIFICANT}g}"
        decimals = max(0, SIGNIFICANT - 1 - magnitude)
        text = f"{value:,.{decimals}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return str(value)


def span(bounds: list[Any]) -> str:
    """`8,417 – 29,540`: a dash, not a comma, between numbers that have thousands separators."""
    return f"{fmt(bounds[0])} – {fmt(bounds[1])}"
