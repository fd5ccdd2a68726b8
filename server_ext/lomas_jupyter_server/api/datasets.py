"""Datasets: public metadata for analysts; imports, drafts and chunked uploads for admins."""

from __future__ import annotations

import tornado.web
from jupyter_server.auth.decorator import authorized

from ..errors import BadRequest
from ..service import require_admin
from .base import LomasHandler


class DatasetsHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.reply(self.service.queries.list_datasets(self.lomas_user))


class DatasetHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self, name: str) -> None:
        self.lomas_user  # noqa: B018  (registers the caller)
        self.reply(self.service.queries.describe(name))


class AdminDatasetsHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self) -> None:
        self.reply(self.service.datasets.datasets(self.lomas_user))

    @tornado.web.authenticated
    @authorized
    async def post(self) -> None:
        self.reply(await self.service.datasets.import_dataset(self.lomas_user, self.json_body()), 201)


class AdminDatasetDraftHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    async def post(self) -> None:
        self.reply(await self.service.datasets.draft_metadata(self.lomas_user, self.json_body()))


class AdminUploadsHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def post(self) -> None:
        self.reply(self.service.datasets.create_upload(self.lomas_user, self.json_body()), 201)


class AdminUploadHandler(LomasHandler):
    @tornado.web.authenticated
    @authorized
    def get(self, upload: str) -> None:
        self.reply(self.service.datasets.upload_status(self.lomas_user, upload))

    @tornado.web.authenticated
    @authorized
    def put(self, upload: str) -> None:
        """One chunk, as the raw request body, at byte `offset` of the file."""
        require_admin(self.lomas_user)  # an analyst learns nothing, not even what a bad offset is
        raw = self.get_argument("offset", "")
        if not raw.isdigit() or len(raw) > 15:
            raise BadRequest("'offset' must be the chunk's position in the file, in bytes")
        self.reply(self.service.datasets.upload_chunk(self.lomas_user, upload, int(raw), self.request.body or b""))

    @tornado.web.authenticated
    @authorized
    def delete(self, upload: str) -> None:
        self.reply(self.service.datasets.discard_upload(self.lomas_user, upload))
