"""Load generator for a running Stand-In server, through the OpenAI-style video API only.

Every request is what a client does: `POST /v1/videos` (multipart: prompt, input_reference,
size, num_frames, num_inference_steps, seed) → poll `GET /v1/videos/{id}` until `completed` or
`failed` → download `GET /v1/videos/{id}/content`. Nothing else about the server is assumed,
so it works against any deployment, local or remote.

    # fixed concurrency, count-bounded
    python -m benchmarks.load run --url http://127.0.0.1:8000 --concurrency 4 --requests 20
    # open-loop Poisson arrivals at 0.5 requests/s for 5 minutes
    python -m benchmarks.load run --rate 0.5 --duration 300
    # concurrency 1, 2, 4, … until throughput stops improving (the knee)
    python -m benchmarks.load sweep --max-concurrency 32

Warm-up requests (`--warmup`) run to completion before measuring starts and are excluded from
every statistic. A run always ends by itself: `--deadline` is a hard limit on the whole run
(requests still in flight then are reported as `unfinished`), `--timeout` one on each request.

Reported: submitted / accepted / rejected (429, 503) / failed / completed / unfinished counts,
throughput (completed videos per minute over the measured window: from the first measured
submission to the last measured request's end), end-to-end latency (submit → MP4 downloaded)
p50/p90/p99/max, queue wait vs generation time (from the job's `created_at` / `started_at` /
`completed_at` when the server returns them — OpenAI gives whole seconds — and, always, as the
client saw them through polling), generation time per denoising step, and an error breakdown.
Results: benchmarks/results/<name>.json and <name>.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.common import (
    pyplot,
    result_header,
    result_path,
    save_figure,
    summarize,
    timestamp,
    write_result,
)

log = logging.getLogger("benchmarks.load")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FACE = REPO / "tests" / "data" / "faces" / "astronaut.jpg"
TERMINAL = ("completed", "failed", "cancelled")
REJECT_STATUSES = (429, 503)


@dataclass(frozen=True)
class LoadConfig:
    """One load run's settings (all recorded in the result)."""

    url: str = "http://127.0.0.1:8000"
    image: str | None = str(DEFAULT_FACE)
    prompt: str = "a person walking on the beach at sunset"
    size: str = "128x128"
    num_frames: int = 17
    num_inference_steps: int = 4
    seed: int = 0  # request i uses seed + i
    model: str | None = None
    api_key: str | None = None
    # Exactly one of concurrency (closed loop) and rate (open loop, requests per second).
    concurrency: int | None = 1
    rate: float | None = None
    requests: int | None = 10  # measured requests; None: bounded by duration only
    duration: float | None = None  # seconds of submissions in the measured phase
    warmup: int = 1
    poll_interval: float = 0.5
    timeout: float = 600.0  # one request, submit → downloaded
    deadline: float = 1800.0  # the whole run, warm-up included
    download: bool = True
    max_in_flight: int = 256  # open loop: arrivals beyond this are dropped by the client
    arrival_seed: int = 0

    def validate(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of --concurrency and --rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be ≥ 1, got {self.concurrency}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"--rate must be > 0 requests/s, got {self.rate}")
        if self.requests is None and self.duration is None:
            raise ValueError("bound the run with --requests and/or --duration")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"--requests must be ≥ 1, got {self.requests}")
        if self.warmup < 0 or self.poll_interval <= 0 or self.timeout <= 0 or self.deadline <= 0:
            raise ValueError("--warmup must be ≥ 0; --poll-interval, --timeout, --deadline > 0")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--url must be http(s)://…, got {self.url!r}")


@dataclass
class RequestRecord:
    """What happened to one request. Times are seconds since the run started (client clock)."""

    index: int
    warmup: bool
    submitted: float
    outcome: str = "in_flight"  # completed | failed | rejected | error | timeout | unfinished | dropped
    http_status: int | None = None
    error: str | None = None  # key for the error breakdown
    message: str | None = None
    video_id: str | None = None
    accepted: float | None = None  # POST answered 2xx
    started_seen: float | None = None  # first poll that saw in_progress (or later)
    finished_seen: float | None = None  # first poll that saw a terminal status
    ended: float | None = None  # content downloaded, or the request gave up
    retry_after: float | None = None
    content_bytes: int | None = None
    polls: int = 0
    server: dict[str, Any] = field(default_factory=dict)  # created_at / started_at / completed_at

    @property
    def latency(self) -> float | None:
        return self.ended - self.submitted if self.outcome == "completed" and self.ended else None


