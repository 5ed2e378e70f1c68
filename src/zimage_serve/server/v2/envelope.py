"""v2's error envelope, `{"error": {"code", "message", "details"}}`: every error under /api/v2 has it, the
gate's refusals and the server's own failures included, so clients branch on `error.code` alone."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

PREFIX = "/api/v2/"
# Comfy API v2's own resources; ComfyUI's frontend has routes of its own under /api/v2 (`/api/v2/userdata`),
# which keep ComfyUI's shapes.
RESOURCES = ("jobs", "assets", "health")
# The gate's reasons, as v2 names them (its own codes for a refusal it has no name for).
CODES = {"address_not_allowed": "forbidden", "cross_site_request": "forbidden"}


class V2Error(Exception):
    """Raised by a v2 route's helpers; answered with the envelope (`app.py` registers the handler)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.details, self.headers)


def is_v2(path: str) -> bool:
    if not path.startswith(PREFIX):
        return False
    resource = path[len(PREFIX) :].split("/", 1)[0]
    return resource in RESOURCES


def envelope(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": CODES.get(code, code), "message": message, "details": details}}


def envelope_bytes(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    return json.dumps(envelope(code, message, details)).encode()


def error_response(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(envelope(code, message, details), status_code=status, headers=headers)
