"""Courses: class caps, members and class spending (admin)."""

from __future__ import annotations

import tornado.web
from jupyter_server.auth.decorator import authorized

from .base import LomasHandler


class AdminCoursesHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply([await self.with_hub_roster(c) for c in self.service.courses.courses(self.lomas_user)])

    @tornado.web.authenticated
    @authorized
    def post(self) -> None:
        self.reply(self.service.courses.create_course(self.lomas_user, self.json_body()), 201)


class AdminCourseHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    async def get(self, course: str) -> None:
        self.reply(await self.with_hub_roster(self.service.courses.course(self.lomas_user, course)))

    @tornado.web.authenticated
    @authorized
    async def patch(self, course: str) -> None:
        self.reply(await self.with_hub_roster(
            self.service.courses.set_course_sharing(self.lomas_user, course, self.json_body())))


class AdminCourseDatasetsHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def put(self, course: str) -> None:
        self.reply(self.service.courses.set_course_dataset(self.lomas_user, course, self.json_body()))


class AdminCourseMembersHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def post(self, course: str) -> None:
        self.reply(self.service.courses.add_course_member(self.lomas_user, course, self.json_body()))


class AdminCourseMemberHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def delete(self, course: str, username: str) -> None:
        self.reply(self.service.courses.remove_course_member(self.lomas_user, course, username))


class AdminCourseSpendingHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self, course: str, dataset: str) -> None:
        self.reply(self.service.courses.class_spending(self.lomas_user, course, dataset))
