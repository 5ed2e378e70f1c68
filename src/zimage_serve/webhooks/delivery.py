"""Sending the outbox: signed POSTs (Standard Webhooks), retried with backoff, never to a forbidden address.

Each delivery is a JSON body `{"type": "job.succeeded", "timestamp": ..., "data": {...}}` with the
`webhook-id`, `webhook-timestamp` and `webhook-signature` headers of the Standard Webhooks convention
(HMAC-SHA256 with the endpoint's secret), so a receiver verifies it with any of that convention's
libraries. A 2xx answer delivers it; anything else (a timeout, a redirect, which is never followed, a
refused address) is tried again after an exponential backoff with jitter, until `retry_for_s` after the
event; then it goes to the dead-letter list an admin sees and replays.

The address is resolved here and checked before connecting: loopback, private, link-local, multicast,
reserved and unspecified addresses are refused unless an allowed network names them, and the request goes
to the address that was checked (the host name stays in the Host header and the TLS server name), so a
name that resolves differently a moment later cannot redirect it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from standardwebhooks import Webhook

from zimage_serve import outbox
from zimage_serve.metrics import WEBHOOK_DELIVERIES, WEBHOOK_LATENCY_SECONDS
from zimage_serve.webhooks.store import Delivery, Webhooks

log = logging.getLogger(__name__)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
EVENT_TYPES = {"queued": "job.queued", "started": "job.started", "succeeded": "job.succeeded",
               "failed": "job.failed", "canceled": "job.canceled"}  # fmt: skip
MAX_ANSWER_BYTES = 64 * 1024  # what is read of a receiver's answer: only its status matters
LEASE_S = 60.0  # a claimed delivery is this node's for a minute ...
ATTEMPT_S = 30.0  # ... and a try (resolving, connecting, sending, the answer) ends well within it
DEAD_KEPT_S = 30 * 86400.0


class Refused(Exception):
    """The endpoint's address is not one deliveries may go to."""


@dataclass(frozen=True)
class DeliveryPolicy:
    retry_for_s: float = 24 * 3600.0  # how long an event is tried before it goes to the dead letters
    first_delay_s: float = 2.0
    max_delay_s: float = 900.0
    timeout_s: float = 10.0
    allowed: tuple[IPNetwork, ...] = ()  # private or local networks deliveries may go to all the same
    concurrency: int = 8
    per_endpoint: int = 4  # tries in flight to one endpoint at most: a slow one never holds every sender
    poll_s: float = 0.2  # how often the outbox is looked at while it is empty


def retry_delay(attempts: int, policy: DeliveryPolicy, draw: Callable[[], float] = random.random) -> float:
    return outbox.retry_delay(attempts, policy.first_delay_s, policy.max_delay_s, draw)


def forbidden(address: IPAddress, allowed: Sequence[IPNetwork]) -> bool:
    """Whether a delivery may not go to `address`: anything not globally reachable (private, loopback,
    link-local, shared address space such as carrier-grade NAT, multicast, reserved) unless an allowed network
    names it. An IPv6 address that carries an IPv4 one (mapped, 6to4, Teredo) is judged by that one too."""
    if any(address in network for network in allowed):
        return False
    if isinstance(address, ipaddress.IPv6Address):
        inner = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
        if any(embedded is not None and forbidden(embedded, allowed) for embedded in inner):
            return True
        if address.ipv4_mapped is not None:
            return False  # judged by its IPv4 address above
        if address.is_site_local:  # deprecated, and still routed inside some networks
            return True
    return not address.is_global or address.is_multicast


async def checked_address(host: str, port: int, allowed: Sequence[IPNetwork]) -> IPAddress:
    """The address to connect to for `host`: every address it resolves to must be allowed (a name with one
    private address among public ones is refused, as a rebinding trick would be)."""
    try:
        literal = ipaddress.ip_address(host)
        addresses: list[IPAddress] = [literal]
    except ValueError:
        try:
            found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise Refused(f"{host} does not resolve: {exc}") from exc
        addresses = [ipaddress.ip_address(info[4][0]) for info in found]
    if not addresses:
        raise Refused(f"{host} resolves to no address")
    for address in addresses:
        if forbidden(address, allowed):
            raise Refused(f"{host} resolves to {address}, which deliveries may not reach (see --webhook-allow)")
    return addresses[0]


