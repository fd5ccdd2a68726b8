"""Domain errors. Each carries the HTTP status a handler should answer with.

Messages are shown to users verbatim, so they must never contain server paths, hostnames or data values.
"""

from __future__ import annotations


class LomasError(Exception):
    """Base class: a user-facing failure with a status code and a readable message."""

    status = 400
    code = "bad_request"
    data_accessed = False  # set on failures that happened after a worker started reading private data

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_json(self) -> dict[str, object]:
        return {"error": self.code, "message": self.message, **self.details}


class BadRequest(LomasError):
    status = 400
    code = "bad_request"


class MetadataError(LomasError):
    status = 400
    code = "invalid_metadata"


class QueryRejected(LomasError):
    status = 400
    code = "query_rejected"


class NotFound(LomasError):
    status = 404
    code = "not_found"


class Forbidden(LomasError):
    status = 403
    code = "forbidden"


class Conflict(LomasError):
    status = 409
    code = "conflict"


class InsufficientBudget(LomasError):
    status = 403
    code = "insufficient_budget"


class EngineFailure(LomasError):
    """The worker crashed, ran out of time or memory, or could not start: nothing was released."""

    status = 503
    code = "engine_failure"


class DatasetUnavailable(LomasError):
    """The dataset's data file is not where the store says (moved, deleted, or a store made before paths were
    stored absolute): a fault of the service, found before any row is read, so nothing is charged."""

    status = 503
    code = "dataset_unavailable"


class ChargedFailure(LomasError):
    """A query failed after the engine had started reading the data: nothing was released, but the failure
    itself can depend on the data, so its reservation was charged."""

    status = 503
    code = "failed_after_data_access"
