"""lomas_jupyter_server: the trusted DP service, as a jupyter_server extension (embedded) or `jupyter lomas`."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import LomasApp

    return [{"module": "lomas_jupyter_server.app", "app": LomasApp}]
