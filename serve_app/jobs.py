"""Durable job state: the `JobStore` interface and its SQLite (WAL) implementation.

A job accepted with 2xx is a row here before the response is sent. Whoever runs a job holds a
*lease* on it (owner + expiry) and renews it while working; a job whose lease expired (its
ingress replica died) is claimed again by any ingress replica, up to `max_attempts` runs.
Inputs that a retry needs (the uploaded image until it is encoded, then the encoded
conditioning) are kept as blobs beside the row and deleted when the job ends.

`RedisJobStore` (serve_app/redis_jobs.py) implements the same interface for multi-node clusters;
`open_job_store` picks one from the settings (`job_store: sqlite | redis`).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
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
    frames_sha256: str | None = None  # fingerprint of the decoded frames (before H.264)
    attempts: int = 0
    lease_owner: str | None = None
    lease_expires_at: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class JobStore(ABC):
    """What the ingress needs from a job database. Every method is atomic."""

    @abstractmethod
    def create(self, job: Job, blobs: dict[str, bytes] | None = None) -> None:
        """Insert a new job (and its input blobs) in one transaction."""

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
    def update(self, job_id: str, **fields: Any) -> bool:
        """Set fields of a non-terminal job; False when it is gone or already terminal."""

    @abstractmethod
    def finish(self, job_id: str, status: str, **fields: Any) -> bool:
        """Move a non-terminal job to a terminal status, drop its lease and blobs."""

    @abstractmethod
    def delete(self, job_id: str) -> Job | None:
        """Remove the job and its blobs; returns what was removed."""

    @abstractmethod
    def renew_lease(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Extend `owner`'s lease; False if the job is gone, terminal or leased by another."""

    @abstractmethod
    def claim_expired(self, owner: str, lease_s: float, limit: int = 8) -> list[Job]:
        """Take over active jobs whose lease expired (attempts + 1 each)."""

    @abstractmethod
    def put_blob(self, job_id: str, name: str, data: bytes) -> None: ...

    @abstractmethod
    def get_blob(self, job_id: str, name: str) -> bytes | None: ...

    @abstractmethod
    def delete_blob(self, job_id: str, name: str) -> None: ...

    @abstractmethod
    def expired(self, now: float, limit: int = 100) -> list[Job]:
        """Terminal jobs whose `expires_at` passed (the result TTL)."""


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
    "frames_sha256",
    "attempts",
    "lease_owner",
    "lease_expires_at",
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
    frames_sha256 TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires_at REAL
);
CREATE TABLE IF NOT EXISTS blobs (
    job_id TEXT NOT NULL,
    name TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, name)
);
"""
# Created after an older file's missing columns are added (they index those columns).
_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, lease_expires_at);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, seq);
"""


def _job_column_definitions() -> dict[str, str]:
    """{column: type and constraints} of the jobs table, read from `_SCHEMA`."""
    body = _SCHEMA.split("CREATE TABLE IF NOT EXISTS jobs (", 1)[1].split(");", 1)[0]
    columns = {}
    for line in body.strip().splitlines():
        name, _, definition = line.strip().rstrip(",").partition(" ")
        if name not in ("seq", "id"):  # the key columns exist in every version
            columns[name] = definition
    return columns


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

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a read-modify-write
            # cannot interleave with another process's.
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            db.row_factory = sqlite3.Row
            self._local.db = db
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

    def create(self, job: Job, blobs: dict[str, bytes] | None = None) -> None:
        values = asdict(job)
        values["request"] = json.dumps(job.request)
        names = ", ".join(_COLUMNS)
        marks = ", ".join(f":{c}" for c in _COLUMNS)
        with self._tx() as db:
            db.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", values)
            for name, data in (blobs or {}).items():
                db.execute("INSERT INTO blobs VALUES (?, ?, ?)", (job.id, name, data))

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
        row = self._db().execute("SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", ACTIVE).fetchone()
        return int(row[0])

    def update(self, job_id: str, **fields: Any) -> bool:
        if not fields:
            return self.get(job_id) is not None
        sets = ", ".join(f"{k} = :{k}" for k in fields)
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE jobs SET {sets} WHERE id = :_id AND status IN ('queued', 'in_progress')",
                {**fields, "_id": job_id},
            )
        return cur.rowcount == 1

    def finish(self, job_id: str, status: str, **fields: Any) -> bool:
        if status not in TERMINAL:
            raise ValueError(f"{status!r} is not a terminal status")
        fields = {"status": status, "lease_owner": None, "lease_expires_at": None, **fields}
        fields.setdefault("completed_at", int(time.time()))
        sets = ", ".join(f"{k} = :{k}" for k in fields)
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE jobs SET {sets} WHERE id = :_id AND status IN ('queued', 'in_progress')",
                {**fields, "_id": job_id},
            )
            if cur.rowcount == 1:
                db.execute("DELETE FROM blobs WHERE job_id = ?", (job_id,))
        return cur.rowcount == 1

    def delete(self, job_id: str) -> Job | None:
        with self._tx() as db:
            job = self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            db.execute("DELETE FROM blobs WHERE job_id = ?", (job_id,))
        return job

    def renew_lease(self, job_id: str, owner: str, lease_s: float) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND lease_owner = ? "
                "AND status IN ('queued', 'in_progress')",
                (time.time() + lease_s, job_id, owner),
            )
        return cur.rowcount == 1

    def claim_expired(self, owner: str, lease_s: float, limit: int = 8) -> list[Job]:
        now = time.time()
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE status IN ('queued', 'in_progress') "
                "AND (lease_expires_at IS NULL OR lease_expires_at < ?) ORDER BY seq LIMIT ?",
                (now, limit),
            ).fetchall()
            ids = [r["id"] for r in rows]
            for job_id in ids:
                db.execute(
                    "UPDATE jobs SET lease_owner = ?, lease_expires_at = ?, attempts = attempts + 1 "
                    "WHERE id = ?",
                    (owner, now + lease_s, job_id),
                )
        return [j for j in (self.get(i) for i in ids) if j is not None]

    def put_blob(self, job_id: str, name: str, data: bytes) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?)", (job_id, name, data))

    def get_blob(self, job_id: str, name: str) -> bytes | None:
        row = (
            self._db()
            .execute("SELECT data FROM blobs WHERE job_id = ? AND name = ?", (job_id, name))
            .fetchone()
        )
        return None if row is None else bytes(row[0])

    def delete_blob(self, job_id: str, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM blobs WHERE job_id = ? AND name = ?", (job_id, name))

    def expired(self, now: float, limit: int = 100) -> list[Job]:
        rows = (
            self._db()
            .execute(
                "SELECT * FROM jobs WHERE status IN ('completed', 'failed', 'cancelled') "
                "AND expires_at IS NOT NULL AND expires_at <= ? LIMIT ?",
                (now, limit),
            )
            .fetchall()
        )
        return [self._job(r) for r in rows]  # type: ignore[misc]


def open_job_store(settings: ServeSettings) -> JobStore:
    """The job store the settings name: SQLite on one node, Redis shared across nodes."""
    if settings.job_store == "sqlite":
        return SQLiteJobStore(settings.job_db)
    if settings.job_store == "redis":
        if not settings.redis_url:
            raise ValueError("job_store: redis needs redis_url (or STANDIN_REDIS_URL), e.g. redis://host:6379/0")
        from serve_app.redis_jobs import RedisJobStore  # the redis client is only needed here

        return RedisJobStore(settings.redis_url, prefix=settings.redis_key_prefix)
    raise ValueError(f"job_store must be 'sqlite' or 'redis', got {settings.job_store!r}")
