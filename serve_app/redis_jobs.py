"""The job store on Redis: several ingress replicas on different nodes share one set of jobs.

Same contract as `SQLiteJobStore` (serve_app/jobs.py). Every read-modify-write is one Lua
script, so it is atomic on the server: two runners can never both claim an expired lease, and a
run's writes apply only while the job still holds that run's lease (owner + attempt). Every
script publishes the id of the job it changed on `changes` (SSE streams are pushed from it).

Keys (all under `prefix`, default ``standin:``):
    job:<id>      hash of the job's fields; a field that is None is absent; `seq` orders jobs
    seq           counter that numbers jobs in creation order (pagination)
    owner:-       sorted set seq → id of jobs created without an API key; owner:=<hash> per key
    active        sorted set id → lease expiry (0: no lease) of queued / in-progress jobs
    queue         sorted set seq → id of queued jobs (queue positions)
    expiry        sorted set id → expires_at of terminal jobs (the result TTL)
    changes       pub/sub channel: ids of changed jobs

Durability is Redis's: run it with AOF (`appendonly yes`) so that accepted jobs survive a Redis
restart. The scripts touch keys they compute, so Redis Cluster (sharded) mode is not supported;
use a single primary (with replicas / Sentinel, or a managed single-shard Redis).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, fields
from typing import Any

import redis

from serve_app.jobs import ACTIVE, QUEUED, ChangeWatcher, Job, JobStore, Lease

log = logging.getLogger(__name__)

_INT = {"progress", "created_at", "started_at", "completed_at", "expires_at", "attempts", "rev"}
_FLOAT = {"lease_expires_at"}
_JSON = {"request"}
_FIELDS = {f.name for f in fields(Job)}

# Shared by every script: keep the indexes in step with the job hash; publish changes.
_PRELUDE = """
local p = ARGV[1]
local function owner_key(owner)
  if owner then return p .. 'owner:=' .. owner end
  return p .. 'owner:-'
end
local function is_active(status)
  return ACTIVE_TEST
end
local function changed(id)
  redis.call('PUBLISH', p .. 'changes', id)
end
-- the run (owner, attempt) still holds the lease of this active job
local function holds(jk, owner, attempt)
  local v = redis.call('HMGET', jk, 'status', 'lease_owner', 'attempts')
  return is_active(v[1]) and v[2] == owner and v[3] == attempt
end
local function reindex(id)
  local jk = p .. 'job:' .. id
  local v = redis.call('HMGET', jk, 'status', 'lease_expires_at', 'expires_at', 'seq')
  if v[1] == 'QUEUED_STATUS' then redis.call('ZADD', p .. 'queue', v[4], id)
  else redis.call('ZREM', p .. 'queue', id) end
  if is_active(v[1]) then
    redis.call('ZADD', p .. 'active', v[2] or '0', id)
    redis.call('ZREM', p .. 'expiry', id)
  else
    redis.call('ZREM', p .. 'active', id)
    if v[3] then redis.call('ZADD', p .. 'expiry', v[3], id)
    else redis.call('ZREM', p .. 'expiry', id) end
  end
end
-- ARGV[i] = n, then n (name, value) pairs, then m, then m names to delete → next index
local function apply(jk, i)
  local n = tonumber(ARGV[i])
  for j = 0, n - 1 do redis.call('HSET', jk, ARGV[i + 1 + 2 * j], ARGV[i + 2 + 2 * j]) end
  i = i + 1 + 2 * n
  local m = tonumber(ARGV[i])
  for j = 1, m do redis.call('HDEL', jk, ARGV[i + j]) end
  return i + 1 + m
