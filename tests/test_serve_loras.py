"""Style LoRAs through the served API (issue 13), on the session's local Ray cluster
(tests/conftest.py): its own application under /loras, tiny preset, two DiT replicas of 2 ranks
each over gloo (so Ray Serve's multiplexing has a choice, and every rank resolves the names from
its own cache), lora_dir a temp directory holding the tiny palette style, a second style written
here (A/B format), a garbage file and a pickle.

The served video is compared with the one-process pipeline by the fingerprint of its decoded
frames (`frames_sha256`, computed before H.264): the tiny model's SP=2 runner is bit-identical
to `StandInPipeline.denoise` with the same StyleSet (tests/test_styles_sp_runner.py).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.serving import deployed_app, wait_done

pytestmark = pytest.mark.slow

PREFIX = "/loras"
REPO = Path(__file__).resolve().parent.parent
BASE = {
    "prompt": "moves right on navy",
    "size": "32x32",
    "num_frames": 5,
    "num_inference_steps": 2,
    "seed": 7,
}


def _write_ab_style(path: Path) -> None:
    """A rank-4 style in the official A/B naming on every attention and FFN layer of tiny."""
    from safetensors.torch import save_file

    from standin.presets import get_preset
    from standin.styles import style_targets

    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, target in style_targets(get_preset("tiny").dit).items():
        if name.startswith("blocks.") and target.applicable and (".self_attn." in name or ".ffn." in name):
            out_f, in_f = target.weight
            tensors[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(4, in_f, generator=gen) * 0.3
            tensors[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(out_f, 4, generator=gen) * 0.3
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lora-dir")
    shutil.copy(REPO / "examples" / "tiny_palette_style.safetensors", d / "palette.safetensors")
    _write_ab_style(d / "swirl.safetensors")
    (d / "garbage.safetensors").write_bytes(b"\x00" * 64)
    (d / "evil.pt").write_bytes(b"\x80\x04\x95\x00\x00\x00\x00.")  # a pickle: never opened
    return d


@pytest.fixture(scope="module")
def server(ray_serve: str, lora_dir: Path, tmp_path_factory) -> Iterator[str]:
    with deployed_app(
        "loras",
        PREFIX,
        {
            "sp_degree": 2,
            "worker_num_cpus": 0.1,
            "collective_timeout_s": 30,
            "state_dir": str(tmp_path_factory.mktemp("loras-state")),
            "lora_dir": str(lora_dir),
            "max_loras_per_request": 2,
            "lora_cache_count": 1,  # a request stacking two styles evicts on every rank
            "max_width": 64,
            "max_height": 64,
        },
        deployments=[{"name": "DiTReplica", "num_replicas": 2}],
    ):
        yield ray_serve


@pytest.fixture
def client(server: str):
    with httpx.Client(base_url=server + PREFIX, timeout=60) as c:
        yield c




def _run(client: httpx.Client, loras: list[dict[str, Any]] | None, **fields: Any) -> dict[str, Any]:
    body = {**BASE, **fields, **({"loras": loras} if loras is not None else {})}
    r = client.post("/v1/videos", json=body)
    assert r.status_code == 202, r.text
    done = wait_done(client, r.json()["id"])
    assert done["status"] == "completed", done
    return done


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == "loras"
    return err


@pytest.fixture(scope="module")
def pipeline_frames(lora_dir: Path):
    """frames_sha256 of the one-process pipeline for a list of (name, scale)."""
    from standin.pipeline import DenoiseInputs, GenerationParams, StandInPipeline
    from standin.styles import StyleLoRA, StyleSet
    from standin.video import to_uint8_frames

    pipe = StandInPipeline.from_preset("tiny")
    params = GenerationParams(
        prompt=BASE["prompt"], width=32, height=32, num_frames=5, num_steps=2, seed=BASE["seed"]
    )
    ctx, neg = pipe.encode_prompts(params.prompt, params.negative_prompt)

    @torch.no_grad()
    def frames(styles: list[tuple[str, float]]) -> str:
        loaded = [(StyleLoRA.load(lora_dir / f"{n}.safetensors", pipe.dit, name=n), s) for n, s in styles]
        adapters = StyleSet(loaded) if loaded else None
        latents = pipe.denoise(DenoiseInputs.for_request(params, ctx, neg, None, adapters=adapters))
        video = pipe.vae.decode(latents.float()).float().cpu()
        return hashlib.sha256(to_uint8_frames(video).tobytes()).hexdigest()

    return frames


def test_get_loras_lists_what_a_request_may_name_and_why_files_are_refused(client, lora_dir):
    r = client.get("/v1/loras")
    assert r.status_code == 200, r.text
    body = r.json()
    by_name = {d["name"]: d for d in body["data"]}
    assert set(by_name) == {"palette", "swirl"}
    assert by_name["swirl"]["format"] == "ab" and by_name["swirl"]["rank"] == 4
    palette = by_name["palette"]
    raw = (lora_dir / "palette.safetensors").read_bytes()
    assert palette["bytes"] == len(raw) and palette["sha256"] == hashlib.sha256(raw).hexdigest()
    assert palette["layers"] > 0 and palette["rank"] > 0
    refused = {u["name"]: u["error"] for u in body["unusable"]}
    assert set(refused) == {"garbage", "evil"} and "pickle" in refused["evil"]

    doc = client.get("/openapi.json").json()
    assert "/v1/loras" in doc["paths"]
    assert "loras" in doc["components"]["schemas"]["CreateVideoJSON"]["properties"]
    assert "loras" in doc["components"]["schemas"]["CreateVideoForm"]["properties"]


def test_a_styled_video_equals_the_pipelines_with_the_same_style(client, pipeline_frames):
    styled = _run(client, [{"name": "palette", "scale": 0.8}])
    assert styled["loras"] == [{"name": "palette", "scale": 0.8, "expert": "both"}]
    assert styled["frames_sha256"] == pipeline_frames([("palette", 0.8)])
    plain = _run(client, None)
    assert plain["loras"] == [] and plain["frames_sha256"] == pipeline_frames([])
    assert plain["frames_sha256"] != styled["frames_sha256"]
    # multipart: the list as a JSON string; two styles stack
    r = client.post(
        "/v1/videos",
        data={
            **{k: str(v) for k, v in BASE.items()},
            "loras": json.dumps([{"name": "palette"}, {"name": "swirl", "scale": 0.5}]),
        },
    )
    assert r.status_code == 202, r.text
    stacked = wait_done(client, r.json()["id"])
    assert stacked["status"] == "completed", stacked
    assert stacked["frames_sha256"] == pipeline_frames([("palette", 1.0), ("swirl", 0.5)])


def test_two_concurrent_requests_with_different_styles_each_equal_their_solo_run(client):
    styles = {"palette": [{"name": "palette", "scale": 1.0}], "swirl": [{"name": "swirl", "scale": 0.7}]}
    alone = {name: _run(client, loras)["frames_sha256"] for name, loras in styles.items()}
    assert alone["palette"] != alone["swirl"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = {pool.submit(_run, client, loras): name for _ in range(2) for name, loras in styles.items()}
        for future, name in futures.items():
            assert future.result()["frames_sha256"] == alone[name], name


def test_unknown_names_bad_files_and_bad_fields_are_refused_at_submission(client):
    before = len(client.get("/v1/videos", params={"limit": 100}).json()["data"])
    err = _error(client.post("/v1/videos", json={**BASE, "loras": [{"name": "ghibli"}]}), 404)
    assert err["code"] == "lora_not_found" and "ghibli" in err["message"]
    err = _error(client.post("/v1/videos", json={**BASE, "loras": [{"name": "garbage"}]}), 422)
    assert err["code"] == "invalid_lora" and "safetensors" in err["message"]
    err = _error(client.post("/v1/videos", json={**BASE, "loras": [{"name": "evil"}]}), 422)
    assert err["code"] == "invalid_lora" and "pickle" in err["message"]
    _error(client.post("/v1/videos", json={**BASE, "loras": [{"name": "../palette"}]}), 400)
    _error(client.post("/v1/videos", json={**BASE, "loras": [{"name": "palette", "scale": 99}]}), 422)
    three = [{"name": "palette"}, {"name": "swirl"}, {"name": "x"}]
    _error(client.post("/v1/videos", json={**BASE, "loras": three}), 422)
    _error(client.post("/v1/videos", json={**BASE, "loras": "palette"}), 400)
    form = {k: str(v) for k, v in BASE.items()}
    _error(client.post("/v1/videos", data={**form, "loras": "[{"}), 400)
    assert len(client.get("/v1/videos", params={"limit": 100}).json()["data"]) == before  # no job made


def test_each_replica_loads_a_style_once_and_reports_its_cache(client):
    from ray import serve

    _run(client, [{"name": "palette", "scale": 1.0}])
    handle = serve.get_deployment_handle("DiTReplica", app_name="loras")
    seen = [handle.stats.remote().result(timeout_s=60)["styles"] for _ in range(8)]
    assert all(s is not None for s in seen)
    for s in seen:
        assert s["count"] <= 1  # lora_cache_count
        assert s["loads"] <= s["evictions"] + s["count"]  # a file is loaded again only after eviction


def _metric_total(text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (every label set) of the app's model."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and 'model="tiny"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_lora_cache_metrics_reach_rays_prometheus_endpoint(client):
    import ray

    _run(client, [{"name": "palette"}, {"name": "swirl"}])  # cache of 1: loads and evicts
    _run(client, [{"name": "swirl"}])  # the set just used: a hit where it runs again
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = (
        "ray_standin_lora_loads_total",
        "ray_standin_lora_evictions_total",
        "ray_standin_lora_load_seconds_count",
        "ray_standin_lora_cache_hits_total",
    )
    deadline, missing = time.monotonic() + 90, wanted
    while missing and time.monotonic() < deadline:  # the agent exports every few seconds
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        missing = tuple(name for name in wanted if _metric_total(text, name) < 1)
        time.sleep(2)
    assert not missing, missing
