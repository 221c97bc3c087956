"""The Serve application end to end, on a real local Ray cluster (tests/conftest.py: one per session).

The main app is the CPU profile at test sizes: tiny preset, one DiT replica of 2 ranks over gloo.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from standin.video import decode_mp4, read_mp4_info

pytestmark = pytest.mark.slow

FACES = Path(__file__).parent / "data" / "faces"
SMALL = {"size": "32x32", "num_frames": 5, "num_inference_steps": 2, "seed": 7}
LONG = {"size": "128x128", "num_frames": 17, "num_inference_steps": 100, "seed": 3}
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
def server(ray_serve: str, tmp_path_factory) -> str:
    """Deploys the main app (SP=2) and a small API-key app; → base URL."""
    from ray import serve

    from serve_app.app import build_app

    state = tmp_path_factory.mktemp("serve-state")
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
            }
        ),
        name="standin",
        route_prefix="/",
    )
    with _env(STANDIN_API_KEYS="key-alice,key-bob"):
        keyed = build_app({"sp_degree": 1, "state_dir": str(state / "keyed"), "worker_num_cpus": 0.2})
    serve.run(keyed, name="keyed", route_prefix="/keyed")
    return ray_serve


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


def _wait(client: httpx.Client, video_id: str, timeout: float = 120.0, prefix: str = "") -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = client.get(f"{prefix}/v1/videos/{video_id}").json()
        if v["status"] in ("completed", "failed", "cancelled"):
            return v
        time.sleep(0.2)
    raise AssertionError(f"{video_id} did not finish in {timeout}s: {v}")


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

    done = _wait(client, video["id"])
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
        assert _wait(client, i)["status"] == "completed"
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
        return _wait(client, _submit(client, face)["id"])["frames_sha256"]

    alone = {face: run_alone(face) for face in ("astronaut.jpg", "coffee.jpg", None)}
    assert len(set(alone.values())) == 3, "different faces (or none) must give different videos"

    together = {face: _submit(client, face)["id"] for face in ("astronaut.jpg", "coffee.jpg", None)}
    for face, video_id in together.items():
        done = _wait(client, video_id)
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
        (
            {
                "prompt": "x",
                "input_reference": {
                    "image_url": "data:image/png;base64," + base64.b64encode(b"hello").decode()
                },
            },
            415,
            "input_reference",
        ),
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
        assert _wait(alice, video["id"], prefix="")["status"] == "completed"
        assert alice.get(f"/v1/videos/{video['id']}/content").status_code == 200
        # Bob cannot see, fetch or delete Alice's job: it does not exist for him.
        _error(bob.get(f"/v1/videos/{video['id']}"), 404)
        _error(bob.get(f"/v1/videos/{video['id']}/content"), 404)
        _error(bob.delete(f"/v1/videos/{video['id']}"), 404)
        assert bob.get("/v1/videos").json()["data"] == []
        assert [v["id"] for v in alice.get("/v1/videos").json()["data"]] == [video["id"]]


# -- load and cancellation -----------------------------------------------------------------------


def test_delete_cancels_a_running_job_and_frees_the_dit(client: httpx.Client):
    before = _dit_stats()["cancelled"]
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
    assert _wait(client, _submit(client)["id"], timeout=30)["status"] == "completed"
    assert time.monotonic() - started < 15
    assert _dit_stats()["cancelled"] == before + 1


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
    assert _wait(client, _submit(client)["id"], timeout=60)["status"] == "completed"


def _metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_job_metrics_reach_rays_prometheus_endpoint(client: httpx.Client):
    import ray

    assert _wait(client, _submit(client)["id"])["status"] == "completed"
    running = _submit(client, **LONG)
    _wait_progress(client, running["id"], above=5)
    client.delete(f"/v1/videos/{running['id']}")

    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = {
        ("ray_standin_jobs_accepted_total", ()): 2,
        ("ray_standin_jobs_finished_total", (("status", "completed"),)): 1,
        ("ray_standin_jobs_finished_total", (("status", "cancelled"),)): 1,
        ("ray_standin_denoise_step_seconds_count", ()): 2,
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

    done = _wait(client, video["id"], timeout=180)
    # Either outcome is explicit; with 3 attempts and a fresh group it completes.
    assert done["status"] == "completed", done
    new = _dit_stats()
    assert new["healthy"] and new["worker_names"] != old["worker_names"]
    assert _wait(client, _submit(client)["id"])["status"] == "completed"


def test_killed_ingress_mid_job_is_recovered_from_the_job_store(client: httpx.Client):
    import ray

    video = _submit(client, **LONG)
    _wait_progress(client, video["id"], above=5)
    ingress = [a for a in ray.util.list_named_actors(all_namespaces=True) if "standin#Ingress" in a["name"]]
    assert len(ingress) == 1, ingress
    ray.kill(ray.get_actor(ingress[0]["name"], namespace=ingress[0]["namespace"]), no_restart=True)

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            r = client.get(f"/v1/videos/{video['id']}")
            if r.status_code == 200 and r.json()["status"] in ("completed", "failed"):
                break
        time.sleep(0.5)
    done = r.json()
    assert done["status"] == "completed", done
    assert read_mp4_info(client.get(f"/v1/videos/{video['id']}/content").content).num_frames == 17
