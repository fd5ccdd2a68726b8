"""Uploads in chunks: how data reaches a service whose request bodies are small.

A standalone or Hub service accepts bodies of a few MB (an unauthenticated client must not make it buffer more),
so an admin's CSV or Parquet arrives as numbered chunks appended to a file in the service's own folder. Each
upload belongs to the admin who started it, declares its size up front (refused before any byte is stored when
it is too large or the disk too full), and carries the stage of the import that reads it, which is what a
progress bar polls.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadRequest, Conflict, NotFound

CHUNK_BYTES = 2 * 1024 * 1024
MAX_CHUNK_BYTES = 3 * 1024 * 1024  # under the standalone service's 4 MB body limit
FORMATS = ("csv", "parquet")
IMPORT_STAGES = ("reading the data", "checking the data against the metadata", "writing parquet")
STALE_SECONDS = 24 * 3600


@dataclass
class Upload:
    upload_id: str
    owner: str
    size: int
    fmt: str
    path: Path
    received: int = 0
    stage: str = "uploading"
    step: int = 0
    touched: float = field(default_factory=time.monotonic)

    @property
    def complete(self) -> bool:
        return self.received == self.size

    def to_json(self) -> dict[str, Any]:
        return {
            "upload": self.upload_id,
            "format": self.fmt,
            "size": self.size,
            "received": self.received,
            "stage": self.stage,
            "step": self.step,
            "steps": len(IMPORT_STAGES),
        }


class UploadArea:
    """The service's uploads folder; state is in memory, so a restart discards unfinished uploads."""

    def __init__(self, root: str | Path, max_bytes: int, max_open: int = 8) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_open = max_open
        self._uploads: dict[str, Upload] = {}
        self._lock = threading.Lock()
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)

    def create(self, owner: str, size: Any, fmt: Any) -> Upload:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise BadRequest("'size' must be the file's size in bytes (a positive whole number)")
        if fmt not in FORMATS:
            raise BadRequest("'format' must be csv or parquet")
        if size > self.max_bytes:
            raise BadRequest(f"the file is {size / 1e6:.1f} MB; this service accepts uploads of at most "
                             f"{self.max_bytes / 1e6:.0f} MB")
        self._drop_stale()
        with self._lock:
            if sum(u.owner == owner for u in self._uploads.values()) >= self.max_open:
                raise Conflict(f"you have {self.max_open} unfinished uploads; finish or discard one first")
            self.root.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(self.root).free < 2 * size:
                raise BadRequest("the service does not have enough free disk space for this file")
            upload_id = uuid.uuid4().hex
            upload = Upload(upload_id, owner, size, fmt, self.root / f"{upload_id}.part")
            upload.path.touch(mode=0o600)
            self._uploads[upload_id] = upload
        return upload

    def get(self, owner: str, upload_id: str) -> Upload:
        upload = self._uploads.get(upload_id)
        if upload is None or upload.owner != owner:
            raise NotFound("no such upload (it may have expired or the service restarted); upload the file again")
        return upload

    def append(self, owner: str, upload_id: str, offset: int, chunk: bytes) -> Upload:
        upload = self.get(owner, upload_id)
        if len(chunk) > MAX_CHUNK_BYTES:
            raise BadRequest(f"a chunk may be at most {MAX_CHUNK_BYTES} bytes")
        with self._lock:
            if offset != upload.received:
                raise Conflict(f"this upload continues at byte {upload.received}, not {offset}")
            if upload.received + len(chunk) > upload.size:
                raise BadRequest(f"the chunk goes past the declared size ({upload.size} bytes)")
            with open(upload.path, "ab") as out:
                out.write(chunk)
            upload.received += len(chunk)
            upload.touched = time.monotonic()
        return upload

    def complete_file(self, owner: str, upload_id: str) -> Upload:
        upload = self.get(owner, upload_id)
        if not upload.complete:
            raise Conflict(f"the upload is incomplete: {upload.received} of {upload.size} bytes received")
        upload.touched = time.monotonic()
        return upload

    def progress(self, upload: Upload) -> Any:
        """A progress callback for `import_dataset` that records its stage on the upload."""

        def say(message: str) -> None:
            upload.stage = message
            if message in IMPORT_STAGES:
                upload.step = IMPORT_STAGES.index(message) + 1
            upload.touched = time.monotonic()

        return say

    def discard(self, owner: str, upload_id: str) -> None:
        upload = self.get(owner, upload_id)
        with self._lock:
            self._uploads.pop(upload_id, None)
        upload.path.unlink(missing_ok=True)

    def _drop_stale(self) -> None:
        cutoff = time.monotonic() - STALE_SECONDS
        for upload in [u for u in self._uploads.values() if u.touched < cutoff]:
            self.discard(upload.owner, upload.upload_id)
