"""Durable job state: the `JobStore` interface, its SQLite (WAL) implementation, and
`AsyncJobStore`, which runs every store call on worker threads so no event loop ever blocks on it.

Life of a job: the Ingress inserts it `queued` with no lease (attempts 0). A JobRunner *claims* it:
one atomic write sets `lease_owner` to the runner and adds one to `attempts`. That pair is the run's
`Lease`, its fence: every later write of the run (`update`, `retry`, `finish`) is conditional on the
job still holding exactly that lease, so a run that lost its lease (its runner was presumed dead and
another claimed the job) can neither progress, finish, fail nor retry the job. The runner renews all
its leases in one call (`renew`); a job whose lease expired is claimed again by any runner.
`status` stays `queued` until the DiT replica actually starts the job (then `in_progress`).

Large inputs (the uploaded image, the encoded conditioning) live in the results store, never here.
`rev` counts the writes to a job (SSE event ids). `RedisJobStore` (serve_app/redis_jobs.py)
implements the same interface for multi-node clusters; `open_job_store` picks one from the settings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serve_app.settings import ServeSettings

log = logging.getLogger(__name__)

QUEUED = "queued"
IN_PROGRESS = "in_progress"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
ACTIVE = (QUEUED, IN_PROGRESS)
TERMINAL = (COMPLETED, FAILED, CANCELLED)


@dataclass
class Job:
    """One video job. `request` holds the validated generation settings (JSON-safe)."""

    id: str
    owner: str | None
    model: str
    request: dict[str, Any]
    status: str = QUEUED
    progress: int = 0
    created_at: int = field(default_factory=lambda: int(time.time()))
    started_at: int | None = None
    completed_at: int | None = None
    expires_at: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    result_key: str | None = None
    conditioning_key: str | None = None  # the encoded prompt/face, saved by the first attempt
    frames_sha256: str | None = None  # fingerprint of the decoded frames (before H.264)
    attempts: int = 0
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    rev: int = 0  # number of writes so far

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def lease(self) -> Lease | None:
        return None if self.lease_owner is None else Lease(self.lease_owner, self.attempts)


@dataclass(frozen=True)
class Lease:
    """The fence of one run of a job: its runner and its attempt number."""

    owner: str
    attempt: int


class JobStore(ABC):
    """What the Ingress and the JobRunner need from a job database. Every method is atomic."""

    @abstractmethod
    def create(self, job: Job) -> None:
        """Insert a new job; an existing id is an error."""

    @abstractmethod
    def get(self, job_id: str) -> Job | None: ...

    @abstractmethod
    def list(self, owner: str | None, limit: int, after: str | None = None, order: str = "desc") -> list[Job]:
        """Jobs of `owner` (None: jobs created without a key), newest first by default,
        starting after the job id `after` (cursor pagination)."""

    @abstractmethod
    def count_active(self) -> int:
        """Jobs queued or in progress (admission control)."""

    @abstractmethod
    def queue_position(self, job_id: str) -> int | None:
        """1 for the oldest queued job, …; None when the job is not queued."""

    @abstractmethod
    def claim(self, owner: str, lease_s: float, limit: int) -> list[Job]:
        """Take up to `limit` active jobs whose lease is free or expired, oldest first; each gets
        `owner`'s lease and attempts + 1 (its new Lease)."""

    @abstractmethod
    def renew(self, owner: str, leases: dict[str, int], lease_s: float) -> set[str]:
        """Extend `owner`'s leases {job id: attempt} in one call → the ids still held."""

    @abstractmethod
    def _fenced_update(self, job_id: str, lease: Lease, fields: dict[str, Any]) -> bool:
        """Set `fields` (and count a write) iff the job is active and holds `lease`; atomic."""

    def update(self, job_id: str, lease: Lease, **fields: Any) -> bool:
        """Set fields of an active job that still holds `lease`; False otherwise."""
        return self._fenced_update(job_id, lease, fields)

    def retry(self, job_id: str, lease: Lease) -> Lease | None:
        """Start the next attempt under the same owner (attempts + 1, back to queued, no start
        time, no progress) → its lease; None when `lease` is no longer held."""
        fields = {"status": QUEUED, "started_at": None, "progress": 0, "attempts": lease.attempt + 1}
        return Lease(lease.owner, lease.attempt + 1) if self._fenced_update(job_id, lease, fields) else None

    def finish(self, job_id: str, lease: Lease, status: str, **fields: Any) -> bool:
        """Move an active job that still holds `lease` to a terminal status, drop the lease and
        set completed_at (unless given)."""
        if status not in TERMINAL:
            raise ValueError(f"{status!r} is not a terminal status")
        done = {"status": status, "lease_owner": None, "lease_expires_at": None, **fields}
        done.setdefault("completed_at", int(time.time()))
        return self._fenced_update(job_id, lease, done)

    @abstractmethod
    def delete(self, job_id: str) -> Job | None:
        """Remove the job; returns what was removed (its result keys are the caller's to delete)."""

    @abstractmethod
    def expired(self, now: float, limit: int = 100) -> list[Job]:
        """Terminal jobs whose `expires_at` passed (the result TTL)."""

    @abstractmethod
    def watch(self) -> ChangeWatcher:
        """A new watcher of changes (for one thread)."""


