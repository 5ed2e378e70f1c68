"""The webhook endpoints and outbox of a Redis queue (a cluster's), as `store.WebhookStore` keeps them in the
SQLite queue's file: the same methods, the same leases, the same dead letters.

The queue's own scripts write a job's events (`EVENT_HOOK`, included in queue/redis_scripts.py) in the
script that changes the job, so an event is never lost to a crash between the two. Every API node runs a
dispatcher; a claim leases a delivery by moving its due time to the lease's end, so exactly one node sends
it at a time, and a node that dies mid-send leaves it to be taken again when the lease runs out.

Keys, under the queue's prefix P: `P webhook:endpoints` (endpoint id → its JSON, the secret included),
`P webhook:names` (name → id), `P webhook:seq`, `P webhook:d:<seq>` (a delivery: a hash of the SQLite
outbox's columns), `P webhook:due` (live deliveries by when they are due), `P webhook:dead` (dead letters by
when they were given up on).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import redis

from zimage_serve.storage.redis_uploads import UPLOAD_PENDING
from zimage_serve.webhooks.schema import METADATA_BYTES
from zimage_serve.webhooks.store import (
    BUSY_PUSH_S,
    HELD_PUSH_S,
    WINDOW,
    Delivery,
    Endpoint,
    NamedEndpoints,
    WebhookError,
    new_endpoint,
)

T = TypeVar("T")

# Lua, run inside the queue's scripts (their PRELUDE gives P, now() and fmt()): the deliveries of one event
# of job `id`, one per endpoint it goes to, as the SQLite queue's triggers write them (webhooks/schema.py).
EVENT_HOOK = rf"""
local function webhook_event(id, event, result)
  if redis.call('HLEN', P .. 'webhook:endpoints') == 0 then return end
  local job = redis.call('HMGET', P .. 'job:' .. id, 'owner', 'extra_data', 'state', 'attempts')
  local owner, named, metadata = job[1] or '', nil, nil
  local ok, extra = pcall(cjson.decode, job[2] or '')
  if ok and type(extra) == 'table' then
    if type(extra.webhook) == 'string' then named = extra.webhook end
    local labels = extra.metadata
    if type(extra.comfy_api_v2) == 'table' and extra.comfy_api_v2.metadata ~= nil then
      labels = extra.comfy_api_v2.metadata
    end
    if labels ~= nil then
      local encoded, text = pcall(cjson.encode, labels)
      if encoded and #text <= {METADATA_BYTES} then metadata = text end
    end
  end
  local t = now()
  for _, text in ipairs(redis.call('HVALS', P .. 'webhook:endpoints')) do
    local e = cjson.decode(text)
    if string.find(e.events, ',' .. event .. ',', 1, true) and (e.owner == '' or e.owner == owner)
       and (e.subscribe == 1 or e.name == named) then
      local seq = redis.call('INCR', P .. 'webhook:seq')
      local d = P .. 'webhook:d:' .. seq
      -- never the same twice, even from a Redis that lost its latest writes (and so counts again)
      local digest = redis.sha1hex(e.id .. ':' .. id .. ':' .. event .. ':' .. seq .. ':' .. fmt(t))
      local message = 'msg_' .. string.sub(digest, 1, 32)
      redis.call('HSET', d, 'seq', seq, 'id', message,
                 'endpoint', e.id, 'event', event, 'job_id', id, 'owner', owner, 'state', job[3] or '',
                 'attempt', job[4] or '0', 'created', fmt(t), 'attempts', 0)
      if result ~= nil then redis.call('HSET', d, 'result', result) end
      if metadata ~= nil then redis.call('HSET', d, 'metadata', metadata) end
      redis.call('ZADD', P .. 'webhook:due', t, seq)
    end
  end
end

local function webhook_end(id, state, result)
  local event = 'canceled'
  if state == 'success' then event = 'succeeded' elseif state == 'error' then event = 'failed' end
  webhook_event(id, event, result)
