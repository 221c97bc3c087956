"""The job store on Redis: several ingress replicas on different nodes share one set of jobs.

Same contract as `SQLiteJobStore` (serve_app/jobs.py). Every read-modify-write is one Lua
script, so it is atomic on the server: two replicas can never both claim an expired lease, and a
runner can never update a job that another replica has just finished or deleted.

Keys (all under `prefix`, default ``standin:``):
    job:<id>      hash of the job's fields; a field that is None is absent; `seq` orders jobs
    blobs:<id>    hash name → bytes (the upload, the encoded conditioning)
    seq           counter that numbers jobs in creation order (pagination)
    owner:-       sorted set seq → id of jobs created without an API key; owner:=<hash> per key
    active        sorted set id → lease expiry (0: no lease) of queued / in-progress jobs
    expiry        sorted set id → expires_at of terminal jobs (the result TTL)

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

from serve_app.jobs import ACTIVE, TERMINAL, Job, JobStore

log = logging.getLogger(__name__)

_INT = {"progress", "created_at", "started_at", "completed_at", "expires_at", "attempts"}
_FLOAT = {"lease_expires_at"}
_JSON = {"request"}
_FIELDS = {f.name for f in fields(Job)}

# Shared by every script: keep the three indexes in step with the job hash.
_PRELUDE = """
local p = ARGV[1]
local function owner_key(owner)
  if owner then return p .. 'owner:=' .. owner end
  return p .. 'owner:-'
end
local function is_active(status)
  return status == 'queued' or status == 'in_progress'
end
local function reindex(id)
  local jk = p .. 'job:' .. id
  local v = redis.call('HMGET', jk, 'status', 'lease_expires_at', 'expires_at')
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

# ARGV: prefix, id, owner ('' with has_owner '0' for None), has_owner, fields…, blobs (k, name, data…)
_CREATE = """
local id = ARGV[2]
local jk = p .. 'job:' .. id
if redis.call('EXISTS', jk) == 1 then return redis.error_reply('job ' .. id .. ' already exists') end
local seq = redis.call('INCR', p .. 'seq')
local i = apply(jk, 5)
redis.call('HSET', jk, 'seq', seq)
local k = tonumber(ARGV[i])
for j = 0, k - 1 do redis.call('HSET', p .. 'blobs:' .. id, ARGV[i + 1 + 2 * j], ARGV[i + 2 + 2 * j]) end
local owner = false
if ARGV[4] == '1' then owner = ARGV[3] end
redis.call('ZADD', owner_key(owner), seq, id)
reindex(id)
return seq
"""

# ARGV: prefix, id, drop_blobs ('1' when the job ends), fields… → 1 if updated
_UPDATE = """
local id = ARGV[2]
local jk = p .. 'job:' .. id
if not is_active(redis.call('HGET', jk, 'status')) then return 0 end
apply(jk, 4)
if ARGV[3] == '1' then redis.call('DEL', p .. 'blobs:' .. id) end
reindex(id)
return 1
"""

# ARGV: prefix, id → the removed job's hash (flat), or {} when it did not exist
_DELETE = """
local id = ARGV[2]
local jk = p .. 'job:' .. id
local row = redis.call('HGETALL', jk)
if #row == 0 then return row end
redis.call('ZREM', owner_key(redis.call('HGET', jk, 'owner')), id)
redis.call('DEL', jk, p .. 'blobs:' .. id)
redis.call('ZREM', p .. 'active', id)
redis.call('ZREM', p .. 'expiry', id)
return row
"""

# ARGV: prefix, id, owner, new expiry → 1 if `owner` still holds the lease of an active job
_RENEW = """
local id = ARGV[2]
local jk = p .. 'job:' .. id
local v = redis.call('HMGET', jk, 'status', 'lease_owner')
if not is_active(v[1]) or v[2] ~= ARGV[3] then return 0 end
redis.call('HSET', jk, 'lease_expires_at', ARGV[4])
redis.call('ZADD', p .. 'active', ARGV[4], id)
return 1
"""

