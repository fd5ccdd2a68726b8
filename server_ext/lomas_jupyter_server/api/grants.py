"""Grants: how much each user may spend on each dataset (admin)."""

from __future__ import annotations

import tornado.web
from jupyter_server.auth.decorator import authorized

from .base import LomasHandler


class AdminGrantsHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.reply(self.service.admin.grants(self.lomas_user, self.get_argument("username", None)))

    @tornado.web.authenticated
    @authorized
    def put(self) -> None:
        self.reply(self.service.admin.set_grant(self.lomas_user, self.json_body()))
