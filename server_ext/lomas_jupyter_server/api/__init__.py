"""The REST room: one module per resource (queries, datasets, budgets and archive, receipts, budget requests,
users and tokens, grants, courses), the base handler, the identity of token users, the forwarder to a Hub's
service, and the OpenAPI document (`openapi.yaml`). Handlers stay thin: parse, call the domain, write JSON.

May import: `service`, `store`, `errors` (never `hub` or `app`). Routes are relative to API_PREFIX.
"""

from __future__ import annotations

from .base import LomasHandler
from .budgets import (
    AdminArchiveHandler,
    AdminAuditHandler,
    AdminLedgerHandler,
    ArchiveHandler,
    BudgetHandler,
    BudgetsHandler,
)
from .courses import (
    AdminCourseDatasetsHandler,
    AdminCourseHandler,
    AdminCourseMemberHandler,
    AdminCourseMembersHandler,
    AdminCoursesHandler,
    AdminCourseSpendingHandler,
)
from .datasets import (
    AdminDatasetDraftHandler,
    AdminDatasetsHandler,
    AdminUploadHandler,
    AdminUploadsHandler,
    DatasetHandler,
    DatasetsHandler,
)
from .grants import AdminGrantsHandler
from .queries import DummyQueryHandler, DummyRowsHandler, PreviewHandler, QueryHandler
from .receipts import ReceiptKeyHandler
from .requests import AdminBudgetRequestHandler, AdminBudgetRequestsHandler, BudgetRequestsHandler
from .users import AdminTokensHandler, AdminUserHandler, AdminUsersHandler, WhoAmIHandler

NAME = r"(?P<{}>[^/]+)"
ROUTES: list[tuple[str, type[LomasHandler]]] = [
    ("whoami", WhoAmIHandler),
    ("datasets", DatasetsHandler),
    ("datasets/" + NAME.format("name"), DatasetHandler),
    ("datasets/" + NAME.format("name") + "/dummy", DummyRowsHandler),
    ("query", QueryHandler),
    ("dummy", DummyQueryHandler),
    ("preview", PreviewHandler),
    ("budget", BudgetsHandler),
    ("budget/" + NAME.format("dataset"), BudgetHandler),
    ("archive", ArchiveHandler),
    ("receipts/key", ReceiptKeyHandler),
    ("requests", BudgetRequestsHandler),
    ("admin/users", AdminUsersHandler),
    ("admin/users/" + NAME.format("username"), AdminUserHandler),
    ("admin/users/" + NAME.format("username") + "/tokens", AdminTokensHandler),
    ("admin/datasets", AdminDatasetsHandler),
    ("admin/datasets/draft", AdminDatasetDraftHandler),
    ("admin/uploads", AdminUploadsHandler),
    ("admin/uploads/" + NAME.format("upload"), AdminUploadHandler),
    ("admin/grants", AdminGrantsHandler),
    ("admin/archive", AdminArchiveHandler),
    ("admin/ledger", AdminLedgerHandler),
    ("admin/audit", AdminAuditHandler),
    ("admin/requests", AdminBudgetRequestsHandler),
    ("admin/requests/" + NAME.format("request_id"), AdminBudgetRequestHandler),
    ("admin/courses", AdminCoursesHandler),
    ("admin/courses/" + NAME.format("course"), AdminCourseHandler),
    ("admin/courses/" + NAME.format("course") + "/datasets", AdminCourseDatasetsHandler),
    ("admin/courses/" + NAME.format("course") + "/members", AdminCourseMembersHandler),
    ("admin/courses/" + NAME.format("course") + "/members/" + NAME.format("username"), AdminCourseMemberHandler),
    ("admin/courses/" + NAME.format("course") + "/spending/" + NAME.format("dataset"), AdminCourseSpendingHandler),
]
API_PREFIX = "lomas/api/"