# ARGV: prefix, owner, now, new expiry, limit → ids taken over (attempts + 1 each)
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', p .. 'active', '-inf', '(' .. ARGV[3], 'LIMIT', 0, tonumber(ARGV[5]))
for _, id in ipairs(ids) do
  local jk = p .. 'job:' .. id
  redis.call('HSET', jk, 'lease_owner', ARGV[2], 'lease_expires_at', ARGV[4])
  redis.call('HINCRBY', jk, 'attempts', 1)
  redis.call('ZADD', p .. 'active', ARGV[4], id)
end
return ids
"""

# ARGV: prefix, id, name, data → 1 if stored (a deleted job gets no orphan blobs)
_PUT_BLOB = """
if redis.call('EXISTS', p .. 'job:' .. ARGV[2]) == 0 then return 0 end
redis.call('HSET', p .. 'blobs:' .. ARGV[2], ARGV[3], ARGV[4])
return 1
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


class RedisJobStore(JobStore):
    """Jobs in one Redis database, shared by every ingress replica of the cluster."""

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
        self._update = self.redis.register_script(_PRELUDE + _UPDATE)
        self._delete = self.redis.register_script(_PRELUDE + _DELETE)
        self._renew = self.redis.register_script(_PRELUDE + _RENEW)
        self._claim = self.redis.register_script(_PRELUDE + _CLAIM)
        self._put_blob = self.redis.register_script(_PRELUDE + _PUT_BLOB)

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    def _owner_key(self, owner: str | None) -> str:
        return f"{self.prefix}owner:-" if owner is None else f"{self.prefix}owner:={owner}"

    def _jobs(self, ids: list[bytes] | list[str]) -> list[Job]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self._key("job", job_id.decode() if isinstance(job_id, bytes) else job_id))
        return [job for job in map(_decode, pipe.execute()) if job is not None]

    def create(self, job: Job, blobs: dict[str, bytes] | None = None) -> None:
        values = asdict(job)
        blob_args: list[Any] = [len(blobs or {})]
        for name, data in (blobs or {}).items():
            blob_args += [name, data]
        self._create(
            args=[
                self.prefix,
                job.id,
                job.owner or "",
                "0" if job.owner is None else "1",
                *_fields_args(values),
                *blob_args,
            ]
        )

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

    def update(self, job_id: str, **fields: Any) -> bool:
        if not fields:
            return self.get(job_id) is not None
        return bool(self._update(args=[self.prefix, job_id, "0", *_fields_args(fields)]))

    def finish(self, job_id: str, status: str, **fields: Any) -> bool:
        if status not in TERMINAL:
            raise ValueError(f"{status!r} is not a terminal status")
        fields = {"status": status, "lease_owner": None, "lease_expires_at": None, **fields}
        fields.setdefault("completed_at", int(time.time()))
        return bool(self._update(args=[self.prefix, job_id, "1", *_fields_args(fields)]))

    def delete(self, job_id: str) -> Job | None:
        flat = self._delete(args=[self.prefix, job_id])
        return _decode(dict(zip(flat[::2], flat[1::2], strict=True)))

    def renew_lease(self, job_id: str, owner: str, lease_s: float) -> bool:
        return bool(self._renew(args=[self.prefix, job_id, owner, repr(time.time() + lease_s)]))

    def claim_expired(self, owner: str, lease_s: float, limit: int = 8) -> list[Job]:
        now = time.time()
        ids = self._claim(args=[self.prefix, owner, repr(now), repr(now + lease_s), limit])
        claimed = self._jobs(ids)
        return [j for j in claimed if j.status in ACTIVE]

    def put_blob(self, job_id: str, name: str, data: bytes) -> None:
        self._put_blob(args=[self.prefix, job_id, name, data])

    def get_blob(self, job_id: str, name: str) -> bytes | None:
        data = self.redis.hget(self._key("blobs", job_id), name)
        return None if data is None else bytes(data)

    def delete_blob(self, job_id: str, name: str) -> None:
        self.redis.hdel(self._key("blobs", job_id), name)

    def expired(self, now: float, limit: int = 100) -> list[Job]:
        ids = self.redis.zrangebyscore(self.prefix + "expiry", "-inf", repr(now), start=0, num=limit)
        return [j for j in self._jobs(ids) if j.terminal]
