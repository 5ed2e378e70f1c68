"""`AsyncClient`: generate images through zimage-serve or any ComfyUI server, from asyncio code.

    async with AsyncClient("http://127.0.0.1:8188", token="zis_...") as client:
        result = await client.generate("zimage-nano", prompt="a red circle on blue", seed=7)
        result.images[0].save("circle.png")

Only ComfyUI's own routes are needed (/prompt, /ws, /history, /queue, /view, /upload/image); templates
are rendered here, fetched from our server's /api/zimage/templates when it has them, else taken from the
built-ins shipped with this package, so a plain ComfyUI server works too.

Progress arrives over one WebSocket per client; when it cannot connect, or drops, the client polls
/history instead. Requests are retried with exponential backoff on connection errors and 503s, and on
429s whose Retry-After is short; a prompt is sent with an id chosen here, so a retried POST /prompt
never queues it twice on a server that knows the id.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from zimage_serve.client.errors import (
    Cancelled,
    ClientError,
    ExecutionError,
    RateLimited,
    ServerUnavailable,
    refusal,
)
from zimage_serve.templates.builtin import builtin
from zimage_serve.templates.document import Template
from zimage_serve.templates.library import TemplateNotFound
from zimage_serve.templates.source import read_template_file

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_URL = "http://127.0.0.1:8188"
MAX_RETRY_AFTER = 60.0  # a 429 that asks for a longer wait (a daily quota) is raised, not slept through
BUFFERED_PROMPTS = 256  # events of prompts nobody waits for yet (a fast job can finish before `wait`)
EXPECTED_PROMPTS = 4096  # prompts queued here while the socket was open: their events all come to it
QUIET_CHECK = 5.0  # seconds without an event after which the history and the queue are asked
RECONNECT_AFTER = 30.0  # seconds of polling after the socket failed before it is tried again
END_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


@dataclass(frozen=True)
class ImageFile:
    """An output file as the history names it; `params()` are /view's query."""

    filename: str
    subfolder: str
    type: str
    node_id: str = ""

    def params(self) -> dict[str, str]:
        return {"filename": self.filename, "subfolder": self.subfolder, "type": self.type}


@dataclass(frozen=True)
class Progress:
    """A sampler's step: `value` of `max` in `node` of prompt `prompt_id` (ComfyUI's `progress` event)."""

    prompt_id: str
    node: str | None
    value: int
    max: int


ProgressCallback = Callable[[Progress], Any]


@dataclass
class Result:
    prompt_id: str
    outputs: dict[str, Any]
    files: list[ImageFile]
    data: list[bytes] = field(default_factory=list)  # each file's bytes, in the order of `files`
    template: Template | None = None

    @property
    def images(self) -> list[Image.Image]:
        """The images, decoded with Pillow (imported only here)."""
        from PIL import Image

        decoded: list[Image.Image] = []
        for blob in self.data:
            image = Image.open(io.BytesIO(blob))
            image.load()
            decoded.append(image)
        return decoded


