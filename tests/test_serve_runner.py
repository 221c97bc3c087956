"""The JobRunner's loop against a real Redis that goes away and comes back (no Ray cluster: the
deployment's class is constructed directly; no job gets far enough to need the other deployments)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from parallel.rendezvous import free_port
from serve_app.jobs import Job
from serve_app.redis_jobs import RedisJobStore
from serve_app.runner import JobRunner
from serve_app.settings import ServeSettings
from tests.test_jobstore import redis_server


def test_the_runner_loop_survives_a_store_outage_and_claims_again(tmp_path: Path):
    """Before: the lease keeper had no error handling, so one store error ended it silently.
    Now every store error is logged and the loop goes on; once the store is back it claims."""
    port = free_port("127.0.0.1")
    settings = ServeSettings(
        job_store="redis", redis_url=f"redis://127.0.0.1:{port}/0", lease_s=1.5, state_dir=str(tmp_path)
    )

    async def scenario() -> tuple[str, str | None]:
        with redis_server(tmp_path / "before", port=port):
            runner = JobRunner.func_or_class(settings, None, None, None)
            await asyncio.sleep(1.0)  # some rounds against a live store
        await asyncio.sleep(2.0)  # some rounds in which every store call fails
        runner.check_health()  # the loop is still running
        try:
            with redis_server(tmp_path / "after", port=port) as url:
                store = RedisJobStore(url)
                store.create(Job(id="j", owner=None, model="tiny", request={"prompt": "x"}))
                deadline = time.monotonic() + 30
                while (job := store.get("j")).lease_owner is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                return runner.owner, job.lease_owner
        finally:
            runner._main.cancel()
            for _, task in list(runner.runs.values()):
                task.cancel()

    owner, claimed_by = asyncio.run(scenario())
    assert claimed_by == owner
