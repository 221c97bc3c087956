"""Smoke tests of benchmarks/: each runs on tiny settings and writes well-formed results.

Benchmarks are not tests: nothing here asserts how fast anything is. The checks are that the
numbers are computed from what happened (counts, outcomes, FLOPs) and saved as JSON + PNG.
"""

from __future__ import annotations

import email.parser
import json
import os
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import load, model
from benchmarks.flops import Tokens, dit_forward_flops, token_counts
from standin.attention import configure_attention
from standin.config import DiTConfig
from standin.dit import WanDiT
from standin.presets import dit_preset

REPO = Path(__file__).resolve().parent.parent
FAKE_MP4 = b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64


# -- a stand-in for the server's HTTP contract ------------------------------------------------


class FakeVideoServer:
    """A real HTTP server on 127.0.0.1 speaking only the three calls the load generator uses
    (POST /v1/videos, GET /v1/videos/{id}, GET /v1/videos/{id}/content), with jobs that sit
    `queue_s` in `queued` and `generate_s` in `in_progress`. It stands in for the API contract
    of issue 6 while serve_app's ingress does not exist; it is not the real server.

    capacity: jobs not yet finished beyond it get 429 + Retry-After. fail_every: every n-th job
    ends `failed`. workers: how many jobs make progress at once (the rest wait queued), which
    gives throughput a ceiling for the sweep.
    """

    def __init__(self, queue_s: float = 0.05, generate_s: float = 0.15, capacity: int = 1000,
                 fail_every: int = 0, workers: int = 1000) -> None:
        self.queue_s, self.generate_s = queue_s, generate_s
        self.capacity, self.fail_every, self.workers = capacity, fail_every, workers
        self.jobs: dict[str, dict] = {}
        self.forms: list[dict[str, bytes]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeVideoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _advance(self, now: float) -> None:
        """Move jobs along: a job starts when a worker is free, finishes generate_s later."""
        running = [j for j in self.jobs.values() if j["status"] == "in_progress"]
        for j in running:
            if now >= j["_started"] + self.generate_s:
                j["status"] = "failed" if j["_fail"] else "completed"
                j["progress"] = 100 if not j["_fail"] else j["progress"]
                j["completed_at"] = int(time.time())
                if j["_fail"]:
                    j["error"] = {"code": "generation_error", "message": "fake failure"}
        busy = sum(1 for j in self.jobs.values() if j["status"] == "in_progress")
        for j in sorted(self.jobs.values(), key=lambda j: j["_created"]):
            if j["status"] == "queued" and busy < self.workers and now >= j["_created"] + self.queue_s:
                j.update(status="in_progress", _started=now, started_at=int(time.time()), progress=50)
                busy += 1

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, code: str, headers: dict | None = None) -> None:
                err = {"message": code, "type": "invalid_request_error", "param": None, "code": code}
                self._json(status, {"error": err}, headers)

            def do_POST(self) -> None:
                if self.path != "/v1/videos":
                    return self._error(404, "not_found")
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                msg = email.parser.BytesParser().parsebytes(
                    f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + raw
                )
                if not msg.is_multipart():
                    return self._error(415, "unsupported_media_type")
                form = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                        for p in msg.get_payload()}
                with server.lock:
                    server.forms.append(form)
                    now = time.monotonic()
                    server._advance(now)
                    statuses = [j["status"] for j in server.jobs.values()]
                    open_jobs = statuses.count("queued") + statuses.count("in_progress")
                    if open_jobs >= server.capacity:
                        return self._error(429, "queue_full", {"Retry-After": "2"})
                    n = len(server.jobs) + 1
                    job = {
                        "id": "video_" + uuid.uuid4().hex, "object": "video", "status": "queued",
                        "progress": 0, "created_at": int(time.time()), "size": form["size"].decode(),
                        "_created": now, "_fail": bool(server.fail_every and n % server.fail_every == 0),
                    }
                    server.jobs[job["id"]] = job
                    return self._json(200, _public(job))

            def do_GET(self) -> None:
                parts = self.path.strip("/").split("/")
                with server.lock:
                    server._advance(time.monotonic())
                    is_video = len(parts) >= 3 and parts[:2] == ["v1", "videos"]
                    job = server.jobs.get(parts[2]) if is_video else None
                    if job is None:
                        return self._error(404, "video_not_found")
                    if len(parts) == 3:
                        return self._json(200, _public(job))
                    if parts[3:] == ["content"] and job["status"] == "completed":
                        self.send_response(200)
                        self.send_header("Content-Type", "video/mp4")
                        self.send_header("Content-Length", str(len(FAKE_MP4)))
                        self.end_headers()
                        self.wfile.write(FAKE_MP4)
                        return None
                    return self._error(404, "content_not_ready")

        return Handler


