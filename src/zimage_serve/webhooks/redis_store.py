"""The webhook endpoints and outbox of a Redis queue (a cluster's), as `store.WebhookStore` keeps them in the
SQLite queue's file: the same methods, the same leases, the same dead letters.

The queue's own scripts write a job's events (`EVENT_HOOK`, included in queue/redis_scripts.py) in the
script that changes the job, so an event is never lost to a crash between the two. Every API node runs a
dispatcher; a claim leases a delivery by moving its due time to the lease's end, so exactly one node sends
it at a time, and a node that dies mid-send leaves it to be taken again when the lease runs out.

Keys, under the queue's prefix P: `P webhook:endpoints` (endpoint id → its JSON, the secret included),
`P webhook:names` (name → id), `P webhook:seq`, `P webhook:d:<seq>` (a delivery: a hash of the SQLite
outbox's columns), `P webhook:due:<endpoint id>` (an endpoint's live deliveries by when they are due: a
claim takes each endpoint's oldest, so no backlog of one stands in front of another), `P webhook:dead`
(dead letters by when they were given up on), `P webhook:held:<job id>` (its job.succeeded deliveries
held for its files, which `release` makes due).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import redis

from zimage_serve import outbox
from zimage_serve.storage.redis_uploads import UPLOAD_PENDING
from zimage_serve.webhooks.store import (
    HELD_S,
    HOLD_BATCH,
    HOLD_ROUNDS,
    Delivery,
    Endpoint,
    NamedEndpoints,
    WebhookError,
    new_endpoint,
)

T = TypeVar("T")

# Lua, run inside the queue's scripts (their PRELUDE gives P, now() and fmt()): the deliveries of one event
# of job `id`, one per endpoint it goes to, as the SQLite queue's triggers write them (webhooks/schema.py).
EVENT_HOOK = r"""
local function webhook_event(id, event, result)
  if redis.call('HLEN', P .. 'webhook:endpoints') == 0 then return end
  -- the endpoint the job names and its labels were read from its extra_data as it was queued (in Python)
  local job = redis.call('HMGET', P .. 'job:' .. id, 'owner', 'webhook', 'labels', 'state', 'attempts')
  local owner, named, metadata = job[1] or '', job[2] or '', job[3] or ''
  local t = now()
  for _, text in ipairs(redis.call('HVALS', P .. 'webhook:endpoints')) do
    local e = cjson.decode(text)
    if string.find(e.events, ',' .. event .. ',', 1, true) and (e.owner == '' or e.owner == owner)
       and (e.subscribe == 1 or (named ~= '' and e.name == named)) then
      local seq = redis.call('INCR', P .. 'webhook:seq')
      local d = P .. 'webhook:d:' .. seq
      -- never the same twice, even from a Redis that lost its latest writes (and so counts again)
      local digest = redis.sha1hex(e.id .. ':' .. id .. ':' .. event .. ':' .. seq .. ':' .. fmt(t))
      local message = 'msg_' .. string.sub(digest, 1, 32)
      redis.call('HSET', d, 'seq', seq, 'id', message,
                 'endpoint', e.id, 'event', event, 'job_id', id, 'owner', owner, 'state', job[4] or '',
                 'attempt', job[5] or '0', 'created', fmt(t), 'attempts', 0)
      if result ~= nil then redis.call('HSET', d, 'result', result) end
      if metadata ~= '' then redis.call('HSET', d, 'metadata', metadata) end
      redis.call('ZADD', P .. 'webhook:due:' .. e.id, t, seq)
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
for _, seq in ipairs(redis.call('ZRANGE', P .. 'webhook:due:' .. id, 0, -1)) do
  redis.call('DEL', P .. 'webhook:d:' .. seq)
end
redis.call('DEL', P .. 'webhook:due:' .. id)
for _, seq in ipairs(redis.call('ZRANGE', P .. 'webhook:dead', 0, -1)) do
  if redis.call('HGET', P .. 'webhook:d:' .. seq, 'endpoint') == id then
    redis.call('DEL', P .. 'webhook:d:' .. seq)
    redis.call('ZREM', P .. 'webhook:dead', seq)
  end