class AsyncClient:
    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.5,
        websocket: bool = True,
        poll_interval: float = 0.25,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.retries = retries
        self.backoff = backoff
        self.poll_interval = poll_interval
        self.client_id = uuid.uuid4().hex
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self._events = _Events(_websocket_url(self.url, self.client_id), headers) if websocket else None
        self._templates: dict[tuple[str, int | None], Template] = {}

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._events is not None:
            await self._events.close()
        await self._http.aclose()

    # -- the one-call way ------------------------------------------------------------------------------
    async def generate(
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
        """Render `template` with the values (keywords, or `params` for any name), queue it, wait, download.

        An image parameter takes a server-side name (text), or a local file (a Path), bytes or a PIL
        image, which is uploaded first. Wrong values raise `TemplateParameterError` before anything is sent.
        """
        resolved = await self.template(template, version)
        chosen: dict[str, Any] = {}
        for name, value in {**(params or {}), **values}.items():
            parameter = resolved.parameters.get(name)
            if parameter is not None and parameter.type == "image" and value is not None and not isinstance(value, str):
                value = await self.upload(value)
            chosen[name] = value
        graph = resolved.render(chosen)
        extra = {"template": {"name": resolved.name, "version": resolved.version}}
        prompt_id = await self.submit(graph, extra_data=extra)
        result = await self.wait(prompt_id, on_progress=on_progress, timeout=timeout, download=download)
        result.template = resolved
        return result

    async def template(self, template: str | Path | Template, version: int | None = None) -> Template:
        """A template by name (the server's, else a built-in), from a local file, or as given."""
        if isinstance(template, Template):
            return template
        if isinstance(template, Path):
            return read_template_file(template)
        key = (template, version)
        if key not in self._templates:
            self._templates[key] = await self._fetch_template(template, version)
        return self._templates[key]

    async def _fetch_template(self, name: str, version: int | None) -> Template:
        query = {"version": str(version)} if version is not None else None
        response = await self._request("GET", f"/api/zimage/templates/{quote(name, safe='')}", params=query)
        if response.status_code == 200:
            return Template.from_json(response.json())
        if response.status_code != 404:
            raise refusal(response.status_code, _json(response), response.text)
        found = builtin(name)  # a plain ComfyUI has no template routes: the built-ins render here
        if found is None or version not in (None, 1):
            raise TemplateNotFound(str(_json(response).get("error") or f"template {name!r} does not exist"))
        return found

    async def check(self) -> None:
        """Ask the server once, without retrying, whether it answers this client: `ServerUnavailable` (one
        line naming the URL) when nothing answers there, `AuthenticationError` when it refuses the token.

        For tools that should stop at once on a wrong URL or token (`zimage batch --server`); the other
        calls keep retrying connection errors, for a server that restarts, or comes up, while they wait."""
        try:
            response = await self._http.get("/queue")
        except httpx.TransportError as exc:
            raise ServerUnavailable(f"cannot reach {self.url}: {_transport_reason(exc)}") from None
        if response.status_code in (401, 403):
            raise refusal(response.status_code, _json(response), response.text)

    # -- the parts -------------------------------------------------------------------------------------
    async def submit(
        self, graph: Mapping[str, Any], *, extra_data: Mapping[str, Any] | None = None, front: bool = False
    ) -> str:
        """Queue an API-format graph; its prompt id. A refused graph raises `PromptError` with `node_errors`.

        The event socket is opened first, so that `wait` hands on every progress event of the prompt, even
        one that has ended by the time `wait` is called."""
        prompt_id = str(uuid.uuid4())
        body = {
            "prompt": dict(graph),
            "client_id": self.client_id,
            "prompt_id": prompt_id,
            "extra_data": dict(extra_data or {}),
            "front": front,
        }
        events = self._events
        if events is not None and await events.connect():  # listening before it is queued
            events.expect(prompt_id)
        try:
            response, attempts = await self._request_counted("POST", "/prompt", json=body)
            if response.status_code == 409 and attempts > 1:
                return prompt_id  # an earlier attempt got through before its answer was lost
            if response.status_code != 200:
                raise refusal(response.status_code, _json(response), response.text)
            answer = _json(response)
            if answer.get("error"):
                raise refusal(400, answer, response.text)
        except BaseException:
            if events is not None:
                events.forget(prompt_id)
            raise
        queued = str(answer.get("prompt_id") or prompt_id)
        if queued != prompt_id and events is not None:  # a server that chose its own id
            events.forget(prompt_id)
        return queued

    async def wait(
        self,
        prompt_id: str,
        *,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        download: bool = True,
    ) -> Result:
        """Wait for a queued prompt to end: its result, or `ExecutionError` / `Cancelled`."""
        async with asyncio.timeout(timeout):
            entry = await self._wait_for_entry(prompt_id, on_progress)
        return await self._result(prompt_id, entry, download)

    async def download(self, file: ImageFile | Mapping[str, str]) -> bytes:
        params = file.params() if isinstance(file, ImageFile) else dict(file)
        response = await self._request("GET", "/view", params=params)
        if response.status_code != 200:
            raise refusal(response.status_code, _json(response), response.text)
        return response.content

    async def upload(
        self, image: str | Path | bytes | Image.Image, *, name: str | None = None, overwrite: bool = False
    ) -> str:
        """Upload an image to the input folder; the name LoadImage takes ("subfolder/name" when in one)."""
        data, name = _image_bytes(image, name)
        files = {"image": (name, data, "application/octet-stream")}
        form = {"overwrite": "true" if overwrite else "false", "type": "input"}
        response = await self._request("POST", "/upload/image", files=files, data=form)
        if response.status_code != 200:
            raise refusal(response.status_code, _json(response), response.text)
        answer = _json(response)
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else str(answer["name"])

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        response = await self._request("GET", f"/history/{quote(prompt_id, safe='')}")
        if response.status_code != 200:
            raise refusal(response.status_code, _json(response), response.text)
        entry = _json(response).get(prompt_id)
        return entry if isinstance(entry, dict) else None

    async def cancel(self, prompt_id: str) -> None:
        """Take a prompt out of the queue, or interrupt it if it runs (only that prompt)."""
        for path, body in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            response = await self._request("POST", path, json=body)
            if response.status_code >= 400:
                raise refusal(response.status_code, _json(response), response.text)

    async def queued(self) -> set[str]:
        """The ids of the prompts waiting or running."""
        response = await self._request("GET", "/queue")
        if response.status_code != 200:
            raise refusal(response.status_code, _json(response), response.text)
        queue = _json(response)
        return {str(item[1]) for key in ("queue_running", "queue_pending") for item in queue.get(key, [])}

    # -- inside ----------------------------------------------------------------------------------------
    async def _wait_for_entry(self, prompt_id: str, on_progress: ProgressCallback | None) -> dict[str, Any]:
        events, heard_from_start = None, False
        if self._events is not None and await self._events.connect():
            heard_from_start = on_progress is not None and self._events.hears_all_of(prompt_id)
            events = self._events.watch(prompt_id)
        watched = events  # `events` becomes None if the socket closes meanwhile
        try:
            # A prompt queued elsewhere sends no events here: the history is asked at once. One queued here
            # with the socket open, whose progress is wanted, is followed by its events alone, so that a job
            # that ended before this call still hands its progress to `on_progress` before its end.
            polls = 1 if heard_from_start else 0
            while True:
                entry = await self.history(prompt_id) if events is None or polls == 0 else None
                if entry is not None:
                    return entry
                if events is not None:
                    try:
                        event = await asyncio.wait_for(events.get(), timeout=QUIET_CHECK)
                    except TimeoutError:  # quiet for a while: make sure the prompt still exists
                        event = ("check", {})
                    if event is None:  # the socket closed: poll from here on
                        events = None
                        continue
                    kind, data = event
                    if kind == "progress" and on_progress is not None:
                        outcome = on_progress(Progress(prompt_id, data.get("node"), data["value"], data["max"]))
                        if asyncio.iscoroutine(outcome):
                            await outcome
                    elif kind == "execution_error":
                        raise ExecutionError(prompt_id, data)
                    elif kind in END_EVENTS or (kind == "executing" and data.get("node") is None):
                        return await self._entry_after_end(prompt_id)
                    elif kind == "check":  # also where a prompt queued by another client (no events here) ends
                        entry = await self.history(prompt_id)
                        if entry is not None:
                            return entry
                        await self._ensure_known(prompt_id)
                    polls = 1
                    continue
                polls += 1
                if polls % 8 == 0:
                    await self._ensure_known(prompt_id)
                await asyncio.sleep(min(self.poll_interval * (1 + polls / 8), 1.0))
        finally:
            if self._events is not None and watched is not None:
                self._events.unwatch(prompt_id, watched)

    async def _entry_after_end(self, prompt_id: str) -> dict[str, Any]:
        # A ComfyUI server may announce the end a moment before its history has the entry.
        for attempt in range(40):
            entry = await self.history(prompt_id)
            if entry is not None:
                return entry
            await asyncio.sleep(0.05 * (attempt + 1))
        raise ClientError(f"prompt {prompt_id} ended but its history entry never appeared")

    async def _ensure_known(self, prompt_id: str) -> None:
        if prompt_id not in await self.queued() and await self.history(prompt_id) is None:
            raise Cancelled(prompt_id, "removed from the queue before it ran")

    async def _result(self, prompt_id: str, entry: dict[str, Any], download: bool) -> Result:
        status = entry.get("status") or {}
        messages = status.get("messages") or []
        for kind, data in messages:
            if kind == "execution_error":
                raise ExecutionError(prompt_id, data)
            if kind == "execution_interrupted":
                raise Cancelled(prompt_id, "interrupted")
        if status.get("status_str") == "error":
            raise ExecutionError(prompt_id, {})
        outputs = entry.get("outputs") or {}
        files = [
            ImageFile(str(image["filename"]), str(image.get("subfolder", "")), str(image.get("type", "output")), node)
            for node, ui in outputs.items()
            for image in ui.get("images", [])
        ]
        data = list(await asyncio.gather(*(self.download(f) for f in files))) if download else []
        return Result(prompt_id, outputs, files, data)

    async def _request(self, method: str, path: str, **options: Any) -> httpx.Response:
        response, _ = await self._request_counted(method, path, **options)
        return response

    async def _request_counted(self, method: str, path: str, **options: Any) -> tuple[httpx.Response, int]:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.request(method, path, **options)
            except httpx.TransportError as exc:
                if attempt > self.retries:
                    raise ServerUnavailable(f"{self.url}{path}: {type(exc).__name__}: {exc}") from None
                await asyncio.sleep(self._delay(attempt))
                continue
            wait = _retry_after(response)
            if response.status_code == 429 and (wait is None or wait > MAX_RETRY_AFTER or attempt > self.retries):
                raise RateLimited(str(refusal(429, _json(response), response.text)).removeprefix("HTTP 429: "), wait)
            if response.status_code in (429, 503) and attempt <= self.retries:
                await asyncio.sleep(wait if wait is not None else self._delay(attempt))
                continue
            if response.status_code == 503:
                raise ServerUnavailable(f"{self.url}{path}: 503 after {attempt} attempts")
            return response, attempt

    def _delay(self, attempt: int) -> float:
        return float(min(self.backoff * 2 ** (attempt - 1), 10.0) * (0.75 + random.random() / 2))


class _Events:
    """One WebSocket per client, read by one task that hands each prompt's events to its waiter in order."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url = url
        self.headers = headers
        self._socket: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._failed_at: float | None = None  # when the socket last failed: polling until RECONNECT_AFTER
        self._watchers: dict[str, list[asyncio.Queue[tuple[str, dict[str, Any]] | None]]] = {}
        self._early: OrderedDict[str, list[tuple[str, dict[str, Any]]]] = OrderedDict()
        self._expected: OrderedDict[str, None] = OrderedDict()

    async def connect(self) -> bool:
        """Whether events flow; after a failure the client polls, and tries the socket again later."""
        async with self._lock:
            if self._socket is not None:
                return True
            if self._failed_at is not None and time.monotonic() - self._failed_at < RECONNECT_AFTER:
                return False
            from websockets.asyncio.client import connect

            try:
                self._socket = await connect(self.url, additional_headers=self.headers, max_size=None, open_timeout=10)
            except Exception:  # any handshake failure (refused, 401, not a WebSocket): poll instead
                self._failed_at = time.monotonic()
                return False
            self._reader = asyncio.create_task(self._read())
            return True

    def expect(self, prompt_id: str) -> None:
        """`prompt_id` is about to be queued by this client, with the socket open: each of its events comes here."""
        self._expected[prompt_id] = None
        while len(self._expected) > EXPECTED_PROMPTS:
            self._expected.popitem(last=False)

    def forget(self, prompt_id: str) -> None:
        """`prompt_id` was not queued under that id after all."""
        self._expected.pop(prompt_id, None)

    def hears_all_of(self, prompt_id: str) -> bool:
        """Whether every event of `prompt_id` would reach a watcher starting now: it was queued while the
        socket was open, the socket has stayed open since, none of its early events was dropped from the
        buffer, and no watcher has taken any of them (`watch` forgets it)."""
        return self._socket is not None and prompt_id in self._expected

    def watch(self, prompt_id: str) -> asyncio.Queue[tuple[str, dict[str, Any]] | None]:
        """The prompt's events from now on (and those buffered before, for its first watcher)."""
        queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()
        for event in self._early.pop(prompt_id, []):
            queue.put_nowait(event)
        if self._socket is None:
            queue.put_nowait(None)
        self._watchers.setdefault(prompt_id, []).append(queue)
        self._expected.pop(prompt_id, None)  # a later watcher has missed what this one takes
        return queue

    def unwatch(self, prompt_id: str, queue: asyncio.Queue[tuple[str, dict[str, Any]] | None]) -> None:
        watchers = self._watchers.get(prompt_id, [])
        if queue in watchers:
            watchers.remove(queue)
        if not watchers:
            self._watchers.pop(prompt_id, None)

    async def _read(self) -> None:
        try:
            async for message in self._socket:
                if not isinstance(message, str):
                    continue  # binary frames are previews
                try:
                    event = json.loads(message)
                except ValueError:
                    continue
                data = event.get("data") if isinstance(event, dict) else None
                if not isinstance(data, dict) or not isinstance(data.get("prompt_id"), str):
                    continue
                prompt_id = data["prompt_id"]
                item = (str(event.get("type")), data)
                watchers = self._watchers.get(prompt_id)
                if watchers:
                    for watcher in watchers:
                        watcher.put_nowait(item)
                else:
                    self._early.setdefault(prompt_id, []).append(item)
                    self._early.move_to_end(prompt_id)
                    while len(self._early) > BUFFERED_PROMPTS:
                        dropped, _ = self._early.popitem(last=False)
                        self._expected.pop(dropped, None)
        except Exception:  # the connection dropped: every waiter polls from here on
            pass
        finally:
            self._socket = None
            self._expected.clear()  # a socket opened later has missed some of their events
            self._failed_at = time.monotonic()
            for watchers in self._watchers.values():
                for watcher in watchers:
                    watcher.put_nowait(None)

    async def close(self) -> None:
        socket, reader = self._socket, self._reader
        if socket is not None:
            await socket.close()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


def _websocket_url(url: str, client_id: str) -> str:
    parts = urlsplit(url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws", f"clientId={client_id}", ""))


def _transport_reason(exc: httpx.TransportError) -> str:
    """What went wrong reaching a server, in a few words (httpx's own message can be a nested OSError)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused (is the server running, on this address and port?)"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[:1].lower() + cause.strerror[1:]
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time"
    return str(exc) or type(exc).__name__


def _retry_after(response: httpx.Response) -> float | None:
    try:
        value = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return value if value >= 0 else None


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        value = response.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _image_bytes(image: Any, name: str | None) -> tuple[bytes, str]:
    if isinstance(image, bytes):
        return image, name or "upload.png"
    if isinstance(image, str | Path):
        path = Path(image)
        try:
            return path.read_bytes(), name or path.name
        except OSError as exc:
            raise ClientError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if hasattr(image, "save"):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue(), name or "upload.png"
    raise ClientError(f"upload: {type(image).__name__} is not an image (give a path, bytes or a PIL image)")
