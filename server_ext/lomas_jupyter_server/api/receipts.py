"""The public key that checks release receipts (what lomas-verify needs, offline)."""

from __future__ import annotations

import tornado.web
from jupyter_server.auth.decorator import authorized

from .base import LomasHandler


class ReceiptKeyHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.lomas_user  # noqa: B018  (registers the caller)
        self.reply(self.service.queries.receipt_key())