def _public(job: dict) -> dict:
    return {k: v for k, v in job.items() if not k.startswith("_")}


def _config(url: str, **kw: object) -> load.LoadConfig:
    base = dict(url=url, poll_interval=0.02, timeout=20.0, deadline=30.0, warmup=1, requests=4, concurrency=2)
    base.update(kw)
    return load.LoadConfig(**base)  # type: ignore[arg-type]


def _read_json(path: Path) -> dict:
    # allow_nan=False on write; parse strictly too (NaN/Infinity are not JSON).
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


# -- load generator --------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_load_run_completes_every_request_and_writes_json(tmp_path: Path) -> None:
    with FakeVideoServer() as server:
        report = load.main(["run", "--url", server.url, "--concurrency", "2", "--requests", "4",
                            "--warmup", "1", "--poll-interval", "0.02", "--steps", "3",
                            "--out-dir", str(tmp_path), "--name", "run"])
        forms = list(server.forms)
    saved = _read_json(tmp_path / "run.json")
    assert (tmp_path / "run.png").stat().st_size > 0
    assert saved["counts"] == report["counts"]
    assert saved["counts"]["submitted"] == 4 and saved["counts"]["completed"] == 4
    assert saved["counts"]["warmup"] == 1 and saved["counts"]["rejected"] == 0
    assert saved["latency_s"]["count"] == 4  # the warm-up request is not in the statistics
    assert saved["throughput_videos_per_min"] > 0
    # Latency spans submit → download, so it cannot be shorter than the fake server's job.
    assert saved["latency_s"]["min"] >= server.queue_s + server.generate_s
    assert saved["timestamps_from_server"] is True
    assert saved["generation_s"]["client_polled"]["count"] == 4
    # Every request went through the API with the face file and its own seed.
    assert len(forms) == 5
    assert all(f["input_reference"] == load.DEFAULT_FACE.read_bytes() for f in forms)
    assert all(f["num_inference_steps"] == b"3" for f in forms)
    assert sorted(int(f["seed"]) for f in forms) == [0, 1, 2, 3, 4]
    assert saved["machine"]["cpu"]


@pytest.mark.timeout(60)
def test_full_queue_counts_as_rejected_with_retry_after(tmp_path: Path) -> None:
    with FakeVideoServer(generate_s=0.5, capacity=1) as server:
        report = load.run_load(_config(server.url, concurrency=3, requests=6, warmup=0))
    c = report["counts"]
    assert c["rejected"] >= 1
    assert c["rejected"] + c["completed"] == 6 and c["failed"] == 0
    assert report["errors"]["http_429:queue_full"] == c["rejected"]
    assert report["retry_after_s"]["max"] == 2.0
    load.write_result(tmp_path / "r.json", report)
    assert _read_json(tmp_path / "r.json")["counts"] == c


@pytest.mark.timeout(60)
def test_failed_jobs_are_counted_with_their_error_code() -> None:
    with FakeVideoServer(fail_every=2) as server:
        report = load.run_load(_config(server.url, concurrency=1, requests=4, warmup=0))
    assert report["counts"]["failed"] == 2 and report["counts"]["completed"] == 2
    assert report["errors"] == {"job_failed:generation_error": 2}


@pytest.mark.timeout(60)
def test_poisson_arrivals_bounded_by_count() -> None:
    with FakeVideoServer() as server:
        report = load.run_load(_config(server.url, concurrency=None, rate=50.0, requests=5, warmup=1))
    assert report["mode"] == "open_loop_poisson"
    assert report["counts"]["submitted"] == 5 and report["counts"]["completed"] == 5


@pytest.mark.timeout(60)
def test_hard_deadline_ends_a_run_whose_jobs_never_finish() -> None:
    with FakeVideoServer(generate_s=3600) as server:
        report = load.run_load(_config(server.url, concurrency=2, requests=4, warmup=0, deadline=1.0))
    c = report["counts"]
    assert c["completed"] == 0
    assert c["failed"] + c["unfinished"] == c["submitted"] >= 2
    assert set(report["errors"]) <= {"timeout", "run_deadline"}


