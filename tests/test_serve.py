"""The Serve application end to end, on a real local Ray cluster (tests/conftest.py: one per session).

The main app is the CPU profile at test sizes: tiny preset, one DiT replica of 2 ranks over gloo,
one JobRunner that drives one job at a time, in the GPU profiles' production mode (one agreement
per step, the VAE decode split across the DiT's ranks). The second app ("keyed", under /keyed)
needs API keys, has two single-rank DiT replicas (real concurrency), small limits (cheap fuzzing)
and the default mode (gated collectives, the Decoder deployment decodes).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from standin.video import decode_mp4, read_mp4_info
from tests.serving import wait_done

pytestmark = pytest.mark.slow

FACES = Path(__file__).parent / "data" / "faces"
SMALL = {"size": "32x32", "num_frames": 5, "num_inference_steps": 2, "seed": 7}
# long enough to still run while a test looks at the queue behind it (≈ 10 s here: 100 steps)
LONG = {"size": "192x192", "num_frames": 17, "num_inference_steps": 100, "seed": 3}
MAX_UPLOAD = 2_000_000


def _data_url(path: Path) -> dict[str, str]:
    mime = "image/png" if path.suffix == ".png" else "image/jpeg"
    return {"image_url": f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()}


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-state")


@pytest.fixture(scope="module")
def store(state: Path):
    """The main app's job store, opened beside it (to read attempts and leases)."""
    from serve_app.jobs import SQLiteJobStore

    return SQLiteJobStore(state / "main" / "jobs.sqlite")


