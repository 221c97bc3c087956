"""Fast checks of serve_app's parts without a Ray cluster: the job store, request parsing, settings,
and the DiT deployment's logic in Serve's local testing mode (SP degree 1)."""

from __future__ import annotations

import time

import pytest
import torch

from serve_app import jobs
from serve_app.api import APIError, parse_range, parse_video_request
from serve_app.jobs import Job, SQLiteJobStore
from serve_app.settings import ServeSettings


def _job(job_id: str, owner: str | None = None, **kw) -> Job:
    return Job(id=job_id, owner=owner, model="tiny", request={"prompt": "x"}, **kw)


def test_job_store_survives_reopening_and_paginates_per_owner(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite")
    for i in range(5):
        store.create(_job(f"j{i}", owner="alice" if i % 2 else None), {"image": b"face"} if i == 0 else None)
    store.create(_job("b0", owner="bob"))
    reopened = SQLiteJobStore(tmp_path / "jobs.sqlite")
    assert reopened.get("j0").request == {"prompt": "x"} and reopened.get_blob("j0", "image") == b"face"
    assert [j.id for j in reopened.list(None, 2)] == ["j4", "j2"]
    assert [j.id for j in reopened.list(None, 2, after="j2")] == ["j0"]
    assert [j.id for j in reopened.list("alice", 10, order="asc")] == ["j1", "j3"]
    assert reopened.count_active() == 6


def test_finished_jobs_drop_blobs_and_cannot_change(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite")
    store.create(_job("a"), {"image": b"face"})
    assert store.finish("a", jobs.COMPLETED, result_key="a.mp4")
    assert store.get_blob("a", "image") is None
    assert not store.update("a", progress=3) and not store.finish("a", jobs.FAILED)
    assert store.get("a").status == jobs.COMPLETED and store.count_active() == 0


def test_expired_leases_are_claimed_once_with_an_attempt_counted(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite")
    store.create(_job("dead", attempts=1, lease_owner="r1", lease_expires_at=time.time() - 1))
    store.create(_job("alive", attempts=1, lease_owner="r2", lease_expires_at=time.time() + 60))
    claimed = store.claim_expired("r3", lease_s=30)
    assert [(j.id, j.attempts, j.lease_owner) for j in claimed] == [("dead", 2, "r3")]
    assert store.claim_expired("r4", lease_s=30) == []
    assert not store.renew_lease("dead", "r1", 30) and store.renew_lease("dead", "r3", 30)


def test_results_expire_after_their_ttl(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite")
    store.create(_job("old"))
    store.finish("old", jobs.COMPLETED, expires_at=int(time.time()) - 1)
    store.create(_job("new"))
    store.finish("new", jobs.COMPLETED, expires_at=int(time.time()) + 3600)
    assert [j.id for j in store.expired(time.time())] == ["old"]


SETTINGS = ServeSettings(max_width=256, max_height=256, max_frames=33, max_steps=10, max_prompt_chars=100)


def test_form_and_json_fields_give_the_same_params():
    form = parse_video_request(
        {"prompt": "hi", "size": "64x32", "seconds": "1", "seed": "5", "guidance_scale": "3.5"},
        None,
        SETTINGS,
        form=True,
    )
    as_json = parse_video_request(
        {"prompt": "hi", "size": "64x32", "num_frames": 17, "seed": 5, "guidance_scale": 3.5},
        None,
        SETTINGS,
        form=False,
    )
    assert form.params == as_json.params
    assert (form.params.width, form.params.height, form.params.num_frames) == (64, 32, 17)


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"prompt": "x", "size": "512x512"}, 422, "size"),
        ({"prompt": "x", "num_frames": 37}, 422, "num_frames"),
        ({"prompt": "x", "seconds": "3"}, 422, "seconds"),
        ({"prompt": "x", "num_inference_steps": 11}, 422, "num_inference_steps"),
        ({"prompt": "x" * 101}, 422, "prompt"),
        ({"prompt": "x", "fps": 0}, 422, "fps"),
        ({"prompt": "x", "shift": "nan"}, 400, "shift"),
    ],
)
def test_limits_from_settings_are_enforced(fields, status, param):
    with pytest.raises(APIError) as err:
        parse_video_request(fields, None, SETTINGS, form=False)
    assert (err.value.status, err.value.param) == (status, param)


def test_byte_ranges():
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=95-200", 100) == (95, 99)
    assert parse_range("bytes=100-", 100) is None
    assert parse_range("bytes=5-2", 100) is None
    assert parse_range("items=0-1", 100) is None


def test_environment_overrides_config_args_and_unknown_args_fail():
    s = ServeSettings.from_args(
        {"sp_degree": 2, "preset": "tiny"},
        env={"STANDIN_SP_DEGREE": "4", "STANDIN_API_KEYS": "a, b", "STANDIN_LEASE_S": "2.5"},
    )
    assert (s.sp_degree, s.api_keys, s.lease_s, s.model_name) == (4, ("a", "b"), 2.5, "tiny")
    # Keys never come from the config file.
    assert ServeSettings.from_args({"api_keys": ["x"]}, env={}).api_keys == ()
    with pytest.raises(ValueError, match="unknown serve_app args"):
        ServeSettings.from_args({"sp_degre": 2}, env={})


def test_dit_deployment_streams_progress_and_matches_the_pipeline():
    """Local testing mode (no cluster): SP degree 1 through parallel.SPRunner == StandInPipeline."""
    from ray import serve

    from serve_app.dit import DiTReplica
    from standin.pipeline import DenoiseInputs, GenerationParams, StandInPipeline, initial_noise
    from standin.scheduler import FlowMatchSchedule

    pipe = StandInPipeline.from_preset("tiny")
    params = GenerationParams(prompt="a face", width=32, height=32, num_frames=5, num_steps=3, seed=11)
    ctx, neg = pipe.encode_prompts(params.prompt, params.negative_prompt)
    identity = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = {"context": ctx, "negative_context": neg, "identity_latents": identity}

    handle = serve.run(DiTReplica.bind(ServeSettings(sp_degree=1)), _local_testing_mode=True)
    events = list(handle.options(stream=True).denoise.remote(params, conditioning))
    assert [e["step"] for e in events[:-1]] == [1, 2, 3] and events[-1]["event"] == "result"

    expected = pipe.denoise(
        DenoiseInputs(
            noise=initial_noise(params),
            context=ctx,
            negative_context=neg,
            identity_latents=identity,
            schedule=FlowMatchSchedule(params.num_steps, shift=params.shift),
            guidance_scale=params.guidance_scale,
        )
    )
    torch.testing.assert_close(events[-1]["latents"], expected, rtol=1e-4, atol=1e-5)

    bad = {**conditioning, "context": torch.zeros(1, 4, 3)}
    error = list(handle.options(stream=True).denoise.remote(params, bad))[-1]
    assert error["event"] == "error" and error["kind"] == "invalid"
    assert handle.stats.remote().result()["completed"] == 1
