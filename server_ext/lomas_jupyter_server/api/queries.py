"""Queries, previews and dummy queries."""

from __future__ import annotations

import tornado.web
from jupyter_server.auth.decorator import authorized

from .base import LomasHandler


class QueryHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    async def post(self) -> None:
        self.reply(await self.service.queries.query(self.lomas_user, self.json_body()), 201)


class PreviewHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    async def post(self) -> None:
        self.reply(await self.service.queries.preview(self.lomas_user, self.json_body()))


class DummyQueryHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    async def post(self) -> None:
        self.reply(await self.service.queries.dummy_query(self.lomas_user, self.json_body()))


class DummyRowsHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self, name: str) -> None:
        self.lomas_user  # noqa: B018  (registers the caller)
        self.reply(self.service.queries.dummy_rows(name, self.int_argument("rows", 100)))
