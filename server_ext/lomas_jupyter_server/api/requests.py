"""Budget requests: a user's own (ask, list) and the admins' queue (list, decide)."""

from __future__ import annotations

import tornado.web
from jupyter_server.auth.decorator import authorized

from .base import LomasHandler


class BudgetRequestsHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.reply(self.service.requests.mine(self.lomas_user))

    @tornado.web.authenticated
    @authorized
    def post(self) -> None:
        self.reply(self.service.requests.ask(self.lomas_user, self.json_body()), 201)


class AdminBudgetRequestsHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.reply(self.service.requests.all(self.lomas_user, self.get_argument("status", None)))


class AdminBudgetRequestHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def post(self, request_id: str) -> None:
        self.reply(self.service.requests.decide(self.lomas_user, request_id, self.json_body()))
