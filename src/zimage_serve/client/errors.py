"""What can go wrong talking to a server, each with the facts a caller needs to act on it."""

from __future__ import annotations

from typing import Any

from zimage_serve.errors import ZImageError


class ClientError(ZImageError):
    """Base class of the client's errors."""


class ServerUnavailable(ClientError):
    """The server could not be reached, or kept answering 503, after every retry."""


class AuthenticationError(ClientError):
    """401 or 403: the token is missing, wrong or revoked, or the request is not allowed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class NotFound(ClientError):
    pass


class RateLimited(ClientError):
    """429: over a quota or the queue's size; `retry_after` is the server's wait in seconds."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PromptError(ClientError):
    """The server refused a graph (400). `error` and `node_errors` are ComfyUI's, as it sent them."""

    def __init__(self, error: dict[str, Any], node_errors: dict[str, Any]) -> None:
        self.error = error
        self.node_errors = node_errors
        lines = [str(error.get("message") or "the prompt was refused")]
        if error.get("details"):
            lines[0] += f": {error['details']}"
        for node_id, entry in node_errors.items():
            for reason in entry.get("errors", []):
                kind = entry.get("class_type", "?")
                lines.append(f"  node {node_id} ({kind}): {reason.get('message')}: {reason.get('details')}")
        super().__init__("\n".join(lines))


class ExecutionError(ClientError):
    """A queued prompt failed while running: ComfyUI's `execution_error` fields."""

    def __init__(self, prompt_id: str, details: dict[str, Any]) -> None:
        self.prompt_id = prompt_id
        self.details = details
        self.node_id = details.get("node_id")
        self.node_type = details.get("node_type")
        message = details.get("exception_message") or "the prompt failed"
        where = f"node {self.node_id} ({self.node_type})" if self.node_id else f"prompt {prompt_id}"
        super().__init__(f"{where} failed: {message}")


class Cancelled(ClientError):
    """The prompt was interrupted, or deleted from the queue before it ran."""

    def __init__(self, prompt_id: str, how: str) -> None:
        super().__init__(f"prompt {prompt_id} was {how}")
        self.prompt_id = prompt_id


def refusal(status: int, body: Any, text: str) -> ClientError:
    """The error for a 4xx answer, from ComfyUI's shapes: {"error": {...}, "node_errors"} or {"error": "..."}."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message = str(error.get("details") or error.get("message") or text)
    elif isinstance(error, str):
        message = error
    else:
        message = text[:300] or f"HTTP {status}"
    if status in (401, 403):
        return AuthenticationError(status, message)
    if status == 404:
        return NotFound(message)
    if status == 400 and isinstance(error, dict):
        return PromptError(error, body.get("node_errors") or {})
    return ClientError(f"HTTP {status}: {message}")