end
"""

# The statuses come from serve_app.jobs, the one place that lists them.
_PRELUDE = _PRELUDE.replace("ACTIVE_TEST", " or ".join(f"status == '{s}'" for s in ACTIVE)).replace(
    "QUEUED_STATUS", QUEUED
)

# ARGV: prefix, id, owner ('' with has_owner '0' for None), has_owner, fields…
_CREATE = """
local id = ARGV[2]
local jk = p .. 'job:' .. id
if redis.call('EXISTS', jk) == 1 then return redis.error_reply('job ' .. id .. ' already exists') end
local seq = redis.call('INCR', p .. 'seq')
apply(jk, 5)
redis.call('HSET', jk, 'seq', seq)
local owner = false
if ARGV[4] == '1' then owner = ARGV[3] end
redis.call('ZADD', owner_key(owner), seq, id)
reindex(id)
changed(id)
return seq
"""

# ARGV: prefix, id, lease owner, attempt, fields… → 1 if the job still held that lease
_FENCED_UPDATE = """
local id = ARGV[2]
local jk = p .. 'job:' .. id
if not holds(jk, ARGV[3], ARGV[4]) then return 0 end
apply(jk, 5)
redis.call('HINCRBY', jk, 'rev', 1)
reindex(id)
changed(id)
return 1
"""

# ARGV: prefix, id → the removed job's hash (flat), or {} when it did not exist
_DELETE = """
local id = ARGV[2]
local jk = p .. 'job:' .. id
local row = redis.call('HGETALL', jk)
if #row == 0 then return row end
redis.call('ZREM', owner_key(redis.call('HGET', jk, 'owner')), id)
redis.call('DEL', jk)
redis.call('ZREM', p .. 'active', id)
redis.call('ZREM', p .. 'queue', id)
redis.call('ZREM', p .. 'expiry', id)
changed(id)
return row
"""

# ARGV: prefix, owner, new expiry, n, then n (id, attempt) pairs → ids whose lease `owner` holds
_RENEW = """
local held = {}
local n = tonumber(ARGV[4])
for j = 0, n - 1 do
  local id = ARGV[5 + 2 * j]
  local jk = p .. 'job:' .. id
  if holds(jk, ARGV[2], ARGV[6 + 2 * j]) then
    redis.call('HSET', jk, 'lease_expires_at', ARGV[3])
    redis.call('ZADD', p .. 'active', ARGV[3], id)
    table.insert(held, id)
  end
end
return held
"""

# ARGV: prefix, owner, now, new expiry, limit → ids taken over (attempts + 1 each), oldest first
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', p .. 'active', '-inf', '(' .. ARGV[3])
local rows = {}
for _, id in ipairs(ids) do
  table.insert(rows, {tonumber(redis.call('HGET', p .. 'job:' .. id, 'seq')), id})
end
table.sort(rows, function(a, b) return a[1] < b[1] end)
local taken = {}
for k = 1, math.min(#rows, tonumber(ARGV[5])) do
  local id = rows[k][2]
  local jk = p .. 'job:' .. id
  redis.call('HSET', jk, 'lease_owner', ARGV[2], 'lease_expires_at', ARGV[4])
  redis.call('HINCRBY', jk, 'attempts', 1)
  redis.call('HINCRBY', jk, 'rev', 1)
  redis.call('ZADD', p .. 'active', ARGV[4], id)
  changed(id)
  table.insert(taken, id)
end
return taken
"""


def _encode(name: str, value: Any) -> str:
    if name in _JSON:
        return json.dumps(value)
    if name in _FLOAT:
        return repr(float(value))
    if name in _INT:
        return str(int(value))
    return str(value)


def _fields_args(values: dict[str, Any]) -> list[Any]:
    """→ [n, name, value…, m, name…]: set the non-None fields, delete the None ones."""
    unknown = set(values) - _FIELDS
    if unknown:
        raise ValueError(f"unknown job fields {sorted(unknown)}")
    sets = [(k, _encode(k, v)) for k, v in values.items() if v is not None]
    dels = [k for k, v in values.items() if v is None]
    return [len(sets), *(x for kv in sets for x in kv), len(dels), *dels]


def _decode(row: dict[bytes, bytes]) -> Job | None:
    if not row:
        return None
    values: dict[str, Any] = {"owner": None}  # absent field = None; owner has no default
    for raw_name, raw in row.items():
        name = raw_name.decode()
        if name not in _FIELDS:
            continue  # seq
        text = raw.decode()
        if name in _JSON:
            values[name] = json.loads(text)
        elif name in _FLOAT:
            values[name] = float(text)
        elif name in _INT:
            values[name] = int(text)
        else:
            values[name] = text
    return Job(**values)


