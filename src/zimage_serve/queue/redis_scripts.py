"""The Lua scripts of the Redis queue (`queue/redis_queue.py`): each change of a job is one script, so it
is atomic for every API node and worker, and one round trip.

Keys, under the queue's prefix P (`zimage:` unless the URL names another):
- `P job:<id>`: a hash, the job (its JSON texts as stored, its state, times, attempts, owner, worker, lease);
  `m` is its member in the sorted sets below: the submission sequence, zero-padded, then the id, so that
  jobs of one score sort in submission order;
- `P pending` (score: number), `P running` (score: start), `P history` (score: end), and the same three per
  owner, `P owner:<owner>:<state>` (the local operator's jobs are owner ""'s); `P waiting`: the owners
  with jobs waiting, among whom claims share the workers fairly;
- `P held:<worker>`: the ids a worker runs, whose leases its heartbeats renew;
- `P history_owners`: history entries per owner (score), whose largest lose entries first past the total;
- `P counts`: jobs per state; `P seq`, `P number`: counters; `P usage:<day>`: jobs and images per owner;
- `P audit`: a stream, every job's end, written in the script that records it (the audit log's outbox);
- `P control`: the channel that wakes workers when jobs are queued;
- `P webhook:...`: the webhook endpoints and the outbox the scripts write each job's events to
  (webhooks/redis_store.py); `P upload...`, `P objects:<id>`: the output store's outbox and record
  (storage/redis_uploads.py).

Times are Redis' own clock (TIME), so leases mean the same on every machine; ARGV[2], when not empty, is
the time to use instead (a queue given a clock: the tests' own, so lease tests need not sleep). Numbers
written back by Lua are formatted with six decimals: Lua's own conversion keeps only 14 digits.
"""

from __future__ import annotations

from zimage_serve.storage.redis_uploads import FINISH_HOOK
from zimage_serve.webhooks.redis_store import EVENT_HOOK

