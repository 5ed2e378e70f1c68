"""Where a batch's jobs run: a server (ours or any ComfyUI, through the client) or the engine here.

A backend resolves the template, turns an image parameter's value into a name the graph can use, runs
one graph and answers its images' bytes, and stops what is in flight when the batch is interrupted.
`RowFailed` is a row's own failure (reported in the manifest); `Interrupted` is the batch stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from zimage_serve.errors import ZImageError
from zimage_serve.templates.document import Template


class RowFailed(ZImageError):
    pass


class Interrupted(ZImageError):
    pass


@dataclass(frozen=True)
class Image:
    data: bytes
    suffix: str  # ".png"


class Backend(Protocol):
    where: str

    async def check(self) -> None:
        """Whether the batch can start here at all, before any row: a ZImageError saying what to fix."""
        ...

    async def template(self, name: str, version: int | None) -> Template: ...

    async def image_value(self, value: str, base: Path) -> str: ...

    async def run(self, graph: dict[str, Any], labels: dict[str, Any] | None = None) -> list[Image]:
        """The row's images; `labels` (its number, name and fields) travel with a server's job, to its webhooks."""
        ...

    async def stop(self) -> None: ...

    async def close(self) -> None: ...


class RemoteBackend:
    def __init__(
        self, url: str, token: str | None, token_env: str = "ZIMAGE_TOKEN", webhook: str | None = None
    ) -> None:
        from zimage_serve.client import AsyncClient

        self.client = AsyncClient(url, token)
        self.extra: dict[str, Any] = {"source": "zimage batch"}
        if webhook is not None:  # each job's events go to this registered endpoint
            self.extra["webhook"] = webhook
        self.where = url
        self.token, self.token_env = token, token_env
        self._running: set[str] = set()
        self._stopping = False

    async def check(self) -> None:
        """One request, not retried: a wrong URL or a missing token stops the batch at once, with what to do.

        The client retries connection errors for half a minute (a server restarting mid-batch is waited
        for); before the first row, nothing answering means a wrong --server or a server not started."""
        from zimage_serve.client import AuthenticationError, ServerUnavailable

        try:
            await self.client.check()
        except ServerUnavailable as exc:
            raise ZImageError(f"{exc}: check --server") from None
        except AuthenticationError as exc:
            how = f"--token or ${self.token_env}"
            if exc.status == 403:
                advice = f"if another token may, pass it with {how}"
            elif self.token:
                advice = f"the token given was refused; pass a valid one with {how}"
            else:
                advice = f"it needs an API token: pass one with {how}"
            raise ZImageError(f"{self.where} refused the request ({exc}); {advice}") from None

    async def template(self, name: str, version: int | None) -> Template:
        path = Path(name)
        return await self.client.template(path if name.endswith(".json") and path.is_file() else name, version)

    async def image_value(self, value: str, base: Path) -> str:
        local = base / value
        return await self.client.upload(local) if local.is_file() else value

    async def run(self, graph: dict[str, Any], labels: dict[str, Any] | None = None) -> list[Image]:
        from zimage_serve.client import Cancelled, ClientError

        if self._stopping:
            raise Interrupted("stopping")
        try:
            extra = self.extra if labels is None else {**self.extra, "metadata": labels}
            prompt_id = await self.client.submit(graph, extra_data=extra)
        except ClientError as exc:
            raise RowFailed(str(exc)) from None
        self._running.add(prompt_id)
        try:
            result = await self.client.wait(prompt_id)
        except Cancelled as exc:
            if self._stopping:
                raise Interrupted(str(exc)) from None
            raise RowFailed(str(exc)) from None
        except ClientError as exc:
            raise RowFailed(str(exc)) from None
        finally:
            self._running.discard(prompt_id)
        pairs = zip(result.files, result.data, strict=True)
        return [Image(blob, Path(file.filename).suffix or ".png") for file, blob in pairs]

    async def stop(self) -> None:
        self._stopping = True
        for prompt_id in list(self._running):
            with contextlib.suppress(Exception):  # the server is gone or refuses: nothing more to stop there
                await self.client.cancel(prompt_id)

    async def close(self) -> None:
        await self.client.aclose()


class LocalBackend:
    """The engine in this process, as `zimage run` uses it; one job at a time."""

    def __init__(
        self,
        data_dir: Path,
        models: list[Path],
        work: Path,
        input_dir: Path,
        device: str,
        dtype: str,
    ) -> None:
        from zimage_serve.engine.placement import Placement
        from zimage_serve.workflow.execute import Executor
        from zimage_serve.workflow.folders import Folders, builtin_models
        from zimage_serve.workflow.nodes import NODES
        from zimage_serve.workflow.validate import Validator

        self.where = "this machine"
        self.data_dir = data_dir
        self.work = work
        self.folders = Folders(models, input_dir, work, work / "temp", builtin_models())
        self.validator = Validator(NODES, self.folders)
        self.executor = Executor(NODES, self.folders, Placement.choose(device, dtype))
        self._lock = asyncio.Lock()
        self._stopping = False

    async def check(self) -> None:
        return None  # the engine here: what could be wrong shows as each row runs

    async def template(self, name: str, version: int | None) -> Template:
        from zimage_serve.templates import TemplateLibrary
        from zimage_serve.templates.source import read_template_file
        from zimage_serve.workflow.nodes import NODES
        from zimage_serve.workflow.ui_format import to_api

        path = Path(name)
        if name.endswith(".json") and path.is_file():
            return read_template_file(path, lambda data: to_api(data, NODES))
        return TemplateLibrary(self.data_dir / "templates").get(name, version)

    async def image_value(self, value: str, base: Path) -> str:
        return value  # LoadImage reads the input folder: the batch file's own folder unless told otherwise

    async def run(self, graph: dict[str, Any], labels: dict[str, Any] | None = None) -> list[Image]:
        async with self._lock:
            if self._stopping:
                raise Interrupted("stopping")
            return await asyncio.to_thread(self._run, graph)

    def _run(self, graph: dict[str, Any]) -> list[Image]:
        checked = self.validator.validate(graph)
        if not checked.ok:
            raise RowFailed(checked.describe())
        prompt_id = uuid.uuid4().hex
        result = self.executor.run(prompt_id, checked.prompt, checked.outputs)
        try:
            if result.status == "interrupted":
                raise Interrupted("interrupted")
            if result.error is not None:
                error = result.error
                raise RowFailed(f"node {error['node_id']} ({error['node_type']}) failed: {error['exception_message']}")
            images = []
            for ui in result.outputs.values():
                for image in ui.get("images", []):
                    folder = self.folders.output if image["type"] == "output" else self.folders.temp
                    path = folder / image["subfolder"] / image["filename"]
                    images.append(Image(path.read_bytes(), path.suffix or ".png"))
            return images
        finally:
            shutil.rmtree(self.work, ignore_errors=True)  # what the run wrote was read back or is not wanted

    async def stop(self) -> None:
        self._stopping = True
        self.executor.interrupt()

    async def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
