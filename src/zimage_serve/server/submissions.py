"""POST /prompt's submissions stored in bursts: one transaction, one commit, for those that arrive together."""

from __future__ import annotations

import asyncio
from typing import Any

from zimage_serve.queue.service import QueueService, Stored, Submitted


class SubmissionBatcher:
    """Each request validates its prompt at once (its own 400 stays its own), then waits for the commit
    that stores it together with the others the event loop handled in the same turn. A request alone is
    stored as soon as that turn ends: nothing waits for company, and the answer still comes only once
    the job is safely in the queue file."""

    def __init__(self, service: QueueService) -> None:
        self.service = service
        self._waiting: list[tuple[Submitted, asyncio.Future[Stored]]] = []

    async def submit(self, prompt: Any, *, off_loop: bool = False, **options: Any) -> Submitted:
        """As `QueueService.submit`: raises PromptRejected, QueueFull, QuotaExceeded or DuplicateJob. With `off_loop`, a
        large prompt is validated in a thread, so the event loop keeps serving others meanwhile."""
        if off_loop:
            prepared = await asyncio.to_thread(self.service.prepare, prompt, **options)
        else:
            prepared = self.service.prepare(prompt, **options)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Stored] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._store)
        self._waiting.append((prepared, future))
        stored = await future
        if isinstance(stored, Exception):
            raise stored
        return stored

    def _store(self) -> None:
        waiting, self._waiting = self._waiting, []
        try:
            stored = self.service.enqueue([prepared for prepared, _ in waiting])
        except Exception as exc:  # the queue file failed: every request of the burst gets the error
            for _, future in waiting:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), outcome in zip(waiting, stored, strict=True):
            if not future.done():  # a request whose client left is stored all the same
                future.set_result(outcome)