def test_unreachable_server_is_an_error_not_a_crash() -> None:
    with FakeVideoServer() as server:
        url = server.url
    report = load.run_load(_config(url, concurrency=1, requests=2, warmup=0, timeout=2.0))
    assert report["counts"]["failed"] == 2
    assert all(k.startswith("client:") for k in report["errors"])


def test_load_config_refuses_unbounded_runs() -> None:
    with pytest.raises(ValueError, match="bound the run"):
        load.LoadConfig(requests=None, duration=None).validate()
    with pytest.raises(ValueError, match="exactly one"):
        load.LoadConfig(concurrency=2, rate=1.0).validate()


@pytest.mark.timeout(120)
def test_sweep_walks_powers_of_two_and_names_the_knee(tmp_path: Path) -> None:
    # Two jobs progress at a time: throughput stops growing somewhere past concurrency 2.
    with FakeVideoServer(queue_s=0.0, generate_s=0.2, workers=2) as server:
        report = load.main(["sweep", "--url", server.url, "--max-concurrency", "8",
                            "--requests-per-worker", "2", "--warmup", "1", "--poll-interval", "0.02",
                            "--out-dir", str(tmp_path), "--name", "sweep"])
    saved = _read_json(tmp_path / "sweep.json")
    assert (tmp_path / "sweep.png").stat().st_size > 0
    levels = [lv["concurrency"] for lv in saved["levels"]]
    assert levels == [1, 2, 4, 8][: len(levels)] and len(levels) >= 2
    assert saved["knee_concurrency"] in levels
    best = max(saved["levels"], key=lambda lv: lv["throughput_videos_per_min"])
    assert saved["knee_concurrency"] == best["concurrency"]
    for lv in saved["levels"]:
        assert lv["counts"]["completed"] == 2 * lv["concurrency"]
    assert report["knee_concurrency"] == saved["knee_concurrency"]


# -- model micro-benchmarks -------------------------------------------------------------------


def test_identity_benchmark_writes_all_variants(tmp_path: Path) -> None:
    report = model.main(["identity", "--presets", "tiny", "--reps", "2", "--warmup", "0",
                         "--out-dir", str(tmp_path), "--name", "ident"])
    saved = _read_json(tmp_path / "ident.json")
    assert (tmp_path / "ident.png").stat().st_size > 0
    (res,) = saved["results"]
    assert set(res["samples_s"]) == set(model.VARIANTS)
    assert all(len(v) == 2 and min(v) > 0 for v in res["samples_s"].values())
    assert res["tokens"] == {"video": 320, "identity": 1024, "text": 512}
    assert res["flops"]["forward_uncached"] == res["flops"]["forward"] + res["flops"]["identity_build"]
    assert saved["machine"]["torch"] == torch.__version__ and saved["settings"]["dtype"] == "float32"
    assert report["results"][0]["median_s"] == res["median_s"]


def test_breakdown_benchmark_times_every_stage(tmp_path: Path) -> None:
    model.main(["breakdown", "--reps", "1", "--warmup", "0", "--steps", "1", "--num-frames", "5",
                "--out-dir", str(tmp_path), "--name", "brk"])
    saved = _read_json(tmp_path / "brk.json")
    assert (tmp_path / "brk.png").stat().st_size > 0
    assert list(saved["median_s"]) == list(model.STAGES)
    assert all(v >= 0 for v in saved["median_s"].values())
    assert saved["median_s"]["identity_cache_build"] > 0  # the wrapped build really ran once
    assert saved["settings"]["num_frames"] == 5 and saved["settings"]["num_steps"] == 1
    assert abs(sum(saved["share"].values()) - 1) < 1e-9


# -- FLOP counter and the GPU suite ----------------------------------------------------------


