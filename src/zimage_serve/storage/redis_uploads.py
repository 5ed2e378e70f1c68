"""The output store's outbox and record of stored objects in a Redis queue (a cluster's), as `uploads.UploadOutbox`
keeps them in the SQLite queue's file: the same methods and leases.

The queue's finish script writes a succeeded job's upload (`FINISH_HOOK`, included in queue/redis_scripts.py)
in the script that records its end, while an output store is in use: `P output_store` exists, set by every
API node that uploads and kept alive by its claims (it expires two minutes after the last one, so a cluster
whose nodes all stopped uploading holds no webhook back for uploads nobody makes).

Keys, under the queue's prefix P: `P upload:seq`, `P upload:<seq>` (a job's upload: the SQLite outbox's
columns), `P uploads:due` (by when each is due; a claim's lease moves it), `P uploads:dead`,
`P uploads:pending` (job id → its live upload: what a `job.succeeded` webhook waits for),
`P objects:<job id>` (the job's stored files) and `P object_files` (each stored file → the job that stored it),
a stored file named by the JSON list [space, subfolder, filename].
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

from zimage_serve import outbox
from zimage_serve.storage.uploads import OutputFile, StoredObject, Upload, output_files

ALIVE_S = 120  # `P output_store` outlives the last claim by this long

# Lua, run inside the queue's scripts (their PRELUDE gives P, now() and fmt()).
FINISH_HOOK = r"""
local function output_upload(id, state, result)
  if state ~= 'success' or redis.call('EXISTS', P .. 'output_store') == 0 then return end
  local job = redis.call('HMGET', P .. 'job:' .. id, 'owner', 'context')
  local space = ''
  local ok, context = pcall(cjson.decode, job[2] or '')
  if job[1] and job[1] ~= '' and ok and type(context) == 'table' and context.role == 'user' then space = job[1] end
  local seq = redis.call('INCR', P .. 'upload:seq')
  local t = now()
  redis.call('HSET', P .. 'upload:' .. seq, 'seq', seq, 'job_id', id, 'owner', job[1] or '', 'space', space,
             'result', result, 'created', fmt(t), 'attempts', 0)
  redis.call('ZADD', P .. 'uploads:due', t, seq)
  redis.call('HSET', P .. 'uploads:pending', id, seq)
end

-- A job leaves the history: its record of stored objects goes (the objects stay in the bucket).
local function forget_objects(id)
  local key = P .. 'objects:' .. id
  for _, file in ipairs(redis.call('HKEYS', key)) do
    local found = redis.call('HGET', P .. 'object_files', file)
    if found and cjson.decode(found).job_id == id then redis.call('HDEL', P .. 'object_files', file) end
  end
  redis.call('DEL', key)