def payload(
    delivery: Delivery,
    view_url: Callable[[dict[str, Any]], str],
    stored: dict[tuple[str, str], dict[str, str]] | None = None,
) -> bytes:
    """The body: the event, when it happened, and the job (its outputs, with URLs, once it succeeded): a
    file in the output store has its object's `url` and `object` (`stored`: (subfolder, filename) → those),
    any other its /view address."""
    stored = stored or {}
    data: dict[str, Any] = {"job_id": delivery.job_id, "status": delivery.state, "attempt": delivery.attempt}
    if delivery.metadata is not None:
        with contextlib.suppress(ValueError):
            data["metadata"] = json.loads(delivery.metadata)
    if delivery.result is not None:
        try:
            result = json.loads(delivery.result)
        except ValueError:
            result = {}
        if isinstance(result, dict):
            found = result.get("outputs")
            outputs: dict[str, Any] = found if isinstance(found, dict) else {}
            data["outputs"] = outputs
            data["images"] = [
                {
                    **image,
                    "url": view_url(image),
                    **stored.get((str(image.get("subfolder") or ""), image["filename"]), {}),
                }
                for output in outputs.values()
                if isinstance(output, dict)
                for image in output.get("images", [])
                if isinstance(image, dict) and isinstance(image.get("filename"), str)
            ]
            status = result.get("status")
            if isinstance(status, dict) and delivery.event == "failed":
                data["messages"] = status.get("messages", [])
    body = {
        "type": EVENT_TYPES.get(delivery.event, delivery.event),
        "timestamp": datetime.fromtimestamp(delivery.created, UTC).isoformat().replace("+00:00", "Z"),
        "data": data,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def view_path(image: dict[str, Any]) -> str:
    """ComfyUI's /view address of an output (the server's public URL goes in front when it has one)."""
    return (
        f"/view?filename={quote(str(image.get('filename', '')))}&subfolder={quote(str(image.get('subfolder', '')))}"
        f"&type={quote(str(image.get('type', 'output')))}"
    )


@dataclass
class Dispatcher:
    """Empties the outbox while the server runs (every API node runs one; leases keep them apart)."""

    store: Webhooks
    policy: DeliveryPolicy = field(default_factory=DeliveryPolicy)
    public_url: str = ""
    stored: Callable[[str], dict[tuple[str, str], dict[str, str]]] = lambda job_id: {}  # a job's stored files
    # Each try's outcome (delivered, retried, dead; the error), for the audit log.
    on_outcome: Callable[[Delivery, str, str | None], None] = lambda delivery, outcome, error: None
    _due: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _delivered: list[tuple[int, float]] = field(default_factory=list)  # (seq, lease): removed together
    _clients: dict[str, httpx.AsyncClient] = field(default_factory=dict)  # one per host: see `_client_for`
    _in_flight: Counter[str] = field(default_factory=Counter)  # tries under way, by endpoint id

    def wake(self) -> None:
        """An event may be waiting (a job ended, a job was queued): look now, not at the next poll. Any thread.
        With no endpoint registered no event was written: nothing to do (the submission path stays as fast)."""
        if self._loop is not None and self._due is not None and self.store.has_endpoints:
            self._loop.call_soon_threadsafe(self._due.set)

    async def run(self) -> None:
        self._loop, self._due = asyncio.get_running_loop(), asyncio.Event()
        forgotten_at = 0.0

        async def claim() -> list[Delivery]:
            nonlocal forgotten_at
            claimed = await self._turn()
            if time.time() - forgotten_at > 3600:  # dead letters are kept a month
                forgotten_at = time.time()
                await asyncio.to_thread(self.store.forget_dead, forgotten_at - DEAD_KEPT_S)
            return claimed

        try:
            await outbox.drain(claim, self._send, self.policy.concurrency, self.policy.poll_s, self._due,
                               "the webhook outbox")  # fmt: skip
        finally:
            if self._delivered:  # what was delivered is not sent again after a restart
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.store.delivered, self._delivered)
            for client in self._clients.values():
                await client.aclose()

    async def _turn(self) -> list[Delivery]:
        """Record what was delivered, then claim what is due."""
        if self._delivered:
            done, self._delivered = self._delivered, []
            try:
                await asyncio.to_thread(self.store.delivered, done)
            except Exception:
                self._delivered.extend(done)
                raise
        claimed = await asyncio.to_thread(
            self.store.claim,
            time.time(),
            self.policy.concurrency * 2,
            LEASE_S,
            self.policy.per_endpoint,
            dict(self._in_flight),
        )
        self._in_flight.update(delivery.endpoint.id for delivery in claimed)
        return claimed

    def _client_for(self, host: str) -> httpx.AsyncClient:
        """A client (and so a connection pool) per host name: pools key connections by address, so hosts
        that share one (a CDN, virtual hosts) must not share a connection made, and verified, for another."""
        client = self._clients.get(host)
        if client is None:
            client = self._clients[host] = httpx.AsyncClient(
                follow_redirects=False, timeout=self.policy.timeout_s, trust_env=False
            )
        return client

    async def _send(self, delivery: Delivery) -> None:
        try:
            try:
                async with asyncio.timeout(ATTEMPT_S):  # every step, the name's resolution included
                    error = await self.attempt(delivery)
            except TimeoutError:
                error = f"no answer within {ATTEMPT_S:.0f} s"
            except Exception as exc:  # whatever it was, it counts as a failed try: retried, then dead
                log.exception("webhook delivery %s could not be tried", delivery.id)
                error = f"{type(exc).__name__}: {exc}"
            if error is None:
                self._delivered.append((delivery.seq, delivery.lease_until))  # leased: no one else sends it
                self.wake()
                WEBHOOK_DELIVERIES.labels(delivery.endpoint.name, "delivered").inc()
                WEBHOOK_LATENCY_SECONDS.observe(max(0.0, time.time() - delivery.created))
                self.on_outcome(delivery, "delivered", None)
                return
            give_up = time.time() - delivery.window_from >= self.policy.retry_for_s
            retry_at = None if give_up else time.time() + retry_delay(delivery.attempts, self.policy)
            await asyncio.to_thread(self.store.failed, delivery, error, retry_at)
            WEBHOOK_DELIVERIES.labels(delivery.endpoint.name, "dead" if give_up else "retried").inc()
            self.on_outcome(delivery, "dead" if give_up else "retried", error)
            later = "given up" if retry_at is None else f"tried again in {retry_at - time.time():.0f} s"
            log.warning("webhook %s to %s (%s): %s; %s", delivery.id, delivery.endpoint.name, delivery.event, error,
                        later)  # fmt: skip
        except Exception:  # recording the outcome failed: the lease brings the delivery back later
            log.exception("webhook delivery %s: its outcome could not be recorded", delivery.id)
        finally:
            self._in_flight[delivery.endpoint.id] -= 1
            if self._in_flight[delivery.endpoint.id] <= 0:
                del self._in_flight[delivery.endpoint.id]

    async def attempt(self, delivery: Delivery) -> str | None:
        """One POST; None when the endpoint answered 2xx, else why not."""
        url = urlsplit(delivery.endpoint.url)
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
        try:
            address = await checked_address(host, port, self.policy.allowed)
        except Refused as exc:
            return str(exc)
        stored = await asyncio.to_thread(self.stored, delivery.job_id) if delivery.event == "succeeded" else {}
        body = payload(delivery, lambda image: self.public_url.rstrip("/") + view_path(image), stored)
        sent_at = datetime.now(UTC)
        signature = Webhook(delivery.secret).sign(delivery.id, sent_at, body)
        headers = {
            "content-type": "application/json",
            "user-agent": "zimage-serve webhooks",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": signature,
            "host": url.netloc.rpartition("@")[2].encode("idna").decode("ascii"),
        }
        literal = f"[{address}]" if address.version == 6 else str(address)
        target = url._replace(netloc=f"{literal}:{port}").geturl()
        extensions = {"sni_hostname": host} if url.scheme == "https" else {}
        try:
            client = self._client_for(host)
            request = client.build_request("POST", target, content=body, headers=headers, extensions=extensions)
            response = await client.send(request, stream=True)
            try:
                read = 0
                async for chunk in response.aiter_raw():  # only the status matters; the rest is bounded
                    read += len(chunk)
                    if read > MAX_ANSWER_BYTES:
                        break
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if 200 <= response.status_code < 300:
            return None
        if 300 <= response.status_code < 400:
            return f"answered {response.status_code} (a redirect, which deliveries do not follow)"
        return f"answered {response.status_code}"


async def stopped(task: asyncio.Task[None]) -> None:
    """A background task (the dispatcher, the uploader) ended, whatever became of it (a shutdown goes on)."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:
        log.exception("%s had stopped", task.get_name())