end
redis.call('HDEL', P .. 'webhook:endpoints', id)
redis.call('HDEL', P .. 'webhook:names', ARGV[2])
return 1
"""

# ARGV: P, now, limit, lease_s, per endpoint ('' : no cap), then (endpoint id, tries in flight) pairs.
# {whether any endpoint is registered, {delivery's HGETALL, endpoint JSON}...}: each endpoint's oldest, as
# many as it has room for, then the oldest of those. A job.succeeded whose files are not stored yet is held
# (as the SQLite store's claim holds it) until `release`, or HELD_S.
CLAIM = (
    r"""
local P, t, limit, lease, share = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local flying = {}
for i = 6, #ARGV, 2 do flying[ARGV[i]] = tonumber(ARGV[i + 1]) end
local function held(d)
  local fields = redis.call('HMGET', d, 'event', 'job_id')
  if fields[1] ~= 'succeeded' then return false end
  local job = fields[2]
  return """
    + UPLOAD_PENDING
    + rf"""
end
local found = {{}}
for _, id in ipairs(redis.call('HKEYS', P .. 'webhook:endpoints')) do
  local room = limit
  if share then room = math.min(limit, share - (flying[id] or 0)) end
  local due_key, taken, count, rounds = P .. 'webhook:due:' .. id, {{}}, 0, 0
  -- the endpoint's oldest, as many as it has room for; held events are set aside on the way, taking none
  while room > 0 and count < room and rounds < {HOLD_ROUNDS} do
    rounds = rounds + 1
    local window = room + {HOLD_BATCH}
    local due = redis.call('ZRANGEBYSCORE', due_key, '-inf', t, 'WITHSCORES', 'LIMIT', 0, window)
    local held_any = false
    for i = 1, #due, 2 do
      local seq = due[i]
      if not taken[seq] then
        local d = P .. 'webhook:d:' .. seq
        if redis.call('EXISTS', d) == 0 then  -- gone (removed by hand, evicted): never handed out
          redis.call('ZREM', due_key, seq)
        elseif held(d) then
          local job = redis.call('HGET', d, 'job_id')
          redis.call('ZADD', due_key, t + {HELD_S}, seq)
          redis.call('SADD', P .. 'webhook:held:' .. job, seq)
          redis.call('EXPIRE', P .. 'webhook:held:' .. job, 86400)
          held_any = true
        elseif count < room then
          taken[seq] = true
          count = count + 1
          found[#found + 1] = {{tonumber(due[i + 1]), tonumber(seq), id}}
        else
          break
        end
      end
    end
    if not held_any or #due < window * 2 then break end
  end
end
table.sort(found, function(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end)
local claimed = {{}}
for i = 1, math.min(#found, limit) do
  local seq, id = found[i][2], found[i][3]
  local d = P .. 'webhook:d:' .. seq
  redis.call('HSET', d, 'lease_until', string.format('%.6f', t + lease))
  redis.call('HINCRBY', d, 'attempts', 1)
  if (redis.call('HGET', d, 'retry_from') or '') == '' then
    redis.call('HSET', d, 'retry_from', string.format('%.6f', t))
  end
  redis.call('ZADD', P .. 'webhook:due:' .. id, t + lease, seq)  -- due again when the lease runs out
  claimed[#claimed + 1] = {{redis.call('HGETALL', d), redis.call('HGET', P .. 'webhook:endpoints', id)}}
end
return {{redis.call('HLEN', P .. 'webhook:endpoints'), claimed}}
"""
)

# ARGV: P, then (seq, lease) pairs: those still leased so are removed.
DELIVERED = r"""
for i = 2, #ARGV, 2 do
  local d = ARGV[1] .. 'webhook:d:' .. ARGV[i]
  local fields = redis.call('HMGET', d, 'lease_until', 'endpoint')
  if fields[1] == ARGV[i + 1] then
    redis.call('DEL', d)
    redis.call('ZREM', ARGV[1] .. 'webhook:due:' .. fields[2], ARGV[i])
  end
end
return 0
"""

# ARGV: P, seq, lease, error, retry_at ('' : dead), now. Fenced by the lease, as the SQLite store's.
FAILED = r"""
local P, seq = ARGV[1], ARGV[2]
local d = P .. 'webhook:d:' .. seq
local fields = redis.call('HMGET', d, 'lease_until', 'endpoint')
if fields[1] ~= ARGV[3] then return 0 end
local due = P .. 'webhook:due:' .. fields[2]
redis.call('HSET', d, 'last_error', ARGV[4], 'lease_until', '')
if ARGV[5] == '' then
  redis.call('HSET', d, 'dead', ARGV[6])
  redis.call('ZREM', due, seq)
  redis.call('ZADD', P .. 'webhook:dead', ARGV[6], seq)
else
  redis.call('HSET', d, 'next_at', ARGV[5])
  redis.call('ZADD', due, ARGV[5], seq)
end
return 1
"""

# ARGV: P, job id, now. Its held job.succeeded deliveries are due now.
RELEASE = r"""
local P, held = ARGV[1], ARGV[1] .. 'webhook:held:' .. ARGV[2]
for _, seq in ipairs(redis.call('SMEMBERS', held)) do
  local fields = redis.call('HMGET', P .. 'webhook:d:' .. seq, 'endpoint', 'lease_until', 'dead')
  local unleased = (fields[2] or '') == '' or tonumber(fields[2]) < tonumber(ARGV[3])
  if fields[1] and unleased and (fields[3] or '') == '' then
    redis.call('ZADD', P .. 'webhook:due:' .. fields[1], ARGV[3], seq)
  end
end
redis.call('DEL', held)
return 0
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
    redis.call('ZADD', P .. 'webhook:due:' .. fields[2], t, seq)
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
        scripts = {"add": ADD, "remove": REMOVE, "claim": CLAIM, "delivered": DELIVERED, "failed": FAILED,
                   "release": RELEASE, "replay": REPLAY, "forget_dead": FORGET_DEAD}  # fmt: skip
        self._scripts = {name: client.register_script(text) for name, text in scripts.items()}
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
            row = {outbox.text(flat[i]): outbox.text(flat[i + 1]) for i in range(0, len(flat), 2)}
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

    def release(self, job_id: str, now: float) -> None:
        self._run("release", job_id, f"{now:.6f}")

    def forget_dead(self, before: float) -> int:
        return int(self._run("forget_dead", f"{before:.6f}"))

    def waiting(self) -> int:
        def count() -> int:
            endpoints = self.redis.hkeys(self.prefix + "webhook:endpoints")
            pipe = self.redis.pipeline(transaction=False)
            for endpoint in endpoints:
                pipe.zcard(f"{self.prefix}webhook:due:{outbox.text(endpoint)}")
            return sum(int(n) for n in pipe.execute())

        return int(self._call(count))

    def dead_letters(self, limit: int = 1000) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            seqs = self.redis.zrevrange(self.prefix + "webhook:dead", 0, limit - 1)
            pipe = self.redis.pipeline(transaction=False)
            for seq in seqs:
                pipe.hgetall(f"{self.prefix}webhook:d:{outbox.text(seq)}")
            rows = [{outbox.text(k): outbox.text(v) for k, v in found.items()} for found in pipe.execute() if found]
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


def _endpoint(stored: dict[str, Any]) -> tuple[Endpoint, str]:
    events = tuple(e for e in str(stored["events"]).split(",") if e)
    endpoint = Endpoint(
        stored["id"], stored["name"], stored["url"], events, stored["owner"], bool(stored["subscribe"]),
        float(stored["created"]),
    )  # fmt: skip
    return endpoint, str(stored["secret"])