class HttpError(Exception):
    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        super().__init__(f"HTTP {status}")
        self.status, self.body, self.headers = status, body, headers


class VideoClient:
    """The three calls of the video API, with stdlib urllib (one connection per call)."""

    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        self.base = base_url.rstrip("/")
        self.api_key = api_key

    def _call(
        self, method: str, path: str, timeout: float, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        headers = dict(headers or {})
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=max(timeout, 0.1)) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            raise HttpError(e.code, e.read() or b"", dict(e.headers or {})) from None

    def create(self, fields: dict[str, str], image: tuple[str, bytes] | None, timeout: float) -> dict:
        body, content_type = encode_multipart(fields, {"input_reference": image} if image else {})
        _, _, data = self._call("POST", "/v1/videos", timeout, body, {"Content-Type": content_type})
        return json.loads(data)

    def retrieve(self, video_id: str, timeout: float) -> dict:
        return json.loads(self._call("GET", f"/v1/videos/{video_id}", timeout)[2])

    def content(self, video_id: str, timeout: float) -> bytes:
        return self._call("GET", f"/v1/videos/{video_id}/content", timeout)[2]


def encode_multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """multipart/form-data body and its Content-Type."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    for name, (filename, data) in files.items():
        kind = "image/png" if filename.lower().endswith(".png") else "image/jpeg"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {kind}\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _error_key(e: HttpError) -> tuple[str, str]:
    """('http_<status>[:<code>]', message) from an OpenAI-shaped error body when there is one."""
    try:
        err = json.loads(e.body).get("error") or {}
    except (ValueError, AttributeError):
        err = {}
    code = err.get("code") if isinstance(err, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    key = f"http_{e.status}" + (f":{code}" if code else "")
    return key, (message or e.body[:200].decode("utf-8", "replace"))


def _retry_after(headers: dict[str, str]) -> float | None:
    for k, v in headers.items():
        if k.lower() == "retry-after":
            try:
                return float(v)
            except ValueError:
                return None
    return None


class LoadRun:
    """Drives one run (warm-up, then the measured phase) and keeps every request's record."""

    def __init__(self, config: LoadConfig) -> None:
        config.validate()
        self.config = config
        self.client = VideoClient(config.url, config.api_key)
        self.image = None
        if config.image:
            path = Path(config.image)
            self.image = (path.name, path.read_bytes())
        self.t0 = time.monotonic()
        self.hard_deadline = self.t0 + config.deadline
        self.records: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._next_index = 0
        self.measure_start: float | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _remaining(self, request_deadline: float) -> float:
        return min(request_deadline, self.hard_deadline) - time.monotonic()

    def _new_record(self, warmup: bool) -> RequestRecord:
        with self._lock:
            rec = RequestRecord(self._next_index, warmup, self.now())
            self._next_index += 1
            self.records.append(rec)
        return rec

    def one_request(self, warmup: bool) -> RequestRecord:
        """Create → poll → download one video; never raises, never outlives the deadlines."""
        rec = self._new_record(warmup)
        try:
            self._drive(rec)
        except HttpError as e:
            rec.http_status = e.status
            rec.error, rec.message = _error_key(e)
            rec.outcome = "failed"
        except TimeoutError as e:
            rec.outcome, rec.error, rec.message = "timeout", "timeout", str(e)
        except (OSError, ValueError) as e:  # connection refused/reset, socket timeouts, bad JSON
            timed_out = "timed out" in str(e)
            rec.outcome = "timeout" if timed_out else "error"
            rec.error = "timeout" if timed_out else f"client:{type(e).__name__}"
            rec.message = str(e)[:300]
        if rec.ended is None:
            rec.ended = self.now()
        return rec

    def _drive(self, rec: RequestRecord) -> None:
        c = self.config
        request_deadline = time.monotonic() + c.timeout
        fields = {
            "prompt": c.prompt,
            "size": c.size,
            "num_frames": str(c.num_frames),
            "num_inference_steps": str(c.num_inference_steps),
            "seed": str(c.seed + rec.index),
        }
        if c.model:
            fields["model"] = c.model
        try:
            job = self.client.create(fields, self.image, self._remaining(request_deadline))
        except HttpError as e:
            rec.http_status = e.status
            rec.error, rec.message = _error_key(e)
            if e.status in REJECT_STATUSES:
                rec.outcome = "rejected"
                rec.retry_after = _retry_after(e.headers)
            else:
                rec.outcome = "failed"
            return
        rec.accepted, rec.http_status = self.now(), 200
        rec.video_id = str(job["id"])
        self._observe(rec, job)
        while job.get("status") not in TERMINAL:
            if self._remaining(request_deadline) <= 0:
                raise TimeoutError(f"video {rec.video_id} still {job.get('status')!r} at the deadline")
            time.sleep(min(c.poll_interval, max(self._remaining(request_deadline), 0)))
            job = self.client.retrieve(rec.video_id, self._remaining(request_deadline))
            rec.polls += 1
            self._observe(rec, job)
        if job["status"] != "completed":
            err = job.get("error") or {}
            rec.outcome = "failed"
            rec.error = f"job_{job['status']}:" + str(err.get("code") if isinstance(err, dict) else err)
            rec.message = (err.get("message") if isinstance(err, dict) else None) or job["status"]
            return
        if c.download:
            data = self.client.content(rec.video_id, self._remaining(request_deadline))
            rec.content_bytes = len(data)
            if data[4:8] != b"ftyp":
                rec.outcome, rec.error = "failed", "bad_content"
                rec.message = f"content is not an MP4 ({len(data)} bytes)"
                return
        rec.ended = self.now()
        rec.outcome = "completed"

    def _observe(self, rec: RequestRecord, job: dict) -> None:
        status = job.get("status")
        t = self.now()
        if status in ("in_progress", *TERMINAL) and rec.started_seen is None:
            rec.started_seen = t
        if status in TERMINAL and rec.finished_seen is None:
            rec.finished_seen = t
        for k in ("created_at", "started_at", "completed_at"):
            v = job.get(k)
            if isinstance(v, int | float) and not isinstance(v, bool):
                rec.server[k] = v

    # -- the two load shapes -------------------------------------------------------------------

    def _closed_loop(self, concurrency: int, count: int | None, until: float | None, warmup: bool) -> None:
        """`concurrency` workers, each starting its next request as soon as one ends."""
        claimed = iter(range(count)) if count is not None else None
        lock = threading.Lock()

        def worker() -> None:
            while time.monotonic() < self.hard_deadline:
                if until is not None and time.monotonic() >= until:
                    return
                if claimed is not None:
                    with lock:
                        if next(claimed, None) is None:
                            return
                self.one_request(warmup)

        self._join([self._spawn(worker) for _ in range(concurrency)])

    def _open_loop(self, rate: float, count: int | None, until: float | None) -> None:
        """Poisson arrivals at `rate`/s, independent of how fast the server answers."""
        rng = random.Random(self.config.arrival_seed)
        threads: list[threading.Thread] = []
        next_at = time.monotonic()
        sent = 0
        while (count is None or sent < count) and time.monotonic() < self.hard_deadline:
            next_at += rng.expovariate(rate)
            if until is not None and next_at >= until:
                break
            time.sleep(max(0.0, min(next_at, self.hard_deadline) - time.monotonic()))
            if time.monotonic() >= self.hard_deadline:
                break
            sent += 1
            threads = [t for t in threads if t.is_alive()]
            if len(threads) >= self.config.max_in_flight:
                rec = self._new_record(False)
                rec.outcome, rec.error, rec.ended = "dropped", "client_max_in_flight", rec.submitted
                continue
            threads.append(self._spawn(lambda: self.one_request(False)))
        self._join(threads)

    @staticmethod
    def _spawn(fn: Callable[[], object]) -> threading.Thread:
        # Daemon threads: at the hard deadline the run returns and abandons what is still waiting.
        t = threading.Thread(target=fn, daemon=True)
        t.start()
        return t

    def _join(self, threads: list[threading.Thread]) -> None:
        for t in threads:
            t.join(max(0.0, self.hard_deadline - time.monotonic()))

    def run(self) -> dict[str, Any]:
        c = self.config
        started = timestamp()
        if c.warmup:
            log.info("warm-up: %d request(s)", c.warmup)
            self._closed_loop(min(c.warmup, c.concurrency or 1), c.warmup, None, warmup=True)
        self.measure_start = self.now()
        until = time.monotonic() + c.duration if c.duration is not None else None
        log.info("measuring: %s", f"concurrency {c.concurrency}" if c.rate is None else f"{c.rate}/s Poisson")
        if c.rate is None:
            self._closed_loop(c.concurrency or 1, c.requests, until, warmup=False)
        else:
            self._open_loop(c.rate, c.requests, until)
        with self._lock:
            for rec in self.records:
                if rec.outcome == "in_flight":  # still out when the hard deadline hit
                    rec.outcome, rec.error = "unfinished", "run_deadline"
        return self.report(started)

    # -- the numbers ---------------------------------------------------------------------------

    def report(self, started: str) -> dict[str, Any]:
        c = self.config
        with self._lock:
            records = list(self.records)
        measured = [r for r in records if not r.warmup]
        counts = Counter(r.outcome for r in measured)
        done = [r for r in measured if r.outcome == "completed"]
        ends = [r.ended for r in measured if r.ended is not None and r.outcome != "dropped"]
        starts = [r.submitted for r in measured]
        window = (max(ends) - min(starts)) if ends and starts else 0.0
        server_queue = [r.server["started_at"] - r.server["created_at"] for r in done
                        if {"created_at", "started_at"} <= r.server.keys()]
        server_gen = [r.server["completed_at"] - r.server["started_at"] for r in done
                      if {"started_at", "completed_at"} <= r.server.keys()]
        server_total = [r.server["completed_at"] - r.server["created_at"] for r in done
                        if {"created_at", "completed_at"} <= r.server.keys()]
        client_queue = [r.started_seen - r.accepted for r in done if r.started_seen is not None]
        client_gen = [r.finished_seen - r.started_seen for r in done
                      if r.finished_seen is not None and r.started_seen is not None]
        gen_for_steps = server_gen if len(server_gen) == len(done) and done else client_gen
        return {
            **result_header("load", started),
            "settings": {k: v for k, v in asdict(c).items() if k != "api_key"},
            "mode": "closed_loop" if c.rate is None else "open_loop_poisson",
            "counts": {
                "submitted": len(measured) - counts["dropped"],
                "accepted": sum(1 for r in measured if r.accepted is not None),
                "rejected": counts["rejected"],
                "failed": counts["failed"] + counts["error"] + counts["timeout"],
                "completed": counts["completed"],
                "unfinished": counts["unfinished"],
                "dropped_by_client": counts["dropped"],
                "warmup": len(records) - len(measured),
            },
            "window_s": window,
            "throughput_videos_per_min": (60.0 * len(done) / window) if window > 0 else 0.0,
            "latency_s": summarize([r.latency for r in done if r.latency is not None]),
            "accept_latency_s": summarize([r.accepted - r.submitted for r in measured if r.accepted]),
            "queue_wait_s": {"server": summarize(server_queue), "client_polled": summarize(client_queue)},
            "generation_s": {"server": summarize(server_gen), "client_polled": summarize(client_gen)},
            "server_total_s": summarize(server_total),
            "per_step_s": summarize([g / c.num_inference_steps for g in gen_for_steps]),
            "timestamps_from_server": bool(server_gen),
            "retry_after_s": summarize([r.retry_after for r in measured if r.retry_after is not None]),
            "errors": dict(Counter(r.error for r in measured if r.error)),
            "requests": [asdict(r) for r in records],
        }


