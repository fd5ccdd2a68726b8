"""Kernel-side errors: one readable line, no traceback wall."""

from __future__ import annotations

from typing import Any


class LomasError(Exception):
    """The service refused a request, or could not be reached. `str(err)` is the whole story."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.details = details or {}

    def _render_traceback_(self) -> list[str]:  # IPython shows this instead of a traceback
        return [f"LomasError: {self.message}"]
