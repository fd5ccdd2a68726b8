"""The DP API of a JupyterHub service, seen from a user's own single-user server.

Under JupyterHub the service runs elsewhere (another process and OS user) and the embedded one does not start.
The sidebar still calls `lomas/api/` on its own server; this handler passes each call on to the Hub's service
with the server's own Hub token, so the browser needs no credential for the service, and the call is guarded by
this server's login and XSRF check. The token says who the user is, so nobody gains anything they could not do
from their own kernel.
"""

from __future__ import annotations

import os

import tornado.web
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from jupyter_server.utils import url_path_join
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

FORWARDED_HEADERS = ("Content-Type",)
TIMEOUT_SECONDS = 900.0  # a query may wait for a worker; the service bounds its own work


class ForwardToHubServiceHandler(ExtensionHandlerMixin, APIHandler):
    auth_resource = "lomas"

    def _refuse(self, status: int, message: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish({"error": "service_unavailable", "message": message})

    async def _forward(self, path: str) -> None:
        base, token = os.environ.get("LOMAS_URL", ""), os.environ.get("JUPYTERHUB_API_TOKEN", "")
        if not base or not token:
            self._refuse(503, "this JupyterHub server is not configured for the DP service (LOMAS_URL is not set); "
                         "ask the Hub admin")
            return
        url = url_path_join(base, "lomas/api", path)
        if self.request.query:
            url += "?" + self.request.query
        headers = {"Authorization": f"token {token}"}
        headers.update({k: self.request.headers[k] for k in FORWARDED_HEADERS if k in self.request.headers})
        method = self.request.method or "GET"
        request = HTTPRequest(url, method=method, headers=headers,
                              body=self.request.body if method in ("POST", "PUT", "PATCH") else None,
                              request_timeout=TIMEOUT_SECONDS, allow_nonstandard_methods=True, follow_redirects=False)
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        if response.code == 599:
            self._refuse(502, "the DP service cannot be reached; ask the Hub admin")
            return
        self.set_status(response.code)
        self.set_header("Content-Type", response.headers.get("Content-Type", "application/json"))
        self.finish(response.body or b"")

    @tornado.web.authenticated
    @authorized
    async def get(self, path: str) -> None:
        await self._forward(path)

    @tornado.web.authenticated
    @authorized
    async def post(self, path: str) -> None:
        await self._forward(path)

    @tornado.web.authenticated
    @authorized
    async def put(self, path: str) -> None:
        await self._forward(path)

    @tornado.web.authenticated
    @authorized
    async def patch(self, path: str) -> None:
        await self._forward(path)

    @tornado.web.authenticated
    @authorized
    async def delete(self, path: str) -> None:
        await self._forward(path)
