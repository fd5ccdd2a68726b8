"""The page a browser sees at the service's URL under JupyterHub (the Hub's Services menu links here)."""

from __future__ import annotations

import html
from typing import Any

import tornado.web
from jupyter_server.base.handlers import JupyterHandler

from ..errors import LomasError


class LandingPageHandler(JupyterHandler):
    """What a browser sees at the service's URL (the Hub's Services menu links here). A page, not an API: an
    unauthenticated visit is redirected through Hub OAuth, which an API handler would refuse with 403."""

    auth_resource = "lomas"

    @tornado.web.authenticated
    def get(self) -> None:
        user: Any = self.current_user  # a LomasHubUser
        service = self.settings["lomas_service"]
        try:
            record = user.lomas_record
        except LomasError as refusal:
            self.set_status(refusal.status)
            self.finish(f"<!doctype html><title>lomas DP service</title><p>{html.escape(refusal.message)}</p>")
            return
        rows = "".join(
            f"<tr><td>{html.escape(b['dataset'])}</td><td>{b['epsilon_remaining']:.4g}</td>"
            f"<td>{b['epsilon_spent']:.4g}</td><td>{b['releases']}</td></tr>"
            for b in service.queries.budgets(record)
        )
        table = (f"<table><tr><th>dataset</th><th>ε left</th><th>ε spent</th><th>releases</th></tr>{rows}</table>"
                 if rows else "<p>You have no budget yet; your instructor grants it through your course.</p>")
        role = "instructor (admin)" if record.role == "admin" else "student (analyst)"
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(
            "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>lomas DP service</title>"
            "<style>body{font:15px/1.5 system-ui,sans-serif;max-width:44em;margin:2em auto;color:#1a1a1a}"
            "td,th{padding:.2em .8em;text-align:left}code{background:#eee;padding:0 .2em}</style></head><body>"
            f"<h1>lomas DP service</h1><p>Signed in as <b>{html.escape(record.username)}</b>, {role}.</p>"
            f"{table}<p>Ask questions from a notebook: <code>%load_ext lomas_jupyter</code>, then a "
            "<code>%%dpquery</code> cell.</p></body></html>"
        )