class ChangeWatcher(ABC):
    @abstractmethod
    def wait(self, timeout_s: float) -> set[str] | None:
        """Block up to `timeout_s` → ids of jobs that changed (empty: none); None: something
        changed, ids unknown (re-read what you watch)."""

    def close(self) -> None:  # noqa: B027 — optional
        pass


_COLUMNS = [
    "id",
    "owner",
    "model",
    "request",
    "status",
    "progress",
    "created_at",
    "started_at",
    "completed_at",
    "expires_at",
    "error_code",
    "error_message",
    "result_key",
    "conditioning_key",
    "frames_sha256",
    "attempts",
    "lease_owner",
    "lease_expires_at",
    "rev",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    owner TEXT,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    completed_at INTEGER,
    expires_at INTEGER,
    error_code TEXT,
    error_message TEXT,
    result_key TEXT,
    conditioning_key TEXT,
    frames_sha256 TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires_at REAL,
    rev INTEGER NOT NULL DEFAULT 0
);
"""
# Created after an older file's missing columns are added (they index those columns).
_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, lease_expires_at);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(status, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, seq);
"""
_ACTIVE_SQL = f"status IN {ACTIVE!r}"  # status IN ('queued', 'in_progress')
_FENCE_SQL = f"id = :_id AND {_ACTIVE_SQL} AND lease_owner = :_owner AND attempts = :_attempt"


def _job_column_definitions() -> dict[str, str]:
    """{column: type and constraints} of the jobs table, read from `_SCHEMA`."""
    body = _SCHEMA.split("CREATE TABLE IF NOT EXISTS jobs (", 1)[1].split(");", 1)[0]
    columns = {}
    for line in body.strip().splitlines():
        name, _, definition = line.strip().rstrip(",").partition(" ")
        if name not in ("seq", "id"):  # the key columns exist in every version
            columns[name] = definition
    return columns


def _sets(fields: dict[str, Any]) -> str:
    unknown = set(fields) - set(_COLUMNS)
    if unknown:
        raise ValueError(f"unknown job fields {sorted(unknown)}")
    return ", ".join([*(f"{k} = :{k}" for k in fields), "rev = rev + 1"])