def test_flops_match_a_hand_count() -> None:
    # Spelled out term by term: C=8, F=16, 2 layers, S=4, S_id=2, L=3, P=4, r=2, text_dim=4, freq_dim=4.
    cfg = DiTConfig(dim=8, ffn_dim=16, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=4,
                    freq_dim=4, lora_rank=2)
    f = dit_forward_flops(cfg, Tokens(video=4, identity=2, text=3))
    patch = 2 * 4 * 64 * 8  # S · (C_in·P) · C
    text = 2 * 3 * (4 * 8 + 64)
    time_emb = 2 * (4 * 8 + 64 + 8 * 48)
    per_layer = 8 * 4 * 64 + 4 * 4 * 64 + 4 * 3 * 64 + 4 * 4 * 8 * 16  # qkvo, cross q/o, cross k/v, FFN
    head = 2 * 4 * 8 * 64
    assert f.video_linear == patch + text + time_emb + 2 * per_layer + head
    assert f.video_attention == 2 * (4 * 4 * 6 * 8 + 4 * 4 * 3 * 8)
    id_layer = 6 * 2 * 64 + 12 * 2 * 8 * 2
    id_not_last = 4 * 2 * 2 * 8 + 2 * 2 * 64 + 4 * 2 * 8 * 16
    assert f.identity_build == 2 * 2 * 64 * 8 + time_emb + 2 * id_layer + id_not_last


@pytest.mark.parametrize("with_identity", [True, False])
def test_flops_match_torch_flop_counter_on_a_real_forward(with_identity: bool) -> None:
    cfg = dit_preset("tiny")
    torch.manual_seed(0)
    dit = WanDiT(cfg).eval()
    latents, ident = torch.randn(1, 16, 3, 6, 10), torch.randn(1, 16, 1, 6, 4)
    context, t = torch.randn(1, 7, cfg.text_dim), torch.tensor([500.0])
    tokens = token_counts(cfg, latents.shape, ident.shape if with_identity else None, 7)
    expected = dit_forward_flops(cfg, tokens)
    # The math SDPA backend runs attention as matmuls, which the counter sees.
    configure_attention("sdpa_math")
    try:
        with torch.no_grad():
            with FlopCounterMode(display=False) as build:
                cache = dit.identity_cache(ident, latents.shape) if with_identity else None
            with FlopCounterMode(display=False) as forward:
                dit(latents, t, context, cache)
    finally:
        configure_attention(None)
    assert forward.get_total_flops() == expected.forward
    assert build.get_total_flops() == expected.identity_build


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_gpu_suite_refuses_to_run_without_a_gpu(tmp_path: Path) -> None:
    env = {**os.environ, "RESULTS_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no CUDA GPU" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_load_generator_against_the_real_server(ray_serve: str, tmp_path: Path) -> None:
    """Two requests through the real Serve app (tiny preset, 1 DiT rank) under its own prefix."""
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app({"sp_degree": 1, "state_dir": str(tmp_path / "state"), "worker_num_cpus": 0.2}),
              name="bench", route_prefix="/bench")
    try:
        report = load.main(["run", "--url", ray_serve + "/bench", "--concurrency", "2", "--requests", "2",
                            "--warmup", "0", "--size", "32x32", "--num-frames", "5", "--steps", "2",
                            "--poll-interval", "0.2", "--timeout", "200", "--deadline", "250",
                            "--out-dir", str(tmp_path), "--name", "real"])
    finally:
        serve.delete("bench")
    saved = _read_json(tmp_path / "real.json")
    assert saved["counts"] == report["counts"]
    assert saved["counts"]["completed"] == 2, saved["errors"]
    assert all(r["content_bytes"] > 0 for r in saved["requests"])


@pytest.mark.slow
def test_serving_overhead_against_the_real_server(ray_serve: str, tmp_path: Path) -> None:
    """One direct/served pair through the real Serve app (1 DiT rank) under its own prefix."""
    from ray import serve

    from benchmarks import serving
    from serve_app.app import build_app

    serve.run(
        build_app({"sp_degree": 1, "state_dir": str(tmp_path / "state"), "worker_num_cpus": 0.2}),
        name="overhead",
        route_prefix="/overhead",
    )
    try:
        report = serving.main(
            [
                "--url",
                ray_serve + "/overhead",
                "--pairs",
                "1",
                "--size",
                "32x32",
                "--num-frames",
                "5",
                "--steps",
                "1",
                "--out-dir",
                str(tmp_path),
                "--name",
                "o",
            ]
        )
    finally:
        serve.delete("overhead")
    saved = _read_json(tmp_path / "o.json")
    assert saved["result"] == report["result"]
    assert saved["result"]["direct_s"]["count"] == saved["result"]["served_s"]["count"] == 1
    assert saved["result"]["overhead_ratio_paired_median"] > 0
    assert (tmp_path / "o.png").stat().st_size > 0
    assert serving.variant({"prompt": "p"}, b"img", 3) == ({"prompt": "p (run 3)"}, b"imgrun 3")
