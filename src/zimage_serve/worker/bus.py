"""What the nodes of a cluster share besides the queue: two channels and the register of workers, in the
same Redis as the queue (under its prefix).

- `events`: job events and queue changes, published by workers, heard by every API node, which hands
  each to its own sockets (a client sees its job's progress whichever node its socket is on);
- `control`: wake, interrupt and free, published by API nodes (the queue's own scripts publish the wake
  when jobs are queued), heard by every worker;
- `workers`: a hash, each worker's last heartbeat (Redis' clock) with its device, state and jobs; a
  worker that stops beating is shown with the age of its last heartbeat, then dropped.

Messages are `worker/messages.py`'s, as JSON. Pub/sub is at most once: a node that is disconnected misses
what was said meanwhile. Nothing depends on it but liveness: a job's record is in the queue, workers poll
it every second even without a wake, and sockets get the queue's state when they reconnect.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zimage_serve.queue.jobs import LEASE_S
from zimage_serve.queue.redis_queue import RedisQueue
from zimage_serve.worker.messages import Cluster, from_json, to_json

log = logging.getLogger(__name__)
FORGET_AFTER_S = 10 * LEASE_S  # a worker silent this long is dropped from the register
RECONNECT_S = 1.0


@dataclass(frozen=True)
class WorkerRecord:
    id: str
    heartbeat_age_s: float
    info: dict[str, Any]

    def shown(self) -> dict[str, Any]:
        """As /system_stats lists it."""
        return {"id": self.id, "heartbeat_age_s": round(self.heartbeat_age_s, 3), **self.info}


class ClusterBus:
    def __init__(self, queue: RedisQueue) -> None:
        self.queue, self.redis, self.prefix = queue, queue.redis, queue.prefix
        self.events, self.control = self.prefix + "events", self.prefix + "control"
        self._register = self.prefix + "workers"

    def publish(self, channel: str, message: Cluster) -> None:
        self.queue.call(lambda: self.redis.publish(channel, to_json(message)))

    def publish_all(self, channel: str, messages: list[Cluster]) -> None:
        """In order, in one round trip."""

        def send() -> None:
            with self.redis.pipeline(transaction=False) as pipe:
                for message in messages:
                    pipe.publish(channel, to_json(message))
                pipe.execute()

        self.queue.call(send)

    # -- the register of workers -----------------------------------------------------------------------
    def beat(self, worker_id: str, info: dict[str, Any]) -> None:
        """`worker_id` is alive, with `info` (device, state, concurrency, host); its time is Redis'."""
        seconds, micros = self.queue.call(self.redis.time)
        record = json.dumps({"beat": seconds + micros / 1e6, "info": info})
        self.queue.call(lambda: self.redis.hset(self._register, worker_id, record))

    def leave(self, worker_id: str) -> None:
        self.queue.call(lambda: self.redis.hdel(self._register, worker_id))

    def workers(self) -> list[WorkerRecord]:
        """The workers that beat within FORGET_AFTER_S, oldest registered first; older ones are dropped."""

        def read() -> tuple[dict[Any, Any], float]:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(self._register)
                pipe.time()
                found, (seconds, micros) = pipe.execute()
            return found, seconds + micros / 1e6

        found, now = self.queue.call(read)
        records, silent = [], []
        for worker_id, text in found.items():
            try:
                record = json.loads(text)
                age = max(0.0, now - float(record["beat"]))
                info = dict(record["info"])
            except (ValueError, KeyError, TypeError):
                silent.append(worker_id)
                continue
            if age > FORGET_AFTER_S:
                silent.append(worker_id)
            else:
                records.append(WorkerRecord(str(worker_id), age, info))
        if silent:
            self.queue.call(lambda: self.redis.hdel(self._register, *silent))
        return sorted(records, key=lambda r: r.id)

    # -- listening -------------------------------------------------------------------------------------
    def listen(
        self,
        channel: str,
        on_message: Callable[[Cluster], None],
        stop: threading.Event,
        wanted: Callable[[], bool] = lambda: True,
    ) -> threading.Thread:
        """Hand every message on `channel` to `on_message` on a thread of its own, until `stop` (those that
        arrive while `wanted()` is false are not even decoded); while Redis is away the thread reconnects
        every RECONNECT_S (and logs once that it lost it)."""
        thread = threading.Thread(
            target=self._listen, args=(channel, on_message, stop, wanted), name=f"zimage-listen-{channel}", daemon=True
        )
        thread.start()
        return thread

    def _listen(
        self, channel: str, on_message: Callable[[Cluster], None], stop: threading.Event, wanted: Callable[[], bool]
    ) -> None:
        lost = False
        while not stop.is_set():
            subscriber = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                subscriber.subscribe(channel)
                if lost:
                    log.warning("the cluster's channel %s is back", channel)
                    lost = False
                while not stop.is_set():
                    raw = subscriber.get_message(timeout=0.5)
                    if raw is None or raw.get("type") != "message" or not wanted():
                        continue
                    message = from_json(raw["data"])
                    if message is None:
                        log.warning("a message on %s this version does not know was skipped", channel)
                        continue
                    try:
                        on_message(message)
                    except Exception:  # one bad delivery must not stop the others
                        log.exception("could not deliver %s from %s", type(message).__name__, channel)
            except Exception as exc:  # Redis away, or the connection broken (redis-py raises several kinds)
                if not lost:
                    log.error("lost the cluster's channel %s (%s: %s); reconnecting", channel, type(exc).__name__, exc)
                    lost = True
                stop.wait(RECONNECT_S)
            finally:
                with contextlib.suppress(Exception):
                    subscriber.close()
