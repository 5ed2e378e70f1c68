"""Idempotency keys and asset records of a cluster, in the queue's Redis, so every API node sees the same.

Keys (under the queue's prefix): `idem:<owner>:<key>` (SET NX with a TTL), `asset:<id>` (the record as
JSON), `asset_hash:<owner>:<hash>`, `asset_place:<place>` and `asset_job:<job>` (sets of ids: which records
share uploaded bytes, a file, a job), `assets_expiring` (ids by expiry). Changes of several keys are Lua scripts:
each is atomic, so two API nodes never leave an index naming a record that is gone.
"""

from __future__ import annotations

import json
from typing import Any

from zimage_serve.queue.redis_queue import RedisQueue
from zimage_serve.records.contract import KEY_TTL_S, Asset

ADD = """
local prefix, id, record, owner, place, hash, expires = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local job = ARGV[8]
local key = prefix .. 'asset:' .. id
if redis.call('SET', key, record, 'NX') then
    redis.call('SADD', prefix .. 'asset_place:' .. place, id)
    if job ~= '' then redis.call('SADD', prefix .. 'asset_job:' .. job, id) end
    if hash ~= '' then redis.call('SADD', prefix .. 'asset_hash:' .. owner .. ':' .. hash, id) end
    if expires ~= '' then redis.call('ZADD', prefix .. 'assets_expiring', tonumber(expires), id) end
end
return redis.call('GET', key)
"""
DELETE = """
local prefix, id = ARGV[1], ARGV[2]
local key = prefix .. 'asset:' .. id
local text = redis.call('GET', key)
if not text then return false end
local record = cjson.decode(text)
local place = (record.place.space or '') .. '/' .. record.place.type .. '/' .. record.place.subfolder .. '/'
    .. record.place.filename
local places = prefix .. 'asset_place:' .. place
redis.call('DEL', key)
redis.call('SREM', places, id)
if type(record.hash) == 'string' then
    redis.call('SREM', prefix .. 'asset_hash:' .. record.owner .. ':' .. record.hash, id)
end
redis.call('ZREM', prefix .. 'assets_expiring', id)
if type(record.job_id) == 'string' then redis.call('SREM', prefix .. 'asset_job:' .. record.job_id, id) end
return {text, redis.call('SCARD', places)}
"""
FORGET_OUTPUTS = """
local prefix = ARGV[1]
local forgotten = 0
for i = 2, #ARGV do
    local outputs = prefix .. 'asset_job:' .. ARGV[i]
    for _, id in ipairs(redis.call('SMEMBERS', outputs)) do
        local key = prefix .. 'asset:' .. id
        local text = redis.call('GET', key)
        if text then
            local record = cjson.decode(text)
            local place = (record.place.space or '') .. '/' .. record.place.type .. '/' .. record.place.subfolder
                .. '/' .. record.place.filename
            redis.call('SREM', prefix .. 'asset_place:' .. place, id)
            redis.call('DEL', key)
            forgotten = forgotten + 1
        end
    end
    redis.call('DEL', outputs)
end
return forgotten
"""
SET_HASH = """
local prefix, id, hash = ARGV[1], ARGV[2], ARGV[3]
local key = prefix .. 'asset:' .. id
local text = redis.call('GET', key)
if not text then return 0 end
local record = cjson.decode(text)
record.hash = hash
redis.call('SET', key, cjson.encode(record))
if record.job_id == cjson.null or record.job_id == nil then
    redis.call('SADD', prefix .. 'asset_hash:' .. record.owner .. ':' .. hash, id)
end
return 1
"""


class RedisRecords:
    def __init__(self, queue: RedisQueue) -> None:
        self.queue, self.redis, self.prefix = queue, queue.redis, queue.prefix
        self._add = self.redis.register_script(ADD)
        self._delete = self.redis.register_script(DELETE)
        self._set_hash = self.redis.register_script(SET_HASH)
        self._forget_outputs = self.redis.register_script(FORGET_OUTPUTS)

    def close(self) -> None:
        pass  # the connection is the queue's

    # -- idempotency keys ----------------------------------------------------------------------------
    def claim_key(self, owner: str, key: str, ttl_s: float = KEY_TTL_S) -> bool:
        name = f"{self.prefix}idem:{owner}:{key}"
        return bool(self.queue.call(lambda: self.redis.set(name, "1", nx=True, px=max(1, int(ttl_s * 1000)))))

    def release_key(self, owner: str, key: str) -> None:
        self.queue.call(lambda: self.redis.delete(f"{self.prefix}idem:{owner}:{key}"))

    # -- assets --------------------------------------------------------------------------------------
    def add_asset(self, asset: Asset) -> Asset:
        place = asset.place
        args = [
            self.prefix,
            asset.id,
            json.dumps(asset.to_json()),
            asset.owner,
            place.key,
            asset.hash if asset.hash is not None and asset.job_id is None else "",
            "" if asset.expires is None else repr(asset.expires),
            asset.job_id or "",
        ]
        stored: str = self.queue.call(lambda: self._add(args=args))
        return Asset.of(json.loads(stored))

    def asset(self, asset_id: str) -> Asset | None:
        text = self.queue.call(lambda: self.redis.get(f"{self.prefix}asset:{asset_id}"))
        return None if text is None else Asset.of(json.loads(text))

    def with_hash(self, owner: str, hash: str) -> Asset | None:
        found = self.queue.call(lambda: self.redis.srandmember(f"{self.prefix}asset_hash:{owner}:{hash}"))
        return None if found is None else self.asset(str(found))

    def set_hash(self, asset_id: str, hash: str) -> None:
        self.queue.call(lambda: self._set_hash(args=[self.prefix, asset_id, hash]))

    def delete_asset(self, asset_id: str) -> tuple[Asset, bool] | None:
        found: Any = self.queue.call(lambda: self._delete(args=[self.prefix, asset_id]))
        if not found:
            return None
        text, left = found
        return Asset.of(json.loads(text)), int(left) == 0

    def forget_outputs(self, job_ids: list[str]) -> int:
        if not job_ids:
            return 0
        return int(self.queue.call(lambda: self._forget_outputs(args=[self.prefix, *job_ids])))

    def expired_assets(self, now: float, limit: int = 100) -> list[Asset]:
        ids = self.queue.call(
            lambda: self.redis.zrangebyscore(f"{self.prefix}assets_expiring", "-inf", now, start=0, num=limit)
        )
        found = [self.asset(str(i)) for i in ids]
        return [asset for asset in found if asset is not None]
