"""The job store contract, run on both backends: SQLite (one node) and Redis (a real
`redis-server` started here on a free loopback port, in a temporary directory)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from serve_app import jobs
from serve_app.jobs import Job, JobStore, SQLiteJobStore, open_job_store
from serve_app.settings import ServeSettings

NO_PERSISTENCE = ("--save", "", "--appendonly", "no", "--daemonize", "no")
REDIS_SEARCH = ("/usr/bin/redis-server", "/usr/local/bin/redis-server", "/usr/sbin/redis-server")


def find_redis_server() -> str | None:
    return shutil.which("redis-server") or next((p for p in REDIS_SEARCH if Path(p).exists()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(directory: Path, timeout_s: float = 30.0) -> Iterator[str]:
    """A private redis-server (no persistence) → its URL; stopped on exit. Skips the test only
    when no redis-server binary exists (`.ci/run` installs one)."""
    import redis

    exe = find_redis_server()
    if exe is None:
        pytest.skip("redis-server not found (apt-get install redis-server; .ci/run does this)")
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = (directory / "redis.log").open("w")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), *NO_PERSISTENCE],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if redis.Redis.from_url(url, socket_timeout=2).ping():
                    break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not start: {(directory / 'redis.log').read_text()}"
                    ) from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


StoreFactory = Callable[[], JobStore]


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request, tmp_path) -> StoreFactory:
    """→ a function that opens (another handle on) one fresh store of the backend under test."""
    if request.param == "sqlite":
        return lambda: SQLiteJobStore(tmp_path / "jobs.sqlite")
    from serve_app.redis_jobs import RedisJobStore

    url = request.getfixturevalue("redis_url")
    prefix = f"test-{uuid.uuid4().hex[:8]}:"  # every test its own key space on the shared server
    return lambda: RedisJobStore(url, prefix=prefix)


def _job(job_id: str, owner: str | None = None, **kw) -> Job:
    return Job(id=job_id, owner=owner, model="tiny", request={"prompt": "x"}, **kw)


def test_job_store_survives_reopening_and_paginates_per_owner(open_store: StoreFactory):
    store = open_store()
    for i in range(5):
        store.create(_job(f"j{i}", owner="alice" if i % 2 else None), {"image": b"face"} if i == 0 else None)
    store.create(_job("b0", owner="bob"))
    reopened = open_store()
    assert reopened.get("j0").request == {"prompt": "x"} and reopened.get_blob("j0", "image") == b"face"
    assert [j.id for j in reopened.list(None, 2)] == ["j4", "j2"]
    assert [j.id for j in reopened.list(None, 2, after="j2")] == ["j0"]
    assert [j.id for j in reopened.list("alice", 10, order="asc")] == ["j1", "j3"]
    assert [j.id for j in reopened.list("alice", 10, after="j1", order="asc")] == ["j3"]
    assert reopened.count_active() == 6


def test_finished_jobs_drop_blobs_and_cannot_change(open_store: StoreFactory):
    store = open_store()
    store.create(_job("a"), {"image": b"face"})
    assert store.finish("a", jobs.COMPLETED, result_key="a.mp4")
    assert store.get_blob("a", "image") is None
    assert not store.update("a", progress=3) and not store.finish("a", jobs.FAILED)
    assert store.get("a").status == jobs.COMPLETED and store.count_active() == 0
    with pytest.raises(ValueError):
        store.finish("a", jobs.IN_PROGRESS)


def test_expired_leases_are_claimed_once_with_an_attempt_counted(open_store: StoreFactory):
    store = open_store()
    store.create(_job("dead", attempts=1, lease_owner="r1", lease_expires_at=time.time() - 1))
    store.create(_job("alive", attempts=1, lease_owner="r2", lease_expires_at=time.time() + 60))
    claimed = store.claim_expired("r3", lease_s=30)
    assert [(j.id, j.attempts, j.lease_owner) for j in claimed] == [("dead", 2, "r3")]
    assert store.claim_expired("r4", lease_s=30) == []
    assert not store.renew_lease("dead", "r1", 30) and store.renew_lease("dead", "r3", 30)


def test_results_expire_after_their_ttl(open_store: StoreFactory):
    store = open_store()
    store.create(_job("old"))
    store.finish("old", jobs.COMPLETED, expires_at=int(time.time()) - 1)
    store.create(_job("new"))
    store.finish("new", jobs.COMPLETED, expires_at=int(time.time()) + 3600)
    assert [j.id for j in store.expired(time.time())] == ["old"]


def test_fields_round_trip_with_their_types_and_none(open_store: StoreFactory):
    store = open_store()
    request = {"prompt": "ü", "size": [832, 480], "empty": [], "nested": {"a": None}, "cfg": 5.0}
    store.create(Job(id="t", owner="o", model="m", request=request, lease_expires_at=1e9 + 0.123456))
    assert store.update("t", status=jobs.IN_PROGRESS, progress=40, error_code="x", started_at=5)
    assert store.update("t", error_code=None)
    job = store.get("t")
    assert job.request == request and job.lease_expires_at == 1e9 + 0.123456
    assert (job.status, job.progress, job.error_code, job.started_at) == (jobs.IN_PROGRESS, 40, None, 5)
    assert isinstance(job.progress, int) and job.completed_at is None and job.owner == "o"
    assert store.finish("t", jobs.FAILED, error_code="boom", error_message="it broke")
    done = store.get("t")
    assert (done.lease_owner, done.lease_expires_at, done.error_code) == (None, None, "boom")
    assert done.completed_at is not None and done.completed_at >= int(time.time()) - 5


def test_a_deleted_job_is_gone_everywhere(open_store: StoreFactory):
    store = open_store()
    store.create(_job("d", owner="o", attempts=1, lease_owner="r1", lease_expires_at=time.time() + 60))
    store.put_blob("d", "conditioning", b"\x00" * 10)
    removed = store.delete("d")
    assert removed is not None and removed.id == "d" and removed.owner == "o"
    assert store.get("d") is None and store.get_blob("d", "conditioning") is None
    assert store.list("o", 10) == [] and store.count_active() == 0
    # A runner that has not noticed yet cannot bring it back.
    assert not store.update("d", progress=50) and not store.renew_lease("d", "r1", 30)
    assert not store.finish("d", jobs.COMPLETED) and store.delete("d") is None


def test_a_job_id_is_created_once(open_store: StoreFactory):
    store = open_store()
    store.create(_job("same"))
    with pytest.raises(Exception):  # noqa: B017 — sqlite3.IntegrityError / redis.ResponseError
        store.create(_job("same", owner="mallory"))
    assert store.get("same").owner is None and store.count_active() == 1


def test_concurrent_claimers_take_each_expired_job_exactly_once(open_store: StoreFactory):
    store = open_store()
    n_jobs, n_claimers = 60, 6
    for i in range(n_jobs):
        store.create(_job(f"c{i}", attempts=1, lease_owner="dead", lease_expires_at=time.time() - 1))
    claims: dict[str, list[str]] = {f"r{k}": [] for k in range(n_claimers)}
    start = threading.Barrier(n_claimers)

    def claimer(owner: str) -> None:
        mine = open_store()  # its own connection, like a replica on another node
        start.wait()
        while batch := mine.claim_expired(owner, lease_s=60, limit=3):
            claims[owner] += [j.id for j in batch]

    threads = [threading.Thread(target=claimer, args=(owner,)) for owner in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    taken = [job_id for ids in claims.values() for job_id in ids]
    assert sorted(taken) == sorted(f"c{i}" for i in range(n_jobs))  # each once, none lost
    for owner, ids in claims.items():
        for job_id in ids:
            job = store.get(job_id)
            assert (job.lease_owner, job.attempts) == (owner, 2)


def test_open_job_store_picks_the_backend_from_settings(tmp_path, redis_url: str):
    from serve_app.redis_jobs import RedisJobStore

    sqlite = open_job_store(ServeSettings(state_dir=str(tmp_path)))
    assert isinstance(sqlite, SQLiteJobStore) and sqlite.path == tmp_path / "jobs.sqlite"
    shared = ServeSettings.from_args(
        {"job_store": "redis", "redis_key_prefix": "a:"}, env={"STANDIN_REDIS_URL": redis_url}
    )
    assert "redis_url" not in repr(shared)  # it may carry a password
    one, two = open_job_store(shared), open_job_store(shared)
    assert isinstance(one, RedisJobStore)
    one.create(_job("seen-by-both"))
    assert two.get("seen-by-both") is not None
    other_app = open_job_store(ServeSettings(job_store="redis", redis_url=redis_url, redis_key_prefix="b:"))
    assert other_app.get("seen-by-both") is None and other_app.count_active() == 0
    with pytest.raises(ValueError, match="redis_url"):
        open_job_store(ServeSettings(job_store="redis"))
    with pytest.raises(ValueError, match="job_store"):
        open_job_store(ServeSettings(job_store="postgres"))


def test_sqlite_job_file_from_an_older_version_is_upgraded_in_place(tmp_path: Path):
    """A job file written before a column existed keeps its jobs and accepts new ones."""
    import sqlite3

    path = tmp_path / "jobs.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, owner TEXT,"
        " model TEXT NOT NULL, request TEXT NOT NULL, status TEXT NOT NULL,"
        " progress INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL);"
        "INSERT INTO jobs (id, model, request, status, created_at)"
        " VALUES ('old', 'tiny', '{\"prompt\": \"x\"}', 'queued', 1);"
    )
    old.commit()
    old.close()
    store = SQLiteJobStore(path)
    assert store.get("old").status == "queued" and store.get("old").attempts == 0
    store.create(_job("new"))
    assert store.get("new").frames_sha256 is None and store.count_active() == 2