class SQLiteJobStore(JobStore):
    """Jobs in one SQLite file (WAL mode: readers never block the writer). Several processes on
    one node may open the same file; every write is one short transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._db().executescript(_SCHEMA)  # executescript commits on its own
        self._add_missing_columns()
        self._db().executescript(_INDEXES)

    def _add_missing_columns(self) -> None:
        """Upgrade a job file written by an older version: add the columns it lacks (additive
        schema changes only), so existing jobs survive a server upgrade."""
        db = self._db()
        have = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
        for name, definition in _job_column_definitions().items():
            if name not in have:
                log.info("job store %s: adding column %s", self.path, name)
                db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a read-modify-write
        # cannot interleave with another process's.
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=30000")
        db.row_factory = sqlite3.Row
        return db

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @staticmethod
    def _job(row: sqlite3.Row | None) -> Job | None:
        if row is None:
            return None
        values = {name: row[name] for name in _COLUMNS}
        values["request"] = json.loads(values["request"])
        return Job(**values)

    def create(self, job: Job) -> None:
        values = asdict(job)
        values["request"] = json.dumps(job.request)
        names = ", ".join(_COLUMNS)
        marks = ", ".join(f":{c}" for c in _COLUMNS)
        with self._tx() as db:
            db.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", values)

    def get(self, job_id: str) -> Job | None:
        return self._job(self._db().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def list(self, owner: str | None, limit: int, after: str | None = None, order: str = "desc") -> list[Job]:
        desc = order != "asc"
        where, args = ["owner IS ?"], [owner]
        if after is not None:
            row = self._db().execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
            if row is not None:
                where.append("seq < ?" if desc else "seq > ?")
                args.append(row["seq"])
        sql = (
            f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY seq {'DESC' if desc else 'ASC'} LIMIT ?"
        )
        rows = self._db().execute(sql, [*args, limit]).fetchall()
        return [self._job(r) for r in rows]  # type: ignore[misc]

    def count_active(self) -> int:
        row = self._db().execute(f"SELECT COUNT(*) FROM jobs WHERE {_ACTIVE_SQL}").fetchone()
        return int(row[0])

    def queue_position(self, job_id: str) -> int | None:
        row = (
            self._db()
            .execute(
                "SELECT COUNT(*) FROM jobs WHERE status = ? AND seq <= "
                "(SELECT seq FROM jobs WHERE id = ? AND status = ?)",
                (QUEUED, job_id, QUEUED),
            )
            .fetchone()
        )
        return int(row[0]) or None

    def claim(self, owner: str, lease_s: float, limit: int) -> list[Job]:
        now = time.time()
        with self._tx() as db:
            rows = db.execute(
                f"SELECT id FROM jobs WHERE {_ACTIVE_SQL} "
                "AND (lease_expires_at IS NULL OR lease_expires_at < ?) ORDER BY seq LIMIT ?",
                (now, limit),
            ).fetchall()
            ids = [r["id"] for r in rows]
            for job_id in ids:
                db.execute(
                    "UPDATE jobs SET lease_owner = ?, lease_expires_at = ?, attempts = attempts + 1, "
                    "rev = rev + 1 WHERE id = ?",
                    (owner, now + lease_s, job_id),
                )
            claimed = [self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (i,)).fetchone()) for i in ids]
        return [j for j in claimed if j is not None]

    def renew(self, owner: str, leases: dict[str, int], lease_s: float) -> set[str]:
        held = set()
        if not leases:
            return held
        with self._tx() as db:
            for job_id, attempt in leases.items():
                cur = db.execute(
                    f"UPDATE jobs SET lease_expires_at = :_until WHERE {_FENCE_SQL}",
                    {"_until": time.time() + lease_s, "_id": job_id, "_owner": owner, "_attempt": attempt},
                )
                if cur.rowcount == 1:
                    held.add(job_id)
        return held

    def _fenced_update(self, job_id: str, lease: Lease, fields: dict[str, Any]) -> bool:
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE jobs SET {_sets(fields)} WHERE {_FENCE_SQL}",
                {**fields, "_id": job_id, "_owner": lease.owner, "_attempt": lease.attempt},
            )
        return cur.rowcount == 1

    def delete(self, job_id: str) -> Job | None:
        with self._tx() as db:
            job = self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return job

    def expired(self, now: float, limit: int = 100) -> list[Job]:
        rows = (
            self._db()
            .execute(
                f"SELECT * FROM jobs WHERE status IN {TERMINAL!r} "
                "AND expires_at IS NOT NULL AND expires_at <= ? LIMIT ?",
                (now, limit),
            )
            .fetchall()
        )
        return [self._job(r) for r in rows]  # type: ignore[misc]

    def watch(self) -> ChangeWatcher:
        return _SQLiteWatcher(self._connect())


class _SQLiteWatcher(ChangeWatcher):
    """SQLite has no notifications: `PRAGMA data_version` (one cheap read of this connection's
    view, no table access) changes whenever another connection commits."""

    def __init__(self, db: sqlite3.Connection, period_s: float = 0.1) -> None:
        self.db, self.period_s = db, period_s
        self.version = self._version()

    def _version(self) -> int:
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def wait(self, timeout_s: float) -> set[str] | None:
        deadline = time.monotonic() + timeout_s
        while True:
            version = self._version()
            if version != self.version:
                self.version = version
                return None
            if time.monotonic() >= deadline:
                return set()
            time.sleep(self.period_s)

    def close(self) -> None:
        self.db.close()


class AsyncJobStore:
    """The same operations as `JobStore`, awaitable: each call runs on a small thread pool, so a
    slow database (SQLite busy waits, Redis timeouts) never blocks the caller's event loop."""

    def __init__(self, store: JobStore, threads: int = 4) -> None:
        self.sync = store
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="jobstore")

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: getattr(self.sync, method)(*args, **kwargs))

    async def create(self, job: Job) -> None:
        await self._call("create", job)

    async def get(self, job_id: str) -> Job | None:
        return await self._call("get", job_id)

    async def list(self, owner: str | None, limit: int, after: str | None, order: str) -> list[Job]:
        return await self._call("list", owner, limit, after, order)

    async def count_active(self) -> int:
        return await self._call("count_active")

    async def queue_position(self, job_id: str) -> int | None:
        return await self._call("queue_position", job_id)

    async def claim(self, owner: str, lease_s: float, limit: int) -> list[Job]:
        return await self._call("claim", owner, lease_s, limit)

    async def renew(self, owner: str, leases: dict[str, int], lease_s: float) -> set[str]:
        return await self._call("renew", owner, leases, lease_s)

    async def update(self, job_id: str, lease: Lease, **fields: Any) -> bool:
        return await self._call("update", job_id, lease, **fields)

    async def retry(self, job_id: str, lease: Lease) -> Lease | None:
        return await self._call("retry", job_id, lease)

    async def finish(self, job_id: str, lease: Lease, status: str, **fields: Any) -> bool:
        return await self._call("finish", job_id, lease, status, **fields)

    async def delete(self, job_id: str) -> Job | None:
        return await self._call("delete", job_id)

    async def expired(self, now: float, limit: int = 100) -> list[Job]:
        return await self._call("expired", now, limit)


def open_job_store(settings: ServeSettings) -> JobStore:
    """The job store the settings name: SQLite on one node, Redis shared across nodes."""
    if settings.job_store == "redis":
        from serve_app.redis_jobs import RedisJobStore  # the redis client is only needed here

        return RedisJobStore(settings.redis_url, prefix=settings.redis_key_prefix)
    return SQLiteJobStore(settings.job_db)
