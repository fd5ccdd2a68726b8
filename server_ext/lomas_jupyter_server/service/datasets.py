"""Datasets as an admin adds them: imports from an upload, inline data or an allowed folder, metadata drafts,
and the chunked uploads behind them."""

from __future__ import annotations

import asyncio
import base64
import binascii
from pathlib import Path
from typing import Any

from .. import engine
from ..engine.workers import WorkerPool
from ..errors import BadRequest, LomasError
from ..store import AdminStore, UserRecord
from .admin import require_admin
from .importing import check_dataset_name, import_dataset, propose_metadata
from .uploads import CHUNK_BYTES, UploadArea


class DatasetAdmin:
    def __init__(self, store: AdminStore, storage_dir: str | Path, pricing_pool: WorkerPool,
                 max_upload_bytes: int = 2 * 1024**3, import_dirs: list[str | Path] | None = None,
                 dataset_url: str | None = None) -> None:
        self.store = store
        self.dataset_url = dataset_url  # imports are written under this object-store prefix (None: storage_dir)
        self.storage_dir = Path(storage_dir)
        self.pricing_pool = pricing_pool
        self.uploads = UploadArea(self.storage_dir / "uploads", max_upload_bytes)
        # the only folders an admin's `path` import or draft may read from (none: path imports are off)
        self.import_dirs = [Path(d).resolve() for d in import_dirs or []]

    def datasets(self, admin: UserRecord) -> list[dict[str, Any]]:
        require_admin(admin)
        return [d.to_public_json() for d in self.store.list_datasets()]

    def _data_source(self, admin: UserRecord, body: dict[str, Any]) -> tuple[str | bytes | Path, str | None, Any]:
        """Where an import or a draft reads its data: an upload, inline base64, or a file on this machine."""
        if isinstance(body.get("upload"), str):
            upload = self.uploads.complete_file(admin.username, body["upload"])
            return upload.path, upload.fmt, upload
        if "data_base64" in body:
            try:
                return base64.b64decode(body["data_base64"], validate=True), body.get("format"), None
            except (binascii.Error, TypeError, ValueError):
                raise BadRequest("data_base64 is not valid base64") from None
        if isinstance(body.get("path"), str):
            return self._import_path(body["path"]), body.get("format"), None
        raise BadRequest("give the data as an 'upload', as 'data_base64' (with 'format') or as a 'path' on the "
                         "service's machine")

    def _import_path(self, raw: str) -> Path:
        """A file an admin names on this machine: only inside `import_dirs`, never in the storage folder (polars
        opening the store's own SQLite file inside this process would drop its locks). Links are followed
        first, so none leads around either rule. The messages never echo the path."""
        if not self.import_dirs:
            raise BadRequest("imports from a path on the service's machine are off here (LomasApp.import_dirs is "
                             "empty): upload the file instead, or use lomas-admin dataset import")
        path = Path(raw).expanduser()
        path = (path if path.is_absolute() else self.import_dirs[0] / path).resolve()
        storage = self.storage_dir.resolve()
        if path == storage or path.is_relative_to(storage):
            raise BadRequest("the service's own storage folder cannot be imported from")
        if not any(path.is_relative_to(folder) for folder in self.import_dirs):
            raise BadRequest("that path is outside the service's import folders (LomasApp.import_dirs)")
        return path

    async def import_dataset(self, admin: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        require_admin(admin)
        allowed = {"name", "description", "metadata", "data_base64", "format", "path", "upload"}
        unknown = set(body) - allowed
        if unknown:
            raise BadRequest(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        name = check_dataset_name(body.get("name"))
        if "metadata" not in body:
            raise BadRequest("'metadata' is required: the dataset's public metadata")
        source, fmt, upload = self._data_source(admin, body)
        progress = self.uploads.progress(upload) if upload is not None else None
        try:
            record = await asyncio.to_thread(
                import_dataset,
                self.store,
                self.storage_dir,
                name,
                source,
                body["metadata"],
                body.get("description"),
                fmt,
                admin.username,
                progress,
                self.dataset_url,
            )
        except LomasError as err:
            if progress is not None:
                progress(f"refused: {err.message}")
            raise
        if upload is not None:
            self.uploads.discard(admin.username, upload.upload_id)
        warnings = await self.pricing_pool.run(engine.METADATA_WARNINGS_TASK, record.metadata)
        return record.to_public_json() | {"warnings": warnings}

    async def draft_metadata(self, admin: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        """A proposal for the admin to review; it is returned, never stored."""
        require_admin(admin)
        unknown = set(body) - {"data_base64", "format", "path", "upload"}
        if unknown:
            raise BadRequest(f"unknown field(s) {sorted(unknown)}; give the data as for an import")
        source, fmt, _upload = self._data_source(admin, body)
        return await asyncio.to_thread(propose_metadata, source, fmt)

    def create_upload(self, admin: UserRecord, body: dict[str, Any]) -> dict[str, Any]:
        require_admin(admin)
        upload = self.uploads.create(admin.username, body.get("size"), body.get("format"))
        return upload.to_json() | {"chunk_bytes": CHUNK_BYTES}

    def upload_status(self, admin: UserRecord, upload_id: str) -> dict[str, Any]:
        require_admin(admin)
        return self.uploads.get(admin.username, upload_id).to_json()

    def upload_chunk(self, admin: UserRecord, upload_id: str, offset: int, chunk: bytes) -> dict[str, Any]:
        require_admin(admin)
        return self.uploads.append(admin.username, upload_id, offset, chunk).to_json()

    def discard_upload(self, admin: UserRecord, upload_id: str) -> dict[str, Any]:
        require_admin(admin)
        self.uploads.discard(admin.username, upload_id)
        return {"upload": upload_id, "discarded": True}
