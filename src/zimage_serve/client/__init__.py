"""A Python client for zimage-serve and any ComfyUI server; importing it loads neither torch nor PIL.

    from zimage_serve.client import Client

    with Client("http://127.0.0.1:8188") as client:
        result = client.generate("zimage-nano", prompt="a red circle on blue", seed=7)
        result.images[0].save("circle.png")

`AsyncClient` is the same for asyncio code (`async with AsyncClient(...) as client`).
"""

from zimage_serve.client.aio import AsyncClient, ImageFile, Progress, Result
from zimage_serve.client.errors import (
    AuthenticationError,
    Cancelled,
    ClientError,
    ExecutionError,
    NotFound,
    PromptError,
    RateLimited,
    ServerUnavailable,
)
from zimage_serve.client.sync import Client
from zimage_serve.templates.document import Template, TemplateParameterError
from zimage_serve.templates.library import TemplateNotFound

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "Cancelled",
    "Client",
    "ClientError",
    "ExecutionError",
    "ImageFile",
    "NotFound",
    "Progress",
    "PromptError",
    "RateLimited",
    "Result",
    "ServerUnavailable",
    "Template",
    "TemplateNotFound",
    "TemplateParameterError",
]