PRELUDE = (
    r"""
local P = ARGV[1]
local CLOCK = ARGV[2]

local function now()
  if CLOCK ~= '' then
    return tonumber(CLOCK)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function fmt(x)
  return string.format('%.6f', x)
end

"""
    + EVENT_HOOK
    + FINISH_HOOK
    + r"""
local function owned(owner, state)
  return P .. 'owner:' .. owner .. ':' .. state
end

-- Every owner's jobs are also in sorted sets of their own (the local operator's, owner '', too: fair
-- share counts it as one owner); `P waiting` holds the owners with jobs waiting.
local function move(m, owner, from, to, score)
  local removed = redis.call('ZREM', P .. from, m)
  redis.call('ZREM', owned(owner, from), m)
  if from == 'history' and removed == 1 then
    if tonumber(redis.call('ZINCRBY', P .. 'history_owners', -1, owner)) <= 0 then
      redis.call('ZREM', P .. 'history_owners', owner)
    end
  end
  if to ~= nil then
    redis.call('ZADD', P .. to, score, m)
    redis.call('ZADD', owned(owner, to), score, m)
    if to == 'pending' then redis.call('SADD', P .. 'waiting', owner) end
    if to == 'history' then redis.call('ZINCRBY', P .. 'history_owners', 1, owner) end
  end
end

local function counted(from, to)
  if from ~= nil then redis.call('HINCRBY', P .. 'counts', from, -1) end
  if to ~= nil then redis.call('HINCRBY', P .. 'counts', to, 1) end
end

local function where(state)
  if state == 'pending' or state == 'running' then return state end
  return 'history'
end

-- Fair share: the next job is the first waiting job (by its number) of the owner with the fewest jobs
-- running; ties go to the owner whose that job was submitted first. A number or `front` orders only the
-- owner's own jobs: it never jumps another owner's. One owner: plain queue order.
local function next_member()
  local best, best_running = nil, nil
  for _, owner in ipairs(redis.call('SMEMBERS', P .. 'waiting')) do
    local head = redis.call('ZRANGE', owned(owner, 'pending'), 0, 0, 'WITHSCORES')
    if #head == 0 then
      redis.call('SREM', P .. 'waiting', owner)
    else
      local running = redis.call('ZCARD', owned(owner, 'running'))
      -- members begin with the zero-padded submission sequence: comparing them compares submissions
      if best == nil or running < best_running or (running == best_running and head[1] < best) then
        best, best_running = head[1], running
      end
    end
  end
  return best
end

-- The next pending job, now running and leased to `worker`: its fields (HGETALL), or false.
local function claim(worker, lease_s, t)
  while true do
    local m = next_member()
    if m == nil then return false end
    local id = string.sub(m, 18)
    local key = P .. 'job:' .. id
    local owner = redis.call('HGET', key, 'owner')
    if not owner then
      redis.call('ZREM', P .. 'pending', m)  -- a member whose job is gone: never handed out
      for _, o in ipairs(redis.call('SMEMBERS', P .. 'waiting')) do redis.call('ZREM', owned(o, 'pending'), m) end
    else
      local started = fmt(t)
      move(m, owner, 'pending', 'running', started)
      redis.call('HSET', key, 'state', 'running', 'started', started, 'worker', worker,
                 'lease', fmt(t + tonumber(lease_s)))
      redis.call('HINCRBY', key, 'attempts', 1)
      if worker ~= '' then redis.call('SADD', P .. 'held:' .. worker, id) end
      counted('pending', 'running')
      webhook_event(id, 'started')
      return redis.call('HGETALL', key)
    end
  end
end

-- The oldest `count` history entries of `owner`, removed with their jobs.
local function drop_oldest(owner, count)
  for _, m in ipairs(redis.call('ZRANGE', owned(owner, 'history'), 0, count - 1)) do
    local key = P .. 'job:' .. string.sub(m, 18)
    local state = redis.call('HGET', key, 'state')
    move(m, owner, 'history', nil, 0)
    if state then
      counted(state, nil)
      redis.call('DEL', key)
      forget_objects(string.sub(m, 18))
    end
  end
end

-- `P history_owners` (entries per owner), for a queue that kept history before it existed.
local function count_history_owners()
  if redis.call('EXISTS', P .. 'history_owners') == 1 then return end
  for _, m in ipairs(redis.call('ZRANGE', P .. 'history', 0, -1)) do
    local o = redis.call('HGET', P .. 'job:' .. string.sub(m, 18), 'owner')
    if o then redis.call('ZINCRBY', P .. 'history_owners', 1, o) end
  end
end

-- Each owner keeps their newest `per_owner` entries; beyond `total` for everyone, the largest owners lose
-- their oldest first, down to 99 % of it.
local function trim_history(owner, per_owner, total)
  local excess = redis.call('ZCARD', owned(owner, 'history')) - per_owner
  if excess > 0 then drop_oldest(owner, excess) end
  local count = redis.call('ZCARD', P .. 'history')
  if count <= total then return end
  local target = total - math.floor(total / 100)
  while count > target do
    local largest = redis.call('ZREVRANGE', P .. 'history_owners', 0, 1, 'WITHSCORES')
    if #largest == 0 then return end
    local next_size = 0
    if #largest >= 4 then next_size = tonumber(largest[4]) end
    local take = math.min(count - target, math.max(1, tonumber(largest[2]) - next_size))
    local before = redis.call('ZCARD', P .. 'history')
    drop_oldest(largest[1], take)
    count = redis.call('ZCARD', P .. 'history')
    if count == before then return end
  end
end

-- A running job's end (or, `from` 'pending', a waiting job's, canceled before it ran): its state, result
-- and history entry, and a copy in the audit outbox.
local function finish(id, state, result, t, per_owner, total, worker, from)
  from = from or 'running'
  local key = P .. 'job:' .. id
  local fields = redis.call('HMGET', key, 'state', 'm', 'owner', 'worker')
  if fields[1] ~= from then return false end
  -- Fenced: a worker whose lease ran out, and whose job another worker took, records nothing.
  if worker ~= nil and worker ~= '' and fields[4] ~= worker then return false end
  local finished = fmt(t)
  count_history_owners()
  redis.call('HSET', key, 'state', state, 'finished', finished, 'result', result)
  move(fields[2], fields[3], from, 'history', finished)
  if fields[4] and fields[4] ~= '' then redis.call('SREM', P .. 'held:' .. fields[4], id) end
  counted(from, state)
  local job = redis.call('HMGET', key, 'owner', 'context', 'created', 'started')
  redis.call('XADD', P .. 'audit', 'MAXLEN', '~', 100000, '*', 'job_id', id, 'owner', job[1],
             'context', job[2], 'state', state, 'created', job[3], 'started', job[4] or '', 'finished', finished,
             'result', result)
  trim_history(fields[3], tonumber(per_owner), tonumber(total))
  output_upload(id, state, result)
  webhook_end(id, state, result)
  return true
end
"""
)

