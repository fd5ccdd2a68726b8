"""Who is calling; users, roles and tokens (admin)."""

from __future__ import annotations

import tornado.web
from jupyter_server.auth.decorator import authorized

from .base import LomasHandler


class WhoAmIHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.reply(self.lomas_user.to_json())


class AdminUsersHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.reply(self.service.admin.users(self.lomas_user))

    @tornado.web.authenticated
    @authorized
    def post(self) -> None:
        self.reply(self.service.admin.create_user(self.lomas_user, self.json_body()), 201)


class AdminUserHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def patch(self, username: str) -> None:
        self.reply(self.service.admin.set_role(self.lomas_user, username, self.json_body()))

    @tornado.web.authenticated
    @authorized
    def delete(self, username: str) -> None:
        self.reply(self.service.admin.remove_user(self.lomas_user, username))


class AdminTokensHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def post(self, username: str) -> None:
        self.reply(self.service.admin.issue_token(self.lomas_user, username, self.json_body()), 201)

    @tornado.web.authenticated
    @authorized
    def delete(self, username: str) -> None:
        self.reply(self.service.admin.revoke_tokens(self.lomas_user, username))