@pytest.fixture(scope="module")
def server(ray_serve: str, state: Path) -> Iterator[str]:
    """Deploys the main app (SP=2) and the API-key app (2 DiT replicas); → base URL."""
    from ray import serve

    from serve_app.app import build_app

    serve.run(
        build_app(
            {
                "sp_degree": 2,
                "state_dir": str(state / "main"),
                "lease_s": 4,
                "max_active_jobs": 6,
                "retry_after_s": 7,
                "max_upload_bytes": MAX_UPLOAD,
                "collective_timeout_s": 20,
                "retry_backoff_s": 0.5,
                "max_attempts": 3,
                "runner_max_jobs": 1,
                "sse_keepalive_s": 0.5,
                "agreement": "per_step",
                "decode_on": "dit",
            }
        ),
        name="standin",
        route_prefix="/",
    )
    with _env(STANDIN_API_KEYS="key-alice,key-bob"):
        keyed = build_app(
            {
                "sp_degree": 1,
                "state_dir": str(state / "keyed"),
                "max_width": 64,
                "max_height": 64,
                "max_frames": 9,
                "max_steps": 3,
                "max_active_jobs": 4,
            },
            deployments=[{"name": "DiTReplica", "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.2}}],
        )
    serve.run(keyed, name="keyed", route_prefix="/keyed")
    yield ray_serve
    # the session's cluster is shared by every Serve test module: free it for the next
    serve.delete("keyed")
    serve.delete("standin")


@pytest.fixture
def client(server: str):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def _submit(client: httpx.Client, face: str | None = "astronaut.jpg", **fields: Any) -> dict[str, Any]:
    body = {"prompt": "a person talks to the camera", **SMALL, **fields}
    if face is not None:
        body["input_reference"] = _data_url(FACES / face)
    r = client.post("/v1/videos", json=body)
    assert r.status_code == 202, r.text
    return r.json()




def _frames(client: httpx.Client, video_id: str) -> np.ndarray:
    r = client.get(f"/v1/videos/{video_id}/content")
    assert r.status_code == 200, r.text
    return decode_mp4(r.content)


def _wait_progress(client: httpx.Client, video_id: str, above: int = 10, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = client.get(f"/v1/videos/{video_id}").json()
        assert v["status"] in ("queued", "in_progress"), v
        if v["progress"] > above:
            return
        time.sleep(0.1)
    raise AssertionError(f"{video_id} made no progress")


def _dit_stats(app: str = "standin") -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle("DiTReplica", app_name=app).stats.remote().result(timeout_s=60)


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    return err


# -- the happy path ------------------------------------------------------------------------------


def test_round_trip_multipart_upload_to_mp4(client: httpx.Client):
    r = client.post(
        "/v1/videos",
        data={"prompt": "a person smiles", "size": "32x32", "num_frames": "5", "num_inference_steps": "2"},
        files={"input_reference": ("face.jpg", (FACES / "astronaut.jpg").read_bytes(), "image/jpeg")},
    )
    assert r.status_code == 202, r.text
    video = r.json()
    assert video["object"] == "video" and video["status"] == "queued" and video["progress"] == 0
    assert video["id"].startswith("video_") and len(video["id"]) == 38
    assert video["size"] == "32x32" and video["model"] == "tiny" and video["has_reference"]

    done = wait_done(client, video["id"])
    assert done["status"] == "completed", done
    assert done["progress"] == 100 and done["expires_at"] > done["completed_at"]
    content = client.get(f"/v1/videos/{video['id']}/content")
    assert content.headers["content-type"] == "video/mp4"
    info = read_mp4_info(content.content)
    assert (info.num_frames, info.width, info.height) == (5, 32, 32)

    # Range requests (players seek with them).
    part = client.get(f"/v1/videos/{video['id']}/content", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == content.content[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(content.content)}"
    tail = client.get(f"/v1/videos/{video['id']}/content", headers={"Range": "bytes=-5"})
    assert tail.status_code == 206 and tail.content == content.content[-5:]
    bad = client.get(f"/v1/videos/{video['id']}/content", headers={"Range": f"bytes={10**9}-"})
    assert bad.status_code == 416


def test_json_text_to_video_and_listing_pagination(client: httpx.Client):
    ids = [_submit(client, face=None, seed=i)["id"] for i in range(3)]
    for i in ids:
        assert wait_done(client, i)["status"] == "completed"
    page = client.get("/v1/videos", params={"limit": 2}).json()
    assert page["object"] == "list" and len(page["data"]) == 2 and page["has_more"]
    assert [v["id"] for v in page["data"]] == ids[::-1][:2]  # newest first
    rest = client.get("/v1/videos", params={"limit": 2, "after": page["last_id"]}).json()
    assert rest["data"][0]["id"] == ids[0]
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_healthz_reports_application_ready(client: httpx.Client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_sse_events_stream_progress_until_completed(client: httpx.Client):
    video = _submit(client, **{**SMALL, "num_inference_steps": 10})
    events = []
    with client.stream("GET", f"/v1/videos/{video['id']}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    assert events[-1][0] == "completed" and events[-1][1]["progress"] == 100
    progress = [e[1]["progress"] for e in events]
    assert progress == sorted(progress) and len(progress) >= 2


# -- isolation -----------------------------------------------------------------------------------


def test_concurrent_requests_with_different_faces_match_running_alone(client: httpx.Client):
    """No identity leaks: each video depends only on its own face, run alone or side by side.
    Compared by the fingerprint of the decoded frames (H.264 bytes may vary with encoder threads)."""

    def run_alone(face: str | None) -> str:
        return wait_done(client, _submit(client, face)["id"])["frames_sha256"]

    alone = {face: run_alone(face) for face in ("astronaut.jpg", "coffee.jpg", None)}
    assert len(set(alone.values())) == 3, "different faces (or none) must give different videos"

    together = {face: _submit(client, face)["id"] for face in ("astronaut.jpg", "coffee.jpg", None)}
    for face, video_id in together.items():
        done = wait_done(client, video_id)
        assert done["status"] == "completed"
        assert done["frames_sha256"] == alone[face], f"{face} differs when run beside the others"
    # A request without a face right after face requests sees no face.
    assert run_alone(None) == alone[None]


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({}, 400, "prompt"),
        ({"prompt": "   "}, 400, "prompt"),
        ({"prompt": 12}, 400, "prompt"),
        ({"prompt": "x", "size": "big"}, 400, "size"),
        ({"prompt": "x", "size": "30x30"}, 422, "size"),
        ({"prompt": "x", "size": "4096x4096"}, 422, "size"),
        ({"prompt": "x", "num_frames": 6}, 422, "num_frames"),
        ({"prompt": "x", "num_frames": 10_001}, 422, "num_frames"),
        ({"prompt": "x", "seconds": 1, "num_frames": 5}, 400, "seconds"),
        ({"prompt": "x", "seconds": "-1"}, 422, "seconds"),
        ({"prompt": "x", "num_inference_steps": 0}, 422, "num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": "many"}, 400, "num_inference_steps"),
        ({"prompt": "x", "seed": True}, 400, "seed"),
        ({"prompt": "x", "seed": -1}, 422, "seed"),
        ({"prompt": "x", "guidance_scale": 1e9}, 422, "guidance_scale"),
        ({"prompt": "x" * 5000}, 422, "prompt"),
        ({"prompt": "x", "subject": "dog"}, 422, "subject"),
        ({"prompt": "x", "model": "sora-2"}, 404, "model"),
        ({"prompt": "x", "colour": "red"}, 400, "colour"),
        (
            {"prompt": "x", "input_reference": {"image_url": "https://example.com/a.jpg"}},
            400,
            "input_reference",
        ),
        (
            {"prompt": "x", "input_reference": {"image_url": "data:image/jpeg;base64,@@@"}},
            400,
            "input_reference",
        ),
        ({"prompt": "x", "input_reference": 5}, 400, "input_reference"),
        (  # not an image at all: a bad field (400), not a bad Content-Type (415)
            {
                "prompt": "x",
                "input_reference": {
                    "image_url": "data:image/png;base64," + base64.b64encode(b"hello").decode()
                },
            },
            400,
            "input_reference",
        ),
        ({"prompt": "x", "negative_prompt": "nul\x00"}, 400, "negative_prompt"),
    ],
)
def test_bad_json_requests_get_openai_errors(client: httpx.Client, body: dict, status: int, param: str):
    err = _error(client.post("/v1/videos", json=body), status)
    assert err["param"] == param


def test_malformed_bodies_get_4xx_never_500(client: httpx.Client):
    _error(client.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"}), 400)
    _error(client.post("/v1/videos", content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    _error(client.post("/v1/videos", content=b"prompt=x", headers={"content-type": "text/plain"}), 415)
    _error(
        client.post("/v1/videos", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"}),
        400,
    )
    # A form field that should be a file.
    _error(client.post("/v1/videos", data={"prompt": "x", "input_reference": "face.jpg"}), 400)


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "size", "subject", "model"])
def test_a_lone_surrogate_in_any_string_field_gets_400_never_500_or_a_job(client: httpx.Client, field: str):
    """Valid JSON, invalid Unicode. Before: prompt → 500; negative_prompt → 202, three retries,
    then `failed` with a Ray traceback as its message."""
    before = len(client.get("/v1/videos", params={"limit": 100}).json()["data"])
    body = {"prompt": "x", **SMALL, field: "PLACEHOLDER"}
    raw = json.dumps(body).replace('"PLACEHOLDER"', '"a \\ud800 b"').encode()
    r = client.post("/v1/videos", content=raw, headers={"content-type": "application/json"})
    err = _error(r, 400)
    assert (err["param"], err["code"]) == (field, "invalid_string")
    # A NUL in a form field (a client cannot encode a lone surrogate there).
    form = {"prompt": "x", field: "bad \x00 nul"}
    err = _error(client.post("/v1/videos", data=form), 400)
    assert (err["param"], err["code"]) == (field, "invalid_string")
    assert len(client.get("/v1/videos", params={"limit": 100}).json()["data"]) == before


def test_an_undecodable_image_is_a_400_bad_field_and_415_is_only_for_the_content_type(client: httpx.Client):
    files = {"input_reference": ("f.png", b"\x89PNG\r\n\x1a\nnot really", "image/png")}
    err = _error(client.post("/v1/videos", data={"prompt": "x"}, files=files), 400)
    assert (err["param"], err["code"]) == ("input_reference", "invalid_image")
    garbage = {"input_reference": ("f.bin", b"GIF89a...", "application/octet-stream")}
    err = _error(client.post("/v1/videos", data={"prompt": "x"}, files=garbage), 400)
    assert err["code"] == "invalid_image"
    err = _error(client.post("/v1/videos", content=b"x", headers={"content-type": "image/png"}), 415)
    assert err["code"] == "unsupported_media_type"


def test_truncated_jpeg_gets_400_and_oversized_upload_gets_413(client: httpx.Client):
    jpeg = (FACES / "astronaut.jpg").read_bytes()
    files = {"input_reference": ("f.jpg", jpeg[: len(jpeg) // 3], "image/jpeg")}
    err = _error(client.post("/v1/videos", data={"prompt": "x"}, files=files), 400)
    assert err["code"] == "invalid_image"
    big = {"input_reference": ("f.jpg", jpeg + b"\0" * (2 * MAX_UPLOAD), "image/jpeg")}
    _error(client.post("/v1/videos", data={"prompt": "x"}, files=big), 413)


def test_unknown_and_unfinished_ids(client: httpx.Client):
    err = _error(client.get("/v1/videos/video_0123456789abcdef0123456789abcdef"), 404)
    assert err["code"] == "video_not_found"
    _error(client.get("/v1/videos/nope/content"), 404)
    _error(client.delete("/v1/videos/nope"), 404)
    _error(client.get("/v1/nothing-here"), 404)
    video = _submit(client, **LONG)
    try:
        assert _error(client.get(f"/v1/videos/{video['id']}/content"), 409)["code"] == "video_not_ready"
    finally:
        client.delete(f"/v1/videos/{video['id']}")


def test_api_keys_gate_and_isolate_jobs(server: str):
    with httpx.Client(base_url=f"{server}/keyed", timeout=60) as anon:
        _error(anon.get("/v1/models"), 401)
        _error(anon.post("/v1/videos", json={"prompt": "x"}), 401)
        r = anon.get("/v1/videos", headers={"Authorization": "Bearer wrong"})
        assert _error(r, 401)["code"] == "invalid_api_key"
    alice = httpx.Client(
        base_url=f"{server}/keyed", timeout=60, headers={"Authorization": "Bearer key-alice"}
    )
    bob = httpx.Client(base_url=f"{server}/keyed", timeout=60, headers={"Authorization": "Bearer key-bob"})
    with alice, bob:
        video = alice.post("/v1/videos", json={"prompt": "x", **SMALL}).json()
        assert wait_done(alice, video["id"], prefix="")["status"] == "completed"
        assert alice.get(f"/v1/videos/{video['id']}/content").status_code == 200
        # Bob cannot see, fetch or delete Alice's job: it does not exist for him.
        _error(bob.get(f"/v1/videos/{video['id']}"), 404)
        _error(bob.get(f"/v1/videos/{video['id']}/content"), 404)
        _error(bob.delete(f"/v1/videos/{video['id']}"), 404)
        assert bob.get("/v1/videos").json()["data"] == []
        assert [v["id"] for v in alice.get("/v1/videos").json()["data"]] == [video["id"]]


def test_the_dit_ranks_decode_the_video_the_decoder_would(client: httpx.Client, server: str):
    """The main app decodes across its 2 DiT ranks, the keyed app in its Decoder (1 rank): the
    same request gives the same video up to float rounding (parallel VAE decode ≤ 1e-5 of the
    single-process one, then uint8 and H.264)."""
    face = _data_url(FACES / "astronaut.jpg")
    body = {"prompt": "a person talks to the camera", **SMALL, "input_reference": face}
    ranks = _frames(client, wait_done(client, client.post("/v1/videos", json=body).json()["id"])["id"])
    with httpx.Client(base_url=f"{server}/keyed", timeout=60,
                      headers={"Authorization": "Bearer key-alice"}) as keyed:
        video = wait_done(keyed, keyed.post("/v1/videos", json=body).json()["id"], prefix="")
        r = keyed.get(f"/v1/videos/{video['id']}/content")
        assert r.status_code == 200, r.text
        decoder = decode_mp4(r.content)
    assert ranks.shape == decoder.shape == (5, 32, 32, 3)
    diff = np.abs(ranks.astype(int) - decoder.astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())
    assert _dit_stats()["decode_on"] == "dit" and _dit_stats("keyed")["decode_on"] == "decoder"


# -- load and cancellation -----------------------------------------------------------------------


def test_delete_cancels_a_running_job_and_frees_the_dit(client: httpx.Client):
    stats = _dit_stats()
    before = stats["cancelled"] + stats["abandoned"]
    video = _submit(client, **LONG)
    _wait_progress(client, video["id"], above=10)
    r = client.delete(f"/v1/videos/{video['id']}")
    assert r.status_code == 200 and r.json() == {
        "id": video["id"],
        "object": "video.deleted",
        "deleted": True,
    }
    _error(client.get(f"/v1/videos/{video['id']}"), 404)
    # The steps stop: the DiT reports the cancellation and serves the next job at once.
    started = time.monotonic()
    assert wait_done(client, _submit(client)["id"], timeout=30)["status"] == "completed"
    assert time.monotonic() - started < 15
    after = _dit_stats()
    assert after["cancelled"] + after["abandoned"] == before + 1


def test_queue_full_gets_429_with_retry_after(client: httpx.Client):
    accepted = []
    try:
        for _ in range(6):
            accepted.append(_submit(client, **LONG)["id"])
        r = client.post("/v1/videos", json={"prompt": "x", **SMALL})
        err = _error(r, 429)
        assert err["code"] == "queue_full" and r.headers["retry-after"] == "7"
    finally:
        for video_id in accepted:
            client.delete(f"/v1/videos/{video_id}")
    assert wait_done(client, _submit(client)["id"], timeout=60)["status"] == "completed"


def _metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_job_metrics_reach_rays_prometheus_endpoint(client: httpx.Client):
    import ray

    assert wait_done(client, _submit(client)["id"])["status"] == "completed"
    running = _submit(client, **LONG)
    _wait_progress(client, running["id"], above=5)
    client.delete(f"/v1/videos/{running['id']}")

    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = {
        ("ray_standin_jobs_accepted_total", ()): 2,
        ("ray_standin_jobs_finished_total", (("status", "completed"),)): 1,
        ("ray_standin_jobs_finished_total", (("status", "cancelled"),)): 1,
        ("ray_standin_denoise_step_seconds_count", ()): 2,
        ("ray_standin_job_queue_wait_seconds_count", ()): 2,  # both reached the DiT
        ("ray_standin_job_run_seconds_count", ()): 1,
    }
    deadline, missing = time.monotonic() + 90, wanted
    while missing and time.monotonic() < deadline:  # the agent exports every few seconds
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        missing = {k: v for k, v in wanted.items() if _metric_total(text, k[0], **dict(k[1])) < v}
        time.sleep(2)
    assert not missing, missing


# -- failures ------------------------------------------------------------------------------------


def test_killed_dit_worker_mid_job_is_retried_and_the_replica_is_replaced(client: httpx.Client):
    import ray

    old = _dit_stats()
    assert old["world_size"] == 2 and old["healthy"]
    video = _submit(client, **LONG)
    _wait_progress(client, video["id"], above=10)
    ray.kill(ray.get_actor(old["worker_names"][0], namespace="serve"), no_restart=True)

    done = wait_done(client, video["id"], timeout=180)
    # Either outcome is explicit; with 3 attempts and a fresh group it completes.
    assert done["status"] == "completed", done
    new = _dit_stats()
    assert new["healthy"] and new["worker_names"] != old["worker_names"]
    assert wait_done(client, _submit(client)["id"])["status"] == "completed"


def _kill_replica(app_deployment: str) -> str:
    """Kill the one replica actor of e.g. "standin#Ingress" → its replica id."""
    import ray

    found = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{app_deployment}#" in a["name"]]
    assert len(found) == 1, found
    ray.kill(ray.get_actor(found[0]["name"], namespace=found[0]["namespace"]), no_restart=True)
    return found[0]["name"].rsplit("#", 1)[-1]


def _wait_through_restarts(client: httpx.Client, video_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            r = client.get(f"/v1/videos/{video_id}")
            if r.status_code == 200 and r.json()["status"] in ("completed", "failed"):
                return r.json()
        time.sleep(0.5)
    raise AssertionError(f"{video_id} did not finish")


def _kill_mid_job(
    client: httpx.Client, store, deployment: str, timeout: float = 180, **fields: Any
) -> tuple[dict[str, Any], Any]:
    """Submit, kill `deployment`'s replica once the DiT is working on it, wait until the job ends
    (completed, or the test fails) → (its final video object, the lease of the first run)."""
    video = _submit(client, **fields)
    _wait_progress(client, video["id"], above=2)
    first = store.get(video["id"]).lease
    _kill_replica(deployment)
    done = _wait_through_restarts(client, video["id"], timeout)
    assert done["status"] == "completed", done
    return done, first


def test_killing_the_ingress_mid_job_does_not_restart_the_generation(client: httpx.Client, store):
    """The Ingress only serves HTTP: losing it (or rolling it) leaves the running job alone."""
    video, first = _kill_mid_job(client, store, "standin#Ingress", **LONG)
    job = store.get(video["id"])
    assert first.attempt == job.attempts == 1  # one run, never restarted
    assert job.result_key == f"{video['id']}.a1.mp4"
    assert read_mp4_info(client.get(f"/v1/videos/{video['id']}/content").content).num_frames == 17


@pytest.mark.timeout(600)
def test_a_killed_runner_job_is_claimed_again_and_the_dit_drops_the_stale_run(client: httpx.Client, store):
    """Two runs of one job, for real: the runner dies mid-generation; after its lease expires the
    replacement claims the job as attempt 2. The DiT stops the first run's steps (its lease moved
    on) and the job completes once, published under attempt 2's key."""
    stats = _dit_stats()
    stopped_before = stats["abandoned"] + stats["cancelled"]
    # Long enough that the replacement runner claims it while the DiT still works, on an idle
    # machine too (the lease expires after 4 s; this DiT stage takes ~25 s even unloaded).
    video, first = _kill_mid_job(client, store, "standin#JobRunner", 360, **{**LONG, "size": "384x384"})
    job = store.get(video["id"])
    assert job.attempts == 2 and job.lease_owner is None and first.attempt == 1
    assert job.result_key == f"{video['id']}.a2.mp4"
    stats = _dit_stats()
    assert stats["abandoned"] + stats["cancelled"] >= stopped_before + 1


def test_status_is_queued_with_a_position_until_the_dit_starts_the_job(client: httpx.Client):
    """Before: every submitted job said in_progress with started_at set while it waited."""
    running = _submit(client, **LONG)
    _wait_progress(client, running["id"], above=2)
    waiting = [_submit(client, face=None, seed=i) for i in range(2)]
    try:
        assert [w["status"] for w in waiting] == ["queued", "queued"]
        assert [w["queue_position"] for w in waiting] == [1, 2]
        for w in waiting:
            now = client.get(f"/v1/videos/{w['id']}").json()
            assert (now["status"], now["started_at"], now["progress"]) == ("queued", None, 0)
        busy = client.get(f"/v1/videos/{running['id']}").json()
        assert busy["status"] == "in_progress" and busy["started_at"] >= busy["created_at"]
        assert busy["queue_position"] is None
    finally:
        client.delete(f"/v1/videos/{running['id']}")
    for w in waiting:
        done = wait_done(client, w["id"])
        assert done["status"] == "completed" and done["started_at"] is not None


def test_an_error_after_the_202_is_a_permanent_failure_with_a_clean_message(
    client: httpx.Client, store, state
):
    """The job's reference image vanishes from the results store before a runner gets to it:
    the job fails once with `input_lost` — no retry, no traceback, path, host or pid."""
    blocker = _submit(client, **LONG)
    _wait_progress(client, blocker["id"], above=2)
    video = _submit(client)  # the only runner slot is busy: this one waits, unclaimed
    (state / "main" / "results" / f"{video['id']}.reference").unlink()
    client.delete(f"/v1/videos/{blocker['id']}")

    done = wait_done(client, video["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "input_lost", done
    message = done["error"]["message"]
    for leak in ("Traceback", "/", "pid", "ip=", "actor", "127.0.0.1", ".py"):
        assert leak not in message, message
    assert store.get(video["id"]).attempts == 1


def test_sse_events_carry_ids_and_keep_alive_comments_while_nothing_changes(client: httpx.Client):
    blocker = _submit(client, **LONG)
    _wait_progress(client, blocker["id"], above=2)
    waiting = _submit(client, face=None)
    try:
        lines = []
        with client.stream("GET", f"/v1/videos/{waiting['id']}/events") as r:
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith(": keep-alive"):
                    break
        assert lines[0].startswith("id: ") and lines[1] == "event: progress"
        first = json.loads(lines[2][len("data: ") :])
        assert first["status"] == "queued" and first["queue_position"] == 1
        # Reconnecting with the last id seen: no repeat of an unchanged state, only keep-alives.
        with client.stream(
            "GET", f"/v1/videos/{waiting['id']}/events", headers={"Last-Event-ID": lines[0][4:]}
        ) as r:
            assert next(r.iter_lines()).startswith(": keep-alive")
    finally:
        client.delete(f"/v1/videos/{blocker['id']}")
        client.delete(f"/v1/videos/{waiting['id']}")


# -- the second app: two DiT replicas, API keys, small limits -------------------------------------

KEYED_SMALL = {"size": "32x32", "num_frames": 5, "num_inference_steps": 3}


def test_two_dit_replicas_at_once_give_each_face_its_sequential_video(server: str):
    """Identity isolation under real concurrency: two jobs with different faces on two DiT
    replicas at the same time give exactly the videos each gives alone."""
    auth = {"Authorization": "Bearer key-alice"}
    faces = ("astronaut.jpg", "coffee.jpg")
    with httpx.Client(base_url=f"{server}/keyed", timeout=60, headers=auth) as c:

        def submit(face: str) -> str:
            files = {"input_reference": (face, (FACES / face).read_bytes(), "image/jpeg")}
            data = {"prompt": "a person talks", "seed": "3", **{k: str(v) for k, v in KEYED_SMALL.items()}}
            r = c.post("/v1/videos", data=data, files=files)
            assert r.status_code == 202, r.text
            return r.json()["id"]

        alone = {face: wait_done(c, submit(face))["frames_sha256"] for face in faces}
        assert len(set(alone.values())) == 2
        for _ in range(2):
            together = {face: submit(face) for face in faces}
            for face, video_id in together.items():
                done = wait_done(c, video_id)
                assert done["status"] == "completed" and done["frames_sha256"] == alone[face], face


def test_schemathesis_finds_no_server_error(server: str):
    """Fuzz every operation of the live app's own OpenAPI document (both request bodies)."""
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck

    auth = {"Authorization": "Bearer key-alice"}
    schema = schemathesis.openapi.from_url(f"{server}/keyed/openapi.json")
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @hypothesis.settings(
            max_examples=25,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis.given(case=operation.as_strategy())
        def fuzz(case) -> None:
            response = case.call(base_url=f"{server}/keyed", headers=auth, timeout=30)
            if response.status_code >= 500:
                failures.append((case.method, case.formatted_path, response.status_code, response.text[:300]))

        fuzz()
    assert not failures, failures[:5]
    with httpx.Client(base_url=f"{server}/keyed", timeout=60, headers=auth) as c:
        for video in c.get("/v1/videos", params={"limit": 100}).json()["data"]:
            c.delete(f"/v1/videos/{video['id']}")