end
"""

# ARGV: P, name, id, endpoint JSON. 1, or 0 when the name is taken.
ADD = r"""
if redis.call('HSETNX', ARGV[1] .. 'webhook:names', ARGV[2], ARGV[3]) == 0 then return 0 end
redis.call('HSET', ARGV[1] .. 'webhook:endpoints', ARGV[3], ARGV[4])
return 1
"""

# ARGV: P, name. The endpoint and its deliveries, waiting and dead, go: 1, or 0 when there is none.
REMOVE = r"""
local P = ARGV[1]
local id = redis.call('HGET', P .. 'webhook:names', ARGV[2])
if not id then return 0 end
for _, set in ipairs({'webhook:due', 'webhook:dead'}) do
  for _, seq in ipairs(redis.call('ZRANGE', P .. set, 0, -1)) do
    if redis.call('HGET', P .. 'webhook:d:' .. seq, 'endpoint') == id then
      redis.call('DEL', P .. 'webhook:d:' .. seq)
      redis.call('ZREM', P .. set, seq)
    end
  end
end
redis.call('HDEL', P .. 'webhook:endpoints', id)
redis.call('HDEL', P .. 'webhook:names', ARGV[2])
return 1
"""

# ARGV: P, now, limit, lease_s, per endpoint ('' : no cap), then (endpoint id, tries in flight) pairs.
# {whether any endpoint is registered, {delivery's HGETALL, endpoint JSON}...}. As the SQLite store's `pick`:
# the first WINDOW × limit due ones are looked at; those of an endpoint with enough tries under way, and held
# `succeeded` events, are pushed back a moment.
CLAIM = (
    r"""
local P, t, limit, lease, share = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local taken = {}
for i = 6, #ARGV, 2 do taken[ARGV[i]] = tonumber(ARGV[i + 1]) end
-- A job's `succeeded` waits for its files to be in the output store (not given up on), as with SQLite.
local function held(d)
  local fields = redis.call('HMGET', d, 'event', 'job_id')
  if fields[1] ~= 'succeeded' then return false end
  local job = fields[2]
  return """
    + UPLOAD_PENDING
    + rf"""
