"""VACE control through the served API (issue 15), on the session's local Ray cluster
(tests/conftest.py): its own application under /vace, tiny preset (with its shipped VACE branch),
one DiT replica of 2 ranks over gloo (so the runner's SP path carries the control context).

The control video is a held-out glyph's silhouette track (white on black, 40×36, 10 frames →
32×32, 9 frames), as the tiny branch was trained on.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from standin.training.synthetic import render_clip, render_reference
from standin.training.tiny_recipe import tiny_identities
from standin.video import read_mp4_info
from tests.serving import deployed_app, mp4_bytes, png_bytes, wait_done

PREFIX = "/vace"
MAX_VIDEO_BYTES = 200_000



@pytest.fixture(scope="module")
def uploads() -> dict[str, bytes]:
    _, held = tiny_identities()
    clip = render_clip(held[0], 3, size=48, num_frames=5, direction="right", background="navy")
    order = [0, 1, 2, 3, 4, 4, 3, 2, 1, 0]
    silhouette = np.repeat((clip.mask[order][:, 5:41, 4:44].astype(np.uint8) * 255)[..., None], 3, axis=-1)
    return {
        "control": mp4_bytes(silhouette),
        "face": png_bytes(render_reference(held[0], 64)),
        "first": png_bytes(np.full((20, 30, 3), 90, np.uint8)),
    }


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vace-state")


@pytest.fixture(scope="module")
def server(ray_serve: str, state: Path) -> Iterator[str]:
    with deployed_app(
        "vace",
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




def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


BASE = {"prompt": "moves right on navy", "num_inference_steps": "2", "subject": "object", "seed": "3"}


@pytest.mark.slow
def test_multipart_control_round_trip_takes_the_controls_size_and_frames(client, uploads, state: Path):
    files = {
        "input_reference": ("face.png", uploads["face"], "image/png"),
        "control_video": ("ctrl.mp4", uploads["control"], "video/mp4"),
    }
    r = client.post("/v1/videos", data={**BASE, "vace_scale": "1.0"}, files=files)
    assert r.status_code == 202, r.text
    v = r.json()
    assert (v["mode"], v["size"], v["num_frames"]) == ("vace_control", "32x32", 9)
    done = wait_done(client, v["id"], 240.0)
    assert done["status"] == "completed", done
    info = read_mp4_info(client.get(f"/v1/videos/{v['id']}/content").content)
    assert (info.width, info.height, info.num_frames) == (32, 32, 9)
    left = sorted(p.name for p in (state / "results").glob(f"{v['id']}.*"))
    assert left == [f"{v['id']}.a1.mp4"], left  # the control upload is deleted with the inputs


@pytest.mark.slow
def test_json_control_with_a_first_frame_drops_the_reference_frame(client, uploads):
    body = {
        "prompt": "moves right on navy",
        "num_inference_steps": 2,
        "control_video": _data_url(uploads["control"], "video/mp4"),
        "first_frame": _data_url(uploads["first"], "image/png"),
    }
    r = client.post("/v1/videos", json=body)
    assert r.status_code == 202, r.text
    done = wait_done(client, r.json()["id"], 240.0)
    assert done["status"] == "completed", done
    info = read_mp4_info(client.get(f"/v1/videos/{done['id']}/content").content)
    assert (info.width, info.height, info.num_frames) == (32, 32, 9)


@pytest.mark.slow
def test_bad_control_input_is_a_clean_4xx(client, uploads):
    ctrl = _data_url(uploads["control"], "video/mp4")
    cases = [
        ({"control_video": _data_url(b"\x00\x00\x00\x18ftypmp42xx", "video/mp4")}, 400, "control_video"),
        ({"control_video": {"video_url": "https://example.com/a.mp4"}}, 400, "control_video"),
        ({"control_mask": ctrl}, 400, "control_mask"),  # a mask without a control video
        ({"first_frame": _data_url(uploads["first"], "image/png")}, 400, "first_frame"),
        ({"vace_scale": 0.5}, 400, "vace_scale"),
        ({"control_video": ctrl, "vace_scale": 11}, 422, "vace_scale"),
        ({"control_video": ctrl, "size": "64x64"}, 400, "size"),
        ({"control_video": ctrl, "first_frame": _data_url(b"not an image", "image/png")}, 400, "first_frame"),
        ({"control_video": ctrl, "input_video": ctrl}, 400, "control_video"),
    ]
    for extra, status, param in cases:
        r = client.post("/v1/videos", json={"prompt": "p", **extra})
        assert r.status_code == status, (extra.keys(), r.text)
        err = r.json()["error"]
        assert err["param"] == param and "Traceback" not in err["message"]
    big = np.random.default_rng(0).integers(0, 255, (40, 64, 64, 3), dtype=np.uint8)
    files = {"control_video": ("big.mp4", mp4_bytes(big), "video/mp4")}
    r = client.post("/v1/videos", data=BASE, files=files)
    assert r.status_code == 413 and r.json()["error"]["param"] == "control_video"


@pytest.mark.slow
def test_openapi_documents_the_control_fields(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("control_video", "control_mask", "first_frame", "vace_scale"):
        assert name in schemas["CreateVideoJSON"]["properties"]
        assert name in schemas["CreateVideoForm"]["properties"]


@pytest.mark.slow
def test_cli_generate_server_with_control_video_round_trip(server: str, uploads, tmp_path: Path):
    from serve_app import cli as serving_cli

    for name in ("control", "first"):
        (tmp_path / name).write_bytes(uploads[name])
    out = tmp_path / "out.mp4"
    argv = [
        "generate", "--server", server + PREFIX, "--prompt", "moves right on navy", "--steps", "1",
        "--control-video", str(tmp_path / "control"), "--first-frame", str(tmp_path / "first"),
        "--vace-scale", "0.9", "-o", str(out),
    ]  # fmt: skip
    assert serving_cli.main(argv) == 0
    info = read_mp4_info(out.read_bytes())
    assert (info.width, info.height, info.num_frames) == (32, 32, 9)


def test_gpu_vace_profile_serves_the_vace_preset_on_the_gpu_profiles_resources():
    import yaml

    from serve_app.launcher import PROFILES
    from serve_app.settings import ServeSettings, replicas_of

    config = yaml.safe_load(PROFILES["gpu-vace"].read_text())
    app = config["applications"][0]
    settings = ServeSettings.from_args(app["args"], env={}, replicas=replicas_of(app["deployments"]))
    assert settings.preset == "wan2.1-vace-14b" and settings.model_name == "stand-in-wan2.1-vace-14b"
    assert settings.world_size == 8
    wan21 = yaml.safe_load(PROFILES["gpu"].read_text())["applications"][0]
    assert app["deployments"] == wan21["deployments"]  # same placement on one 8-GPU node


def test_a_control_request_takes_its_shape_from_the_control_and_records_its_uploads(uploads):
    from serve_app.api import APIError, parse_video_request
    from serve_app.settings import ServeSettings
    from serve_app.vace import control_upload

    settings = ServeSettings.from_args({"device": "cpu", "max_video_bytes": MAX_VIDEO_BYTES}, env={})
    control = control_upload(uploads["control"], None, uploads["first"], settings)
    fields = {"prompt": "p", "vace_scale": "0.5"}
    request = parse_video_request(fields, None, settings, form=True, control=control)
    job = request.to_job_request()
    assert (job["width"], job["height"], job["num_frames"]) == (32, 32, 9)
    assert (job["mode"], job["vace_scale"], job["has_first_frame"], job["has_control_mask"]) == (
        "vace_control", 0.5, True, False
    )
    wan22 = ServeSettings.from_args({"device": "cpu", "preset": "tiny-a14b"}, env={})
    with pytest.raises(APIError, match="no VACE branch"):
        parse_video_request({"prompt": "p"}, None, wan22, form=True, control=control)
