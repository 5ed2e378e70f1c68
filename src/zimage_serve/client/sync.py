"""`Client`: the same calls as `AsyncClient`, for code without an event loop.

    with Client("http://127.0.0.1:8188") as client:
        result = client.generate("zimage-nano", prompt="一个蓝色的正方形", seed=3)

The async client runs on an event loop in a thread of its own (anyio's blocking portal); each call
waits for its answer there. `on_progress` callbacks run on that thread.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anyio.from_thread import BlockingPortal, start_blocking_portal

from zimage_serve.client.aio import DEFAULT_URL, AsyncClient, ImageFile, ProgressCallback, Result
from zimage_serve.templates.document import Template

if TYPE_CHECKING:
    from PIL import Image


class Client:
    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, **options: Any) -> None:
        self._portal_context: AbstractContextManager[BlockingPortal] | None = start_blocking_portal()
        self._portal = self._portal_context.__enter__()
        self._async: AsyncClient = self._portal.call(functools.partial(_make, url, token, options))
        self.url, self.client_id = self._async.url, self._async.client_id

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._portal_context is None:
            return
        try:
            self._portal.call(self._async.aclose)
        finally:
            context, self._portal_context = self._portal_context, None
            context.__exit__(None, None, None)

    def check(self) -> None:
        """Ask the server once, without retrying (AsyncClient.check)."""
        self._portal.call(self._async.check)

    def generate(
        self,
        template: str | Path | Template,
        *,
        params: Mapping[str, Any] | None = None,
        version: int | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        download: bool = True,
        **values: Any,
    ) -> Result:
        call = functools.partial(
            self._async.generate,
            template,
            params=params,
            version=version,
            on_progress=on_progress,
            timeout=timeout,
            download=download,
            **values,
        )
        return self._portal.call(call)

    def template(self, template: str | Path | Template, version: int | None = None) -> Template:
        return self._portal.call(self._async.template, template, version)

    def submit(
        self, graph: Mapping[str, Any], *, extra_data: Mapping[str, Any] | None = None, front: bool = False
    ) -> str:
        return self._portal.call(functools.partial(self._async.submit, graph, extra_data=extra_data, front=front))

    def wait(
        self,
        prompt_id: str,
        *,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        download: bool = True,
    ) -> Result:
        call = functools.partial(
            self._async.wait, prompt_id, on_progress=on_progress, timeout=timeout, download=download
        )
        return self._portal.call(call)

    def download(self, file: ImageFile | Mapping[str, str]) -> bytes:
        return self._portal.call(self._async.download, file)

    def upload(
        self, image: str | Path | bytes | Image.Image, *, name: str | None = None, overwrite: bool = False
    ) -> str:
        return self._portal.call(functools.partial(self._async.upload, image, name=name, overwrite=overwrite))

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        entry: dict[str, Any] | None = self._portal.call(self._async.history, prompt_id)
        return entry

    def cancel(self, prompt_id: str) -> None:
        self._portal.call(self._async.cancel, prompt_id)


async def _make(url: str, token: str | None, options: dict[str, Any]) -> AsyncClient:
    return AsyncClient(url, token, **options)
