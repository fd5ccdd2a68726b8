"""Chunked uploads: refused before storing when too large, in order only, private to the admin who started it."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from lomas_jupyter_server.demo import penguins_csv, penguins_metadata
from lomas_jupyter_server.errors import BadRequest, Conflict, NotFound
from lomas_jupyter_server.service.uploads import MAX_CHUNK_BYTES, UploadArea


def test_an_upload_is_appended_in_order_and_belongs_to_its_admin(tmp_path: Path) -> None:
    area = UploadArea(tmp_path / "uploads", max_bytes=1000)
    upload = area.create("boss", 10, "csv")
    assert upload.path.stat().st_mode & 0o077 == 0
    area.append("boss", upload.upload_id, 0, b"12345")
    with pytest.raises(Conflict, match="continues at byte 5"):
        area.append("boss", upload.upload_id, 0, b"12345")
    with pytest.raises(BadRequest, match="past the declared size"):
        area.append("boss", upload.upload_id, 5, b"123456")
    with pytest.raises(Conflict, match="5 of 10 bytes"):
        area.complete_file("boss", upload.upload_id)
    with pytest.raises(NotFound):
        area.append("other_admin", upload.upload_id, 5, b"67890")
    area.append("boss", upload.upload_id, 5, b"67890")
    assert area.complete_file("boss", upload.upload_id).path.read_bytes() == b"1234567890"
    area.discard("boss", upload.upload_id)
    assert not upload.path.exists()
    with pytest.raises(NotFound):
        area.get("boss", upload.upload_id)


def test_bad_uploads_are_refused_before_anything_is_stored(tmp_path: Path) -> None:
    area = UploadArea(tmp_path / "uploads", max_bytes=1000, max_open=2)
    for size, fmt, words in ((1001, "csv", "at most"), (0, "csv", "size"), (True, "csv", "size"),
                             (10, "xlsx", "csv or parquet"), ("10", "csv", "size")):
        with pytest.raises(BadRequest, match=words):
            area.create("boss", size, fmt)
    assert not list(tmp_path.glob("uploads/*"))
    first = area.create("boss", 5, "csv")
    area.create("boss", 5, "csv")
    with pytest.raises(Conflict, match="unfinished uploads"):
        area.create("boss", 5, "csv")
    area.create("another_admin", 5, "csv")  # the limit is per admin
    with pytest.raises(BadRequest, match="at most"):
        area.append("boss", first.upload_id, 0, b"x" * (MAX_CHUNK_BYTES + 1))
    assert first.received == 0


def test_a_restart_discards_unfinished_uploads(tmp_path: Path) -> None:
    area = UploadArea(tmp_path / "uploads", max_bytes=1000)
    upload = area.create("boss", 5, "csv")
    again = UploadArea(tmp_path / "uploads", max_bytes=1000)
    assert not upload.path.exists()
    with pytest.raises(NotFound, match="upload the file again"):
        again.get("boss", upload.upload_id)


async def _upload(api, data: bytes, fmt: str = "csv", chunk: int = 4096) -> str:
    status, upload = await api("admin/uploads", "POST", {"size": len(data), "format": fmt})
    assert status == 201 and upload["received"] == 0 and upload["chunk_bytes"] >= chunk
    for offset in range(0, len(data), chunk):
        status, state = await api(f"admin/uploads/{upload['upload']}", "PUT", raw=data[offset:offset + chunk],
                                  offset=str(offset))
        assert status == 200 and state["received"] == min(offset + chunk, len(data)), state
    return upload["upload"]


async def test_upload_draft_and_import_over_rest(api, lomas_app) -> None:
    data = penguins_csv().read_bytes()
    upload = await _upload(api, data)
    status, draft = await api("admin/datasets/draft", "POST", {"upload": upload})
    assert status == 200 and draft["rows"] == 344 and set(draft["metadata"]["columns"]) == set(
        penguins_metadata()["columns"])
    status, names = await api("admin/datasets")
    assert [d["name"] for d in names] == ["penguins"]  # a draft stores nothing

    # a mismatch by column name is refused, names the column, stores nothing and keeps the upload for a retry
    wrong = penguins_metadata()
    wrong["columns"]["beak_mm"] = wrong["columns"].pop("bill_length_mm")
    status, error = await api("admin/datasets", "POST", {"name": "birds", "metadata": wrong, "upload": upload})
    assert status == 400 and "beak_mm" in error["message"] and str(lomas_app.storage_dir) not in error["message"]
    status, state = await api(f"admin/uploads/{upload}")
    assert state["stage"].startswith("refused: ") and "beak_mm" in state["stage"]
    assert lomas_app.service.store.get_dataset("birds") is None

    status, imported = await api("admin/datasets", "POST", {"name": "birds", "metadata": draft["metadata"],
                                                            "upload": upload, "description": "reviewed"})
    assert status == 201 and imported["version"] == 1 and imported["description"] == "reviewed"
    status, gone = await api(f"admin/uploads/{upload}")
    assert status == 404  # discarded once imported
    status, described = await api("datasets/birds")
    assert status == 200 and described["metadata"]["max_rows"] == draft["metadata"]["max_rows"]


async def test_uploads_refuse_bad_input_and_analysts(api, lomas_app) -> None:
    status, error = await api("admin/uploads", "POST", {"size": 10, "format": "xlsx"})
    assert status == 400 and "csv or parquet" in error["message"]
    status, error = await api("admin/uploads/nope", "PUT", raw=b"x", offset="0")
    assert status == 404 and "upload the file again" in error["message"]
    upload = await _upload(api, b"a,b\n1,2\n")
    status, error = await api(f"admin/uploads/{upload}", "PUT", raw=b"x", offset="-1")
    assert status == 400 and "offset" in error["message"]
    status, error = await api("admin/datasets/draft", "POST", {"upload": upload, "extra": 1})
    assert status == 400 and "extra" in error["message"]
    status, error = await api("admin/datasets/draft", "POST",
                              {"data_base64": base64.b64encode(b"\x00\x01").decode(), "format": "parquet"})
    assert status == 400 and "could not be read" in error["message"]
    status, half = await api("admin/uploads", "POST", {"size": 100, "format": "csv"})
    status, error = await api("admin/datasets", "POST", {"name": "x", "metadata": penguins_metadata(),
                                                        "upload": half["upload"]})
    assert status == 409 and "0 of 100 bytes" in error["message"]
    status, discarded = await api(f"admin/uploads/{half['upload']}", "DELETE")
    assert status == 200 and discarded["discarded"] is True

    lomas_app.service.store.set_role("owner", "analyst", "test")
    for path, method, body in (("admin/uploads", "POST", {"size": 5, "format": "csv"}),
                               (f"admin/uploads/{upload}", "GET", None),
                               ("admin/datasets/draft", "POST", {"upload": upload})):
        status, error = await api(path, method, body)
        assert status == 403, (path, error)