end
local claimed = {{}}
local due = redis.call('ZRANGEBYSCORE', P .. 'webhook:due', '-inf', t, 'LIMIT', 0, limit * {WINDOW})
for _, seq in ipairs(due) do
  if #claimed >= limit then break end
  local d = P .. 'webhook:d:' .. seq
  local id = redis.call('HGET', d, 'endpoint')
  local endpoint = id and redis.call('HGET', P .. 'webhook:endpoints', id)
  if not endpoint then  -- removed meanwhile
    redis.call('DEL', d)
    redis.call('ZREM', P .. 'webhook:due', seq)
  elseif held(d) then
    redis.call('ZADD', P .. 'webhook:due', t + {HELD_PUSH_S}, seq)
  elseif share and (taken[id] or 0) >= share then
    redis.call('ZADD', P .. 'webhook:due', t + {BUSY_PUSH_S}, seq)
  else
    taken[id] = (taken[id] or 0) + 1
    redis.call('HSET', d, 'lease_until', string.format('%.6f', t + lease))
    redis.call('HINCRBY', d, 'attempts', 1)
    if (redis.call('HGET', d, 'retry_from') or '') == '' then
      redis.call('HSET', d, 'retry_from', string.format('%.6f', t))
    end
    redis.call('ZADD', P .. 'webhook:due', t + lease, seq)  -- due again when the lease runs out
    claimed[#claimed + 1] = {{redis.call('HGETALL', d), endpoint}}
  end
end
return {{redis.call('HLEN', P .. 'webhook:endpoints'), claimed}}
"""
)

# ARGV: P, then (seq, lease) pairs: those still leased so are removed.
DELIVERED = r"""
for i = 2, #ARGV, 2 do
  local d = ARGV[1] .. 'webhook:d:' .. ARGV[i]
  if redis.call('HGET', d, 'lease_until') == ARGV[i + 1] then
    redis.call('DEL', d)
    redis.call('ZREM', ARGV[1] .. 'webhook:due', ARGV[i])
  end
end
return 0
"""

# ARGV: P, seq, lease, error, retry_at ('' : dead), now. Fenced by the lease, as the SQLite store's.
FAILED = r"""
local P, seq = ARGV[1], ARGV[2]
local d = P .. 'webhook:d:' .. seq
if redis.call('HGET', d, 'lease_until') ~= ARGV[3] then return 0 end
redis.call('HSET', d, 'last_error', ARGV[4], 'lease_until', '')
if ARGV[5] == '' then
  redis.call('HSET', d, 'dead', ARGV[6])
  redis.call('ZREM', P .. 'webhook:due', seq)
  redis.call('ZADD', P .. 'webhook:dead', ARGV[6], seq)
else
  redis.call('HSET', d, 'next_at', ARGV[5])
  redis.call('ZADD', P .. 'webhook:due', ARGV[5], seq)
end
return 1
"""

# ARGV: P, now, 'all' or 'these', then the webhook ids. How many went back to the outbox.
REPLAY = r"""
local P, t, all = ARGV[1], ARGV[2], ARGV[3] == 'all'
local wanted = {}
for i = 4, #ARGV do wanted[ARGV[i]] = true end
local count = 0
for _, seq in ipairs(redis.call('ZRANGE', P .. 'webhook:dead', 0, -1)) do
  local d = P .. 'webhook:d:' .. seq
  local fields = redis.call('HMGET', d, 'id', 'endpoint')
  if (all or wanted[fields[1]]) and fields[2] and redis.call('HEXISTS', P .. 'webhook:endpoints', fields[2]) == 1 then
    redis.call('HSET', d, 'dead', '', 'attempts', 0, 'next_at', t, 'retry_from', t, 'lease_until', '')
    redis.call('ZREM', P .. 'webhook:dead', seq)
    redis.call('ZADD', P .. 'webhook:due', t, seq)
    count = count + 1
  end
end
return count
"""

# ARGV: P, before. Dead letters given up on before then go; how many.
FORGET_DEAD = r"""
local old = redis.call('ZRANGEBYSCORE', ARGV[1] .. 'webhook:dead', '-inf', ARGV[2])
for _, seq in ipairs(old) do redis.call('DEL', ARGV[1] .. 'webhook:d:' .. seq) end
redis.call('ZREMRANGEBYSCORE', ARGV[1] .. 'webhook:dead', '-inf', ARGV[2])
return #old
"""


class RedisWebhookStore(NamedEndpoints):
    """A Redis queue's webhook endpoints and outbox; `call` runs each Redis call (the queue's: an unreachable
    Redis is its QueueUnavailable)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        call: Callable[[Callable[[], Any]], Any],
        on_close: Callable[[], None] = lambda: None,  # a connection of the store's own is closed with it
    ) -> None:
        self.redis, self.prefix, self._call, self._on_close = client, prefix, call, on_close
        self._scripts = {
            name: client.register_script(text)
            for name, text in (("add", ADD), ("remove", REMOVE), ("claim", CLAIM), ("delivered", DELIVERED),
                               ("failed", FAILED), ("replay", REPLAY), ("forget_dead", FORGET_DEAD))
        }  # fmt: skip
        self.has_endpoints = True  # as the SQLite store's: refreshed by each claim

    def close(self) -> None:
        self._on_close()

    def _run(self, script: str, *args: Any) -> Any:
        return self._call(lambda: self._scripts[script](args=[self.prefix, *args]))

    # -- endpoints -------------------------------------------------------------------------------------
    def add(
        self, name: str, url: str, events: list[str] | None = None, owner: str = "", subscribe: bool = False
    ) -> tuple[Endpoint, str]:
        endpoint, secret = new_endpoint(name, url, events, owner, subscribe)
        stored = {
            "id": endpoint.id,
            "name": name,
            "url": endpoint.url,
            "secret": secret,
            "events": "," + ",".join(endpoint.events) + ",",
            "owner": owner,
            "subscribe": int(subscribe),
            "created": endpoint.created,
        }
        if not self._run("add", name, endpoint.id, json.dumps(stored)):
            raise WebhookError(f"name: an endpoint named {name!r} exists already")
        self.has_endpoints = True
        return endpoint, secret

    def endpoints(self) -> list[Endpoint]:
        stored = self._call(lambda: self.redis.hvals(self.prefix + "webhook:endpoints"))
        return sorted((_endpoint(json.loads(text))[0] for text in stored), key=lambda e: e.created)

    def remove(self, name: str) -> bool:
        return bool(self._run("remove", name))

    # -- deliveries ------------------------------------------------------------------------------------
    def claim(
        self,
        now: float,
        limit: int = 16,
        lease_s: float = 60.0,
        per_endpoint: int | None = None,
        in_flight: Mapping[str, int] | None = None,
    ) -> list[Delivery]:
        flights = [part for endpoint, count in sorted((in_flight or {}).items()) for part in (endpoint, count)]
        share = "" if per_endpoint is None else per_endpoint
        registered, rows = self._run("claim", f"{now:.6f}", limit, lease_s, share, *flights)
        self.has_endpoints = bool(registered)
        claimed = []
        for flat, endpoint_text in rows:
            row = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
            endpoint, secret = _endpoint(json.loads(endpoint_text))
            claimed.append(
                Delivery(int(row["seq"]), row["id"], row["event"], row["job_id"], row["owner"], row["state"],
                         row.get("result"), float(row["created"]), int(row["attempts"]), endpoint, secret,
                         int(row["attempt"]), float(row["retry_from"]), float(row["lease_until"]),
                         row.get("metadata"))
            )  # fmt: skip
        return sorted(claimed, key=lambda d: d.seq)

    def delivered(self, done: list[tuple[int, float]]) -> None:
        self._run("delivered", *[part for seq, lease in done for part in (seq, f"{lease:.6f}")])

    def failed(self, delivery: Delivery, error: str, retry_at: float | None) -> None:
        retry = "" if retry_at is None else f"{retry_at:.6f}"
        self._run("failed", delivery.seq, f"{delivery.lease_until:.6f}", error[:500], retry, f"{time.time():.6f}")

    def forget_dead(self, before: float) -> int:
        return int(self._run("forget_dead", f"{before:.6f}"))

    def waiting(self) -> int:
        return int(self._call(lambda: self.redis.zcard(self.prefix + "webhook:due")))

    def dead_letters(self, limit: int = 1000) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            seqs = self.redis.zrevrange(self.prefix + "webhook:dead", 0, limit - 1)
            pipe = self.redis.pipeline(transaction=False)
            for seq in seqs:
                pipe.hgetall(f"{self.prefix}webhook:d:{_text(seq)}")
            rows = [{_text(k): _text(v) for k, v in found.items()} for found in pipe.execute() if found]
            names = {e.id: e.name for e in self.endpoints()}
            return [
                {"id": r["id"], "endpoint": names.get(r["endpoint"]), "event": r["event"], "job_id": r["job_id"],
                 "attempts": int(r["attempts"]), "error": r.get("last_error"), "created": float(r["created"]),
                 "dead": float(r["dead"])}
                for r in rows
            ]  # fmt: skip

        result: list[dict[str, Any]] = self._call(read)
        return result

    def replay(self, ids: list[str] | None = None) -> int:
        return int(self._run("replay", f"{time.time():.6f}", "all" if ids is None else "these", *(ids or [])))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _endpoint(stored: dict[str, Any]) -> tuple[Endpoint, str]:
    events = tuple(e for e in str(stored["events"]).split(",") if e)
    endpoint = Endpoint(
        stored["id"], stored["name"], stored["url"], events, stored["owner"], bool(stored["subscribe"]),
        float(stored["created"]),
    )  # fmt: skip
    return endpoint, str(stored["secret"])