# ARGV: P, clock, max_pending, day, then 12 per job: id, number, prompt, extra_data, outputs, context, owner,
# max_queued ('' for none), images_per_day ('' for none), images, the webhook it names and its labels (JSON;
# both '' for none). Each job's answer: 'ok:<created>',
# 'full', 'dup', or 'quota:<which>:<used>'.
ENQUEUE = (
    PRELUDE
    + r"""
local max_pending = tonumber(ARGV[3])
local day = ARGV[4]
local t = fmt(now())
local pending = tonumber(redis.call('HGET', P .. 'counts', 'pending') or '0')
local answers = {}
local stored = 0
for b = 5, #ARGV, 12 do
  local id, number, owner = ARGV[b], ARGV[b + 1], ARGV[b + 6]
  local max_queued, per_day, images = ARGV[b + 7], ARGV[b + 8], tonumber(ARGV[b + 9])
  local key = P .. 'job:' .. id
  local answer = nil
  if pending >= max_pending then answer = 'full' end
  if answer == nil and owner ~= '' and max_queued ~= '' then
    local queued = redis.call('ZCARD', owned(owner, 'pending')) + redis.call('ZCARD', owned(owner, 'running'))
    if queued + 1 > tonumber(max_queued) then answer = 'quota:max_queued:' .. (queued + 1) end
  end
  if answer == nil and owner ~= '' and per_day ~= '' then
    local used = tonumber(redis.call('HGET', P .. 'usage:' .. day, 'images:' .. owner) or '0') + images
    if used > tonumber(per_day) then answer = 'quota:images_per_day:' .. used end
  end
  if answer == nil and redis.call('EXISTS', key) == 1 then answer = 'dup' end
  if answer == nil then
    local m = string.format('%016d', redis.call('INCR', P .. 'seq')) .. ':' .. id
    redis.call('HSET', key, 'id', id, 'm', m, 'number', number, 'prompt', ARGV[b + 2], 'extra_data', ARGV[b + 3],
               'outputs', ARGV[b + 4], 'context', ARGV[b + 5], 'owner', owner, 'state', 'pending',
               'attempts', 0, 'created', t, 'worker', '', 'webhook', ARGV[b + 10], 'labels', ARGV[b + 11])
    redis.call('ZADD', P .. 'pending', number, m)
    redis.call('ZADD', owned(owner, 'pending'), number, m)
    redis.call('SADD', P .. 'waiting', owner)
    if owner ~= '' then
      redis.call('SADD', P .. 'owners', owner)
      redis.call('HINCRBY', P .. 'usage:' .. day, 'jobs:' .. owner, 1)
      redis.call('HINCRBY', P .. 'usage:' .. day, 'images:' .. owner, images)
      redis.call('EXPIRE', P .. 'usage:' .. day, 40 * 86400)
    end
    counted(nil, 'pending')
    webhook_event(id, 'queued')
    pending = pending + 1
    stored = stored + 1
    answer = 'ok:' .. t
  end
  answers[#answers + 1] = answer
end
if stored > 0 then redis.call('PUBLISH', P .. 'control', '{"type":"Wake"}') end
return answers
"""
)

# ARGV: P, clock, owner, day, images (negative: given back), allowed ('' for none). Answers 'ok' or the count
# the images would have made.
COUNT_IMAGES = r"""
local key, field, images = ARGV[1] .. 'usage:' .. ARGV[4], 'images:' .. ARGV[3], tonumber(ARGV[5])
local used = tonumber(redis.call('HGET', key, field) or '0') + images
if images > 0 and ARGV[6] ~= '' and used > tonumber(ARGV[6]) then return tostring(used) end
redis.call('HSET', key, field, math.max(0, used))
redis.call('EXPIRE', key, 40 * 86400)
return 'ok'
"""

# ARGV: P, clock, worker, lease_s
CLAIM = PRELUDE + "\nreturn claim(ARGV[3], ARGV[4], now())\n"

# ARGV: P, clock, id, state, result, claim_next ('1' or '0'), worker, lease_s, history per owner and in all
FINISH = (
    PRELUDE
    + r"""
local t = now()
finish(ARGV[3], ARGV[4], ARGV[5], t, ARGV[9], ARGV[10], ARGV[7])
if ARGV[6] == '1' then return claim(ARGV[7], ARGV[8], t) end
return false
"""
)

