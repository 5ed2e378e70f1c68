"""POST /prompt's submissions stored in bursts: one transaction, one commit, for those that arrive together."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from zimage_serve.queue.jobs import Job
from zimage_serve.server.service import QueueService, Stored, Submitted


class SubmissionBatcher:
    """Each request validates its prompt at once (its own 400 stays its own), then waits for the commit
    that stores it together with the others the event loop handled in the same turn. A request alone is
    stored as soon as that turn ends: nothing waits for company, and the answer still comes only once
    the job is safely in the queue file."""

    def __init__(self, service: QueueService, remote: bool = False) -> None:
        self.service = service
        # A queue across the network (Redis) is never waited on from the event loop: numbering, storing
        # and its outages (a connect timeout) stay in threads, and other requests go on being served.
        self.remote = remote
        self._waiting: list[tuple[Submitted, asyncio.Future[Stored]]] = []
        self._storing: set[asyncio.Future[list[Stored]]] = set()

    async def submit(
        self,
        prompt: Any,
        *,
        off_loop: bool = False,
        record: Callable[[Job], str | None] | None = None,
        **options: Any,
    ) -> Submitted:
        """As `QueueService.submit`: raises PromptRejected, QueueFull, QuotaExceeded or DuplicateJob. With `off_loop`, a
        large prompt is validated in a thread, so the event loop keeps serving others meanwhile. `record`
        makes the request's audit record from the prepared job, to be stored with it (`NewJob.record`)."""
        if off_loop or self.remote:
            prepared = await asyncio.to_thread(self.service.prepare, prompt, **options)
        else:
            prepared = self.service.prepare(prompt, **options)
        if record is not None:
            prepared.new = replace(prepared.new, record=record(prepared.job))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Stored] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._store_remote if self.remote else self._store)
        self._waiting.append((prepared, future))
        stored = await future
        if isinstance(stored, Exception):
            raise stored
        return stored

    def _store(self) -> None:
        waiting, self._waiting = self._waiting, []
        try:
            stored = self.service.enqueue([prepared for prepared, _ in waiting])
        except Exception as exc:  # the queue failed: every request of the burst gets the error
            self._answer(waiting, exc)
            return
        self._answer(waiting, stored)

    def _store_remote(self) -> None:
        waiting, self._waiting = self._waiting, []
        loop = asyncio.get_running_loop()
        task = loop.run_in_executor(None, self.service.enqueue, [prepared for prepared, _ in waiting])
        self._storing.add(task)  # held until done

        def stored(done: asyncio.Future[list[Stored]]) -> None:
            self._storing.discard(done)
            self._answer(waiting, done.exception() or done.result())

        task.add_done_callback(stored)

    @staticmethod
    def _answer(waiting: list[tuple[Submitted, asyncio.Future[Stored]]], stored: list[Stored] | BaseException) -> None:
        if isinstance(stored, BaseException):
            for _, future in waiting:
                if not future.done():
                    future.set_exception(stored)
            return
        for (_, future), outcome in zip(waiting, stored, strict=True):
            if not future.done():  # a request whose client left is stored all the same
                future.set_result(outcome)
