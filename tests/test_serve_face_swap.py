"""Face swap through the served API (issue 14), on the session's local Ray cluster
(tests/conftest.py): its own application under /faceswap, tiny preset, one DiT replica of 2
ranks over gloo (so the runner's SP path carries the face swap).

Uploads are real small MP4s made here: a held-out glyph moving right on navy (40×36, 10 frames
at 12 fps → 32×32, 9 frames, 12 fps), its subject mask, and another glyph's reference.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from standin.training.synthetic import render_clip, render_reference
from standin.training.tiny_recipe import tiny_identities
from standin.video import read_mp4_info
from tests.serving import deployed_app, mp4_bytes, png_bytes, wait_done

pytestmark = pytest.mark.slow

PREFIX = "/faceswap"
MAX_VIDEO_BYTES = 200_000



@pytest.fixture(scope="module")
def uploads() -> dict[str, bytes]:
    _, held = tiny_identities()
    clip = render_clip(held[0], 3, size=48, num_frames=5, direction="right", background="navy")
    order = [0, 1, 2, 3, 4, 4, 3, 2, 1, 0]
    frames = clip.video[order][:, 5:41, 4:44]
    masks = np.repeat((clip.mask[order][:, 5:41, 4:44].astype(np.uint8) * 255)[..., None], 3, axis=-1)
    video = mp4_bytes(frames)
    corrupt = bytearray(video)
    mdat = corrupt.index(b"mdat")
    size = int.from_bytes(corrupt[mdat - 4 : mdat], "big")
    corrupt[mdat + 4 : mdat - 4 + size] = bytes(size - 8)  # the header stays valid, the frames do not
    return {
        "video": video,
        "mask": mp4_bytes(masks),
        "face": png_bytes(render_reference(held[1], 64)),
        "corrupt": bytes(corrupt),
    }


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faceswap-state")


@pytest.fixture(scope="module")
def server(ray_serve: str, state: Path) -> Iterator[str]:
    with deployed_app(
        "faceswap",
        PREFIX,
        {
            "sp_degree": 2,
            "state_dir": str(state),
            "collective_timeout_s": 30,
            "max_video_bytes": MAX_VIDEO_BYTES,
            "max_frames": 17,
            "max_width": 64,
            "max_height": 64,
        },
    ):
        yield ray_serve


@pytest.fixture
def client(server: str):
    with httpx.Client(base_url=server + PREFIX, timeout=60) as c:
        yield c




def _data_url(data: bytes, mime: str, key: str) -> dict[str, str]:
    return {key: f"data:{mime};base64," + base64.b64encode(data).decode()}


BASE = {"prompt": "moves right on navy", "num_inference_steps": "2", "subject": "object", "seed": "3"}


def test_multipart_face_swap_round_trip_keeps_the_videos_size_frames_and_fps(client, uploads):
    files = {
        "input_reference": ("face.png", uploads["face"], "image/png"),
        "input_video": ("in.mp4", uploads["video"], "video/mp4"),
        "input_mask": ("mask.mp4", uploads["mask"], "video/mp4"),
    }
    data = {**BASE, "denoising_strength": "0.7", "background_consistency": "true"}
    r = client.post("/v1/videos", data=data, files=files)
    assert r.status_code == 202, r.text
    v = r.json()
    assert (v["mode"], v["size"], v["num_frames"], v["fps"]) == ("face_swap", "32x32", 9, 12.0)
    assert (v["denoising_strength"], v["background_consistency"], v["has_mask"]) == (0.7, True, True)
    done = wait_done(client, v["id"])
    assert done["status"] == "completed", done
    content = client.get(f"/v1/videos/{v['id']}/content")
    assert content.status_code == 200
    info = read_mp4_info(content.content)
    assert (info.width, info.height, info.num_frames) == (32, 32, 9)
    assert info.fps == pytest.approx(12.0)


def test_json_face_swap_with_data_urls_and_the_detected_mask(client, uploads):
    body = {
        "prompt": "moves right on navy",
        "num_inference_steps": 1,
        "subject": "object",
        "input_reference": _data_url(uploads["face"], "image/png", "image_url"),
        "input_video": _data_url(uploads["video"], "video/mp4", "video_url"),
    }
    r = client.post("/v1/videos", json=body)
    assert r.status_code == 202, r.text
    v = r.json()
    assert (v["mode"], v["denoising_strength"], v["background_consistency"]) == ("face_swap", 0.85, False)
    assert wait_done(client, v["id"])["status"] == "completed"
    plain = client.post("/v1/videos", json={"prompt": "moves right on navy", "num_inference_steps": 1})
    assert plain.json()["mode"] == "text_to_video"


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_bad_face_swap_requests_are_refused_at_submission(client, uploads):
    face = _data_url(uploads["face"], "image/png", "image_url")
    video = _data_url(uploads["video"], "video/mp4", "video_url")
    base = {"prompt": "p", "subject": "object", "input_reference": face}
    cases = [
        ({**base, "input_video": _data_url(b"\x00\x00\x00\x18ftypmp42xx", "video/mp4", "video_url")}, 400),
        ({**base, "input_video": {"video_url": "https://example.com/a.mp4"}}, 400),
        ({**base, "input_mask": video}, 400),  # a mask without a video
        ({**base, "input_video": video, "denoising_strength": 0}, 422),
        ({**base, "input_video": video, "background_consistency": "maybe"}, 400),
        ({**base, "input_video": video, "size": "64x64"}, 400),
        ({"prompt": "p", "input_video": video}, 400),  # no face
        ({**base, "denoising_strength": 0.5}, 400),  # not a face swap
    ]
    params = []
    for body, status in cases:
        err = _error(client.post("/v1/videos", json=body), status)
        params.append(err["param"])
    assert params == [
        "input_video",
        "input_video",
        "input_mask",
        "denoising_strength",
        "background_consistency",
        "size",
        "input_reference",
        "denoising_strength",
    ]
    big = np.random.default_rng(0).integers(0, 255, (40, 64, 64, 3), dtype=np.uint8)
    files = {
        "input_reference": ("face.png", uploads["face"], "image/png"),
        "input_video": ("big.mp4", mp4_bytes(big), "video/mp4"),
    }
    assert len(files["input_video"][1]) > MAX_VIDEO_BYTES
    err = _error(client.post("/v1/videos", data=BASE, files=files), 413)
    assert err["param"] == "input_video"


def test_a_video_that_fails_only_when_decoded_fails_the_job_cleanly(client, uploads):
    files = {
        "input_reference": ("face.png", uploads["face"], "image/png"),
        "input_video": ("bad.mp4", uploads["corrupt"], "video/mp4"),
    }
    r = client.post("/v1/videos", data=BASE, files=files)
    assert r.status_code == 202, r.text  # the header is fine: known only when decoded
    done = wait_done(client, r.json()["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "invalid_video"
    message = done["error"]["message"]
    assert message.startswith("input video: ") and "Traceback" not in message and "/" not in message


def test_openapi_documents_the_face_swap_fields(client):
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for name in ("input_video", "input_mask", "denoising_strength", "background_consistency"):
        assert name in schemas["CreateVideoJSON"]["properties"]
        assert name in schemas["CreateVideoForm"]["properties"]
    assert "mode" in schemas["Video"]["properties"]


def test_uploads_are_deleted_when_the_job_ends(client, uploads, state: Path):
    files = {
        "input_reference": ("face.png", uploads["face"], "image/png"),
        "input_video": ("in.mp4", uploads["video"], "video/mp4"),
        "input_mask": ("mask.mp4", uploads["mask"], "video/mp4"),
    }
    r = client.post("/v1/videos", data={**BASE, "num_inference_steps": "1"}, files=files)
    assert r.status_code == 202
    video_id = r.json()["id"]
    assert wait_done(client, video_id)["status"] == "completed"
    left = sorted(p.name for p in (state / "results").glob(f"{video_id}.*"))
    assert left == [f"{video_id}.a1.mp4"], left


def test_cli_generate_server_with_video_round_trip(server: str, uploads, tmp_path: Path):
    from serve_app import cli as serving_cli

    for name in ("video", "mask", "face"):
        (tmp_path / name).write_bytes(uploads[name])
    out = tmp_path / "out.mp4"
    argv = [
        "generate", "--server", server + PREFIX, "--prompt", "moves right on navy", "--steps", "1",
        "--image", str(tmp_path / "face"), "--subject", "object", "--video", str(tmp_path / "video"),
        "--mask", str(tmp_path / "mask"), "--background-consistency", "-o", str(out),
    ]  # fmt: skip
    assert serving_cli.main(argv) == 0
    info = read_mp4_info(out.read_bytes())
    assert (info.width, info.height, info.num_frames) == (32, 32, 9)
    assert info.fps == pytest.approx(12.0)
