"""Budgets, the archive of releases, the ledger and the audit log."""

from __future__ import annotations

import tornado.web
from jupyter_server.auth.decorator import authorized

from .base import LomasHandler


class BudgetsHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.reply(self.service.queries.budgets(self.lomas_user))


class BudgetHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self, dataset: str) -> None:
        self.reply(self.service.queries.budget(self.lomas_user, dataset))


class ArchiveHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        dataset = self.get_argument("dataset", None)
        self.reply(self.service.queries.archive(self.lomas_user, dataset, self.int_argument("limit", 200)))


class AdminArchiveHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.reply(self.service.admin.releases(self.lomas_user, self.get_argument("username", None),
                                               self.get_argument("dataset", None), self.int_argument("limit", 200)))


class AdminLedgerHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.reply(self.service.admin.ledger(self.lomas_user, self.get_argument("username", None),
                                             self.int_argument("limit", 500)))


class AdminAuditHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.reply(self.service.admin.audit(self.lomas_user, self.int_argument("limit", 200)))