end
"""

# Whether a job's `succeeded` webhook must wait: its upload is live and some node uploads (Lua, for the
# webhook claim: `job` is the delivery's job id).
UPLOAD_PENDING = (
    "redis.call('EXISTS', P .. 'output_store') == 1 and redis.call('HEXISTS', P .. 'uploads:pending', job) == 1"
)

# ARGV: P, now, limit, lease_s, location. The uploads claimed (their HGETALLs); `P output_store` kept alive.
CLAIM = rf"""
local P, t, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
redis.call('SET', P .. 'output_store', ARGV[5], 'EX', {ALIVE_S})
local claimed = {{}}
for _, seq in ipairs(redis.call('ZRANGEBYSCORE', P .. 'uploads:due', '-inf', t, 'LIMIT', 0, tonumber(ARGV[3]))) do
  local key = P .. 'upload:' .. seq
  if redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', P .. 'uploads:due', seq)
  else
    redis.call('HSET', key, 'lease_until', string.format('%.6f', t + lease))
    redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('ZADD', P .. 'uploads:due', t + lease, seq)
    claimed[#claimed + 1] = redis.call('HGETALL', key)
  end
end
return claimed
"""

# ARGV: P, seq, lease, job id, then (file, object JSON) pairs. 1, or 0 when the lease ran out meanwhile.
STORED = r"""
local P, seq, job = ARGV[1], ARGV[2], ARGV[4]
local key = P .. 'upload:' .. seq
if redis.call('HGET', key, 'lease_until') ~= ARGV[3] then return 0 end
redis.call('DEL', key)
redis.call('ZREM', P .. 'uploads:due', seq)
if redis.call('HGET', P .. 'uploads:pending', job) == seq then redis.call('HDEL', P .. 'uploads:pending', job) end
if redis.call('EXISTS', P .. 'job:' .. job) == 0 then return 1 end  -- deleted meanwhile: nothing to record
for i = 5, #ARGV, 2 do
  redis.call('HSET', P .. 'objects:' .. job, ARGV[i], ARGV[i + 1])
  redis.call('HSET', P .. 'object_files', ARGV[i], ARGV[i + 1])
end
return 1
"""

# ARGV: P, seq, lease, error, retry_at ('' : dead), now.
FAILED = r"""
local P, seq = ARGV[1], ARGV[2]
local key = P .. 'upload:' .. seq
if redis.call('HGET', key, 'lease_until') ~= ARGV[3] then return 0 end
redis.call('HSET', key, 'last_error', ARGV[4], 'lease_until', '')
if ARGV[5] == '' then
  local job = redis.call('HGET', key, 'job_id')
  redis.call('HSET', key, 'dead', ARGV[6])
  redis.call('ZREM', P .. 'uploads:due', seq)
  redis.call('ZADD', P .. 'uploads:dead', ARGV[6], seq)
  if redis.call('HGET', P .. 'uploads:pending', job) == seq then redis.call('HDEL', P .. 'uploads:pending', job) end
else
  redis.call('HSET', key, 'next_at', ARGV[5])
  redis.call('ZADD', P .. 'uploads:due', ARGV[5], seq)
end
return 1
"""


# ARGV: P, before. Uploads given up on before then go; how many.
FORGET_DEAD = r"""
local old = redis.call('ZRANGEBYSCORE', ARGV[1] .. 'uploads:dead', '-inf', ARGV[2])
for _, seq in ipairs(old) do redis.call('DEL', ARGV[1] .. 'upload:' .. seq) end
redis.call('ZREMRANGEBYSCORE', ARGV[1] .. 'uploads:dead', '-inf', ARGV[2])
return #old
"""


# ARGV: P, now, 'all' or 'these', then job ids. Uploads given up on go back to the outbox; how many.
RETRY = r"""
local P, t, all = ARGV[1], ARGV[2], ARGV[3] == 'all'
local wanted = {}
for i = 4, #ARGV do wanted[ARGV[i]] = true end
local count = 0
for _, seq in ipairs(redis.call('ZRANGE', P .. 'uploads:dead', 0, -1)) do
  local key = P .. 'upload:' .. seq
  local job = redis.call('HGET', key, 'job_id')
  if job and (all or wanted[job]) then
    redis.call('HSET', key, 'dead', '', 'attempts', 0, 'created', t, 'next_at', t, 'lease_until', '')
    redis.call('ZREM', P .. 'uploads:dead', seq)
    redis.call('ZADD', P .. 'uploads:due', t, seq)
    redis.call('HSET', P .. 'uploads:pending', job, seq)
    count = count + 1
  end
end
return count
"""


class RedisUploadOutbox:
    """A Redis queue's uploads outbox; `call` runs each Redis call (the queue's: an unreachable Redis is its
    QueueUnavailable)."""

    def __init__(self, client: redis.Redis, prefix: str, call: Callable[[Callable[[], Any]], Any]) -> None:
        self.redis, self.prefix, self._call = client, prefix, call
        self._scripts = {
            name: client.register_script(text)
            for name, text in (
                ("claim", CLAIM),
                ("stored", STORED),
                ("failed", FAILED),
                ("forget_dead", FORGET_DEAD),
                ("retry", RETRY),
            )
        }
        self.location = ""

    def close(self) -> None:
        pass  # the connection is the queue's

    def _run(self, script: str, *args: Any) -> Any:
        return self._call(lambda: self._scripts[script](args=[self.prefix, *args]))

    def use(self, location: str | None) -> None:
        """Uploads go to `location` from now on. None changes nothing: other nodes of the cluster may upload;
        when none does, the mark expires and jobs that end put nothing in the outbox."""
        if location is not None:
            self.location = location
            self._call(lambda: self.redis.set(self.prefix + "output_store", location, ex=ALIVE_S))

    def claim(self, now: float, limit: int, lease_s: float) -> list[Upload]:
        rows = self._run("claim", f"{now:.6f}", limit, lease_s, self.location)
        claimed = []
        for flat in rows:
            row = {outbox.text(flat[i]): outbox.text(flat[i + 1]) for i in range(0, len(flat), 2)}
            try:
                result = json.loads(row.get("result") or "{}")
            except ValueError:
                result = {}
            files = tuple(dict.fromkeys(output_files(result)))
            claimed.append(
                Upload(int(row["seq"]), row["job_id"], row["space"], files, float(row["created"]),
                       int(row["attempts"]), float(row["lease_until"]), row.get("owner", ""))
            )  # fmt: skip
        return sorted(claimed, key=lambda u: u.seq)

    def stored_as(self, space: str, file: OutputFile) -> StoredObject | None:
        found = self._call(lambda: self.redis.hget(self.prefix + "object_files", _field(space, file)))
        return None if found is None else _stored(json.loads(found))

    def stored(self, upload: Upload, objects: list[StoredObject]) -> bool:
        pairs = [
            part
            for found in objects
            for part in (_field(found.space, OutputFile(found.subfolder, found.filename)), json.dumps(found.__dict__))
        ]
        return bool(self._run("stored", upload.seq, f"{upload.lease_until:.6f}", upload.job_id, *pairs))

    def failed(self, upload: Upload, error: str, retry_at: float | None) -> None:
        retry = "" if retry_at is None else f"{retry_at:.6f}"
        self._run("failed", upload.seq, f"{upload.lease_until:.6f}", error[:500], retry, f"{time.time():.6f}")

    def forget_dead(self, before: float) -> int:
        return int(self._run("forget_dead", f"{before:.6f}"))

    def retry(self, job_ids: list[str] | None, now: float) -> int:
        return int(self._run("retry", f"{now:.6f}", "all" if job_ids is None else "these", *(job_ids or [])))

    def objects_of(self, job_ids: Iterable[str]) -> dict[str, list[StoredObject]]:
        wanted = list(dict.fromkeys(job_ids))

        def read() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            for job_id in wanted:
                pipe.hvals(f"{self.prefix}objects:{job_id}")
            return list(pipe.execute())

        found: dict[str, list[StoredObject]] = {}
        for job_id, values in zip(wanted, self._call(read), strict=True):
            if values:
                found[job_id] = [_stored(json.loads(value)) for value in values]
        return found

    def pending(self) -> list[dict[str, Any]]:
        def read() -> list[dict[str, str]]:
            seqs = [*self.redis.zrange(self.prefix + "uploads:due", 0, -1),
                    *self.redis.zrange(self.prefix + "uploads:dead", 0, -1)]  # fmt: skip
            pipe = self.redis.pipeline(transaction=False)
            for seq in sorted(seqs, key=lambda s: int(outbox.text(s))):
                pipe.hgetall(f"{self.prefix}upload:{outbox.text(seq)}")
            return [{outbox.text(k): outbox.text(v) for k, v in row.items()} for row in pipe.execute() if row]

        rows: list[dict[str, str]] = self._call(read)
        return [
            {"job_id": r["job_id"], "attempts": int(r["attempts"]), "error": r.get("last_error") or None,
             "created": float(r["created"]), "next_at": float(r.get("next_at") or r["created"]),
             "dead": float(r["dead"]) if r.get("dead") else None}
            for r in rows
        ]  # fmt: skip


def _field(space: str, file: OutputFile) -> str:
    return json.dumps([space, file.subfolder, file.filename])


def _stored(found: dict[str, Any]) -> StoredObject:
    return StoredObject(
        found["job_id"], found["space"], found["subfolder"], found["filename"], found["key"], int(found["size"]),
        int(found.get("mtime_ns", 0)),
    )  # fmt: skip