class _RedisWatcher(ChangeWatcher):
    """Pushed: every script publishes the id of the job it changed on `<prefix>changes`."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(channel)

    def wait(self, timeout_s: float) -> set[str] | None:
        ids: set[str] = set()
        message = self.pubsub.get_message(timeout=timeout_s)
        while message is not None:
            if message.get("type") == "message":
                ids.add(message["data"].decode())
            message = self.pubsub.get_message(timeout=0)
        return ids

    def close(self) -> None:
        self.pubsub.close()


class RedisJobStore(JobStore):
    """Jobs in one Redis database, shared by every Ingress and JobRunner replica of the cluster."""

    def __init__(self, url: str, prefix: str = "standin:", timeout_s: float = 10.0) -> None:
        self.prefix = prefix
        # One client per store; redis-py's connection pool makes it safe across threads.
        self.redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=30,
            retry_on_timeout=True,
        )
        self._create = self.redis.register_script(_PRELUDE + _CREATE)
        self._fenced = self.redis.register_script(_PRELUDE + _FENCED_UPDATE)
        self._delete = self.redis.register_script(_PRELUDE + _DELETE)
        self._renew = self.redis.register_script(_PRELUDE + _RENEW)
        self._claim = self.redis.register_script(_PRELUDE + _CLAIM)

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    def _owner_key(self, owner: str | None) -> str:
        return f"{self.prefix}owner:-" if owner is None else f"{self.prefix}owner:={owner}"

    def _jobs(self, ids: list[bytes] | list[str]) -> list[Job]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self._key("job", job_id.decode() if isinstance(job_id, bytes) else job_id))
        return [job for job in map(_decode, pipe.execute()) if job is not None]

    def create(self, job: Job) -> None:
        owner = ["", "0"] if job.owner is None else [job.owner, "1"]
        self._create(args=[self.prefix, job.id, *owner, *_fields_args(asdict(job))])

    def get(self, job_id: str) -> Job | None:
        return _decode(self.redis.hgetall(self._key("job", job_id)))

    def list(self, owner: str | None, limit: int, after: str | None = None, order: str = "desc") -> list[Job]:
        key = self._owner_key(owner)
        desc = order != "asc"
        start: str = "+inf" if desc else "-inf"
        if after is not None:
            seq = self.redis.hget(self._key("job", after), "seq")
            if seq is not None:
                start = f"({seq.decode()}"  # exclusive: strictly after the cursor
        if desc:
            ids = self.redis.zrevrangebyscore(key, start, "-inf", start=0, num=limit)
        else:
            ids = self.redis.zrangebyscore(key, start, "+inf", start=0, num=limit)
        return self._jobs(ids)

    def count_active(self) -> int:
        return int(self.redis.zcard(self.prefix + "active"))

    def queue_position(self, job_id: str) -> int | None:
        rank = self.redis.zrank(self.prefix + "queue", job_id)
        return None if rank is None else int(rank) + 1

    def claim(self, owner: str, lease_s: float, limit: int) -> list[Job]:
        now = time.time()
        ids = self._claim(args=[self.prefix, owner, repr(now), repr(now + lease_s), limit])
        return [j for j in self._jobs(ids) if j.status in ACTIVE]

    def renew(self, owner: str, leases: dict[str, int], lease_s: float) -> set[str]:
        if not leases:
            return set()
        pairs = [x for job_id, attempt in leases.items() for x in (job_id, str(attempt))]
        held = self._renew(args=[self.prefix, owner, repr(time.time() + lease_s), len(leases), *pairs])
        return {h.decode() for h in held}

    def _fenced_update(self, job_id: str, lease: Lease, fields: dict[str, Any]) -> bool:
        args = [self.prefix, job_id, lease.owner, str(lease.attempt), *_fields_args(fields)]
        return bool(self._fenced(args=args))

    def delete(self, job_id: str) -> Job | None:
        flat = self._delete(args=[self.prefix, job_id])
        return _decode(dict(zip(flat[::2], flat[1::2], strict=True)))

    def expired(self, now: float, limit: int = 100) -> list[Job]:
        ids = self.redis.zrangebyscore(self.prefix + "expiry", "-inf", repr(now), start=0, num=limit)
        return [j for j in self._jobs(ids) if j.terminal]

    def watch(self) -> ChangeWatcher:
        return _RedisWatcher(self.redis, self.prefix + "changes")