def run_load(config: LoadConfig) -> dict[str, Any]:
    """One run; returns the report (not yet written)."""
    return LoadRun(config).run()


def sweep(
    config: LoadConfig, max_concurrency: int, requests_per_worker: int, min_gain: float, patience: int
) -> dict[str, Any]:
    """Concurrency 1, 2, 4, … while throughput improves by more than `min_gain`; the knee is the
    level with the best throughput. The deadline covers the whole sweep."""
    started = timestamp()
    hard_deadline = time.monotonic() + config.deadline
    levels: list[dict[str, Any]] = []
    best, stale, level = 0.0, 0, 1
    warmup = config.warmup
    while level <= max_concurrency:
        remaining = hard_deadline - time.monotonic()
        if remaining <= 1:
            log.warning("sweep deadline reached before concurrency %d", level)
            break
        cfg = replace(config, concurrency=level, rate=None, requests=level * requests_per_worker,
                      duration=None, warmup=warmup, deadline=remaining)
        warmup = 0  # the server is warm after the first level
        rep = run_load(cfg)
        levels.append(rep)
        tput = rep["throughput_videos_per_min"]
        log.info("concurrency %d: %.2f videos/min, p50 %s s", level, tput, rep["latency_s"]["p50"])
        if tput > best * (1 + min_gain):
            best, stale = tput, 0
        else:
            stale += 1
            if stale >= patience:
                break
        level *= 2
    knee = max(levels, key=lambda r: r["throughput_videos_per_min"]) if levels else None
    return {
        **result_header("load_sweep", started),
        "settings": {
            **{k: v for k, v in asdict(config).items() if k not in ("api_key", "concurrency", "rate")},
            "max_concurrency": max_concurrency,
            "requests_per_worker": requests_per_worker,
            "min_gain": min_gain,
            "patience": patience,
        },
        "knee_concurrency": knee["settings"]["concurrency"] if knee else None,
        "knee_throughput_videos_per_min": knee["throughput_videos_per_min"] if knee else None,
        "levels": [
            {
                "concurrency": r["settings"]["concurrency"],
                "throughput_videos_per_min": r["throughput_videos_per_min"],
                "latency_s": r["latency_s"],
                "queue_wait_s": r["queue_wait_s"],
                "generation_s": r["generation_s"],
                "counts": r["counts"],
                "errors": r["errors"],
            }
            for r in levels
        ],
        "runs": levels,
    }


