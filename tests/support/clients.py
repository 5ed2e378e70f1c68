"""Third-party clients reaching an in-process `AppServer`: openai's (over httpx) and schemathesis' (over
requests), each given a transport that hands its requests to the server's TestClient instead of a socket.

What the client sends is what the application gets (method, URL, headers, body), and what it answers is
what the client reads; only the socket is missing."""

from __future__ import annotations

import io

import httpx
import requests
import requests.adapters
import urllib3

from tests.support.app import AppServer


class _ToApp(httpx.BaseTransport):
    def __init__(self, server: AppServer) -> None:
        self.server = server

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        answer = self.server.client.request(
            request.method, str(request.url), content=request.read(), headers=list(request.headers.multi_items())
        )
        return httpx.Response(answer.status_code, headers=list(answer.headers.multi_items()), content=answer.content)


def httpx_client(server: AppServer, **options: object) -> httpx.Client:
    """An httpx.Client (openai's `http_client=`) whose requests reach `server`'s application."""
    return httpx.Client(transport=_ToApp(server), **options)  # type: ignore[arg-type]


class _AppAdapter(requests.adapters.HTTPAdapter):
    def __init__(self, server: AppServer) -> None:
        super().__init__()
        self.server = server

    def send(self, request: requests.PreparedRequest, *args: object, **kwargs: object) -> requests.Response:
        body = request.body.encode() if isinstance(request.body, str) else request.body
        answer = self.server.client.request(
            str(request.method), str(request.url), content=body, headers=dict(request.headers)
        )
        raw = urllib3.HTTPResponse(
            body=io.BytesIO(answer.content),
            headers=list(answer.headers.multi_items()),
            status=answer.status_code,
            reason=answer.reason_phrase,
            preload_content=False,
        )
        return self.build_response(request, raw)


def requests_session(server: AppServer) -> requests.Session:
    """A requests.Session (schemathesis' `session=`) whose requests reach `server`'s application."""
    session = requests.Session()
    adapter = _AppAdapter(server)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