# ARGV: P, clock, worker, lease_s. Renews the leases of the jobs the worker runs; how many.
HEARTBEAT = (
    PRELUDE
    + r"""
local worker = ARGV[3]
local lease = fmt(now() + tonumber(ARGV[4]))
local renewed = 0
for _, id in ipairs(redis.call('SMEMBERS', P .. 'held:' .. worker)) do
  local key = P .. 'job:' .. id
  local fields = redis.call('HMGET', key, 'state', 'worker')
  if fields[1] == 'running' and fields[2] == worker then
    redis.call('HSET', key, 'lease', lease)
    renewed = renewed + 1
  else
    redis.call('SREM', P .. 'held:' .. worker, id)
  end
end
return renewed
"""
)

# ARGV: P, clock, id, how ('requeue': as if never started, the attempt not counted; 'retry': queued again;
# 'fail': ended as an error with `result`), result, expected worker, expected lease (both '*' for any),
# history per owner and in all. 1 if the job was running (and held as expected) and was moved, else 0.
RELEASE = (
    PRELUDE
    + r"""
local id, how, result = ARGV[3], ARGV[4], ARGV[5]
local key = P .. 'job:' .. id
local fields = redis.call('HMGET', key, 'state', 'm', 'owner', 'worker', 'lease', 'number', 'attempts')
if fields[1] ~= 'running' then return 0 end
if ARGV[6] ~= '*' and (fields[4] ~= ARGV[6] or fields[5] ~= ARGV[7]) then return 0 end
if how == 'fail' then
  finish(id, 'error', result, now(), ARGV[8], ARGV[9])
  return 1
end
move(fields[2], fields[3], 'running', 'pending', fields[6])
redis.call('HSET', key, 'state', 'pending', 'started', '', 'worker', '', 'lease', '')
if how == 'requeue' then
  redis.call('HSET', key, 'attempts', math.max(0, tonumber(fields[7]) - 1))
end
if fields[4] ~= '' then redis.call('SREM', P .. 'held:' .. fields[4], id) end
counted('running', 'pending')
redis.call('PUBLISH', P .. 'control', '{"type":"Wake"}')
return 1
"""
)

# ARGV: P, clock, id, result, per_owner, total. A waiting job ends canceled, never having run: 1, or 0 if it
# was not waiting.
CANCEL_WAITING = (
    PRELUDE
    + r"""
if finish(ARGV[3], 'interrupted', ARGV[4], now(), ARGV[5], ARGV[6], '', 'pending') then return 1 end
return 0
"""
)

# ARGV: P, clock, which ('pending' or 'history'), owner filter ('*' for everyone), then ids (none: all of them).
DELETE = (
    PRELUDE
    + r"""
local which, owner = ARGV[3], ARGV[4]
local ids = {}
if #ARGV == 4 then
  local set = P .. which
  if owner ~= '*' then set = owned(owner, which) end
  for _, m in ipairs(redis.call('ZRANGE', set, 0, -1)) do ids[#ids + 1] = string.sub(m, 18) end
else
  for i = 5, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local removed = 0
for _, id in ipairs(ids) do
  local key = P .. 'job:' .. id
  local fields = redis.call('HMGET', key, 'state', 'm', 'owner')
  local mine = owner == '*' or (owner ~= '' and fields[3] == owner)
  if fields[1] and where(fields[1]) == which and mine then
    if which == 'pending' then webhook_event(id, 'canceled') end  -- a waiting job deleted: it never ran
    move(fields[2], fields[3], which, nil, 0)
    redis.call('DEL', key)
    if which == 'history' then forget_objects(id) end
    counted(fields[1], nil)
    removed = removed + 1
  end
end
return removed
"""
)

# ARGV: P, clock, sorted set (under P), start, stop, then the fields to read. One consistent page: for each
# member in the range, its job's fields (jobs removed meanwhile cannot appear).
PAGE = (
    PRELUDE
    + r"""
local rows = {}
for _, m in ipairs(redis.call('ZRANGE', P .. ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))) do
  local key = P .. 'job:' .. string.sub(m, 18)
  if ARGV[6] == '*' then
    local all = redis.call('HGETALL', key)
    if #all > 0 then rows[#rows + 1] = all end
  else
    local fields = {}
    for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
    local values = redis.call('HMGET', key, unpack(fields))
    if values[1] then rows[#rows + 1] = values end
  end
end
return rows
"""
)