# -- plots and the printed report -----------------------------------------------------------------

def plot_run(report: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {"completed": "#2b7bba", "failed": "#e6550d", "rejected": "#999999", "timeout": "#c51b8a"}
    for rec in report["requests"]:
        if rec["warmup"] or rec["ended"] is None:
            continue
        ax1.scatter(rec["submitted"], rec["ended"] - rec["submitted"], s=12,
                    color=colors.get(rec["outcome"], "#000000"))
    for outcome, color in colors.items():
        ax1.scatter([], [], color=color, s=12, label=outcome)
    ax1.legend(fontsize=7)
    ax1.set_xlabel("submitted at (s since start)")
    ax1.set_ylabel("end-to-end latency (s)")
    stats = [("end-to-end", report["latency_s"]),
             ("queue wait", report["queue_wait_s"]["client_polled"]),
             ("generation", report["generation_s"]["client_polled"])]
    width = 0.2
    for j, q in enumerate(("p50", "p90", "p99", "max")):
        ax2.bar([i + j * width for i in range(len(stats))], [s[q] or 0 for _, s in stats], width, label=q)
    ax2.set_xticks([i + 1.5 * width for i in range(len(stats))], [n for n, _ in stats])
    ax2.set_ylabel("seconds (client-observed)")
    ax2.legend(fontsize=7)
    s = report["settings"]
    shape = f"concurrency {s['concurrency']}" if s["rate"] is None else f"Poisson {s['rate']}/s"
    fig.suptitle(f"{shape}: {report['throughput_videos_per_min']:.2f} videos/min, "
                 f"{report['counts']['completed']} completed, {report['counts']['rejected']} rejected, "
                 f"{report['counts']['failed']} failed", fontsize=10)
    return save_figure(fig, path)


def plot_sweep(report: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    levels = report["levels"]
    xs = [lv["concurrency"] for lv in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(xs, [lv["throughput_videos_per_min"] for lv in levels], marker="o")
    if report["knee_concurrency"] is not None:
        ax1.axvline(report["knee_concurrency"], color="#999999", linestyle="--", label="knee")
        ax1.legend(fontsize=7)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("concurrency")
    ax1.set_ylabel("videos / min")
    ax1.set_ylim(bottom=0)
    for q in ("p50", "p90", "p99"):
        ax2.plot(xs, [lv["latency_s"][q] for lv in levels], marker="o", label=q)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("concurrency")
    ax2.set_ylabel("end-to-end latency (s)")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=7)
    fig.suptitle(f"Concurrency sweep: knee at {report['knee_concurrency']}", fontsize=10)
    return save_figure(fig, path)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_run(report: dict[str, Any]) -> None:
    c, lat = report["counts"], report["latency_s"]
    print(f"submitted {c['submitted']}  accepted {c['accepted']}  rejected {c['rejected']}  "
          f"failed {c['failed']}  completed {c['completed']}  unfinished {c['unfinished']}")
    print(f"throughput {report['throughput_videos_per_min']:.2f} videos/min over {report['window_s']:.1f} s")
    print(f"latency s: p50 {_fmt(lat['p50'])}  p90 {_fmt(lat['p90'])}  p99 {_fmt(lat['p99'])}  "
          f"max {_fmt(lat['max'])}")
    for name in ("queue_wait_s", "generation_s"):
        for src, s in report[name].items():
            print(f"{name[:-2]} ({src}): p50 {_fmt(s['p50'])}  p90 {_fmt(s['p90'])}  max {_fmt(s['max'])}")
    if report["errors"]:
        print("errors:", ", ".join(f"{k} ×{v}" for k, v in report["errors"].items()))


# -- CLI --------------------------------------------------------------------------------------

def _config_from(args: argparse.Namespace, concurrency: int | None, rate: float | None) -> LoadConfig:
    return LoadConfig(
        url=args.url,
        image=None if args.no_image else str(args.image),
        prompt=args.prompt,
        size=args.size,
        num_frames=args.num_frames,
        num_inference_steps=args.steps,
        seed=args.seed,
        model=args.model,
        api_key=args.api_key,
        concurrency=concurrency,
        rate=rate,
        requests=args.requests,
        duration=getattr(args, "duration", None),
        warmup=args.warmup,
        poll_interval=args.poll_interval,
        timeout=args.timeout,
        deadline=args.deadline,
        download=not args.no_download,
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default="http://127.0.0.1:8000")
    common.add_argument("--image", type=Path, default=DEFAULT_FACE, help="the face (input_reference)")
    common.add_argument("--no-image", action="store_true", help="plain text-to-video requests")
    common.add_argument("--prompt", default=LoadConfig.prompt)
    common.add_argument("--size", default=LoadConfig.size)
    common.add_argument("--num-frames", type=int, default=LoadConfig.num_frames)
    common.add_argument("--steps", type=int, default=LoadConfig.num_inference_steps,
                        help="num_inference_steps")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--model", default=None)
    common.add_argument("--api-key", default=None)
    common.add_argument("--warmup", type=int, default=1, help="requests run before measuring")
    common.add_argument("--poll-interval", type=float, default=0.5)
    common.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    common.add_argument("--deadline", type=float, default=1800.0, help="hard limit on the whole run (s)")
    common.add_argument("--no-download", action="store_true")
    common.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results/")
    common.add_argument("-v", "--verbose", action="store_true")

    run = sub.add_parser("run", parents=[common], help="one run at a fixed concurrency or arrival rate")
    shape = run.add_mutually_exclusive_group()
    shape.add_argument("--concurrency", type=int, default=None)
    shape.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second")
    run.add_argument("--requests", type=int, default=None, help="measured requests (default 10)")
    run.add_argument("--duration", type=float, default=None, help="seconds of submissions")
    run.add_argument("--name", default=None, help="result name (default load_c<N> / load_r<rate>)")

    sw = sub.add_parser("sweep", parents=[common], help="concurrency 1, 2, 4, … until saturation")
    sw.add_argument("--max-concurrency", type=int, default=64)
    sw.add_argument("--requests-per-worker", type=int, default=3)
    sw.add_argument("--min-gain", type=float, default=0.05, help="relative throughput gain that counts")
    sw.add_argument("--patience", type=int, default=1, help="levels without gain before stopping")
    sw.add_argument("--name", default="load_sweep")
    args = parser.parse_args(argv)
    if args.command == "run" and args.requests is None and args.duration is None:
        args.requests = 10
    if args.command == "sweep":
        args.requests = None
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    command = "python -m benchmarks.load " + " ".join(argv)
    if args.command == "run":
        rate = args.rate
        concurrency = args.concurrency if rate is None else None
        config = _config_from(args, concurrency or (1 if rate is None else None), rate)
        report = {"command": command, **run_load(config)}
        name = args.name or (f"load_r{rate:g}" if rate is not None else f"load_c{config.concurrency}")
        path = write_result(result_path(name, args.out_dir), report)
        plot_run(report, path.with_suffix(".png"))
        print_run(report)
        return report
    config = _config_from(args, 1, None)
    report = {"command": command, **sweep(config, args.max_concurrency, args.requests_per_worker,
                                           args.min_gain, args.patience)}
    path = write_result(result_path(args.name, args.out_dir), report)
    plot_sweep(report, path.with_suffix(".png"))
    for lv in report["levels"]:
        print(f"concurrency {lv['concurrency']:>3}: {lv['throughput_videos_per_min']:8.2f} videos/min  "
              f"p50 {_fmt(lv['latency_s']['p50'])} s  p99 {_fmt(lv['latency_s']['p99'])} s  "
              f"rejected {lv['counts']['rejected']}  failed {lv['counts']['failed']}")
    print(f"knee: concurrency {report['knee_concurrency']}")
    return report


if __name__ == "__main__":
    main()
