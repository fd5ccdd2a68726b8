"""lomas_jupyter: the kernel side. `%load_ext lomas_jupyter` for magics, `Client` for plain Python."""

from __future__ import annotations

from .builder import Expr, Query, col, len, lit
from .client import Client, Connection, Release, discover
from .errors import LomasError

__version__ = "0.1.0"
__all__ = ["Client", "Connection", "Expr", "LomasError", "Query", "Release", "col", "discover", "len", "lit"]


def load_ipython_extension(ipython: object) -> None:
    from .magics import load_ipython_extension as load

    load(ipython)
