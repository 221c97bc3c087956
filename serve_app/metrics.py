"""Job metrics, exported through Ray's metrics agent (Prometheus format on every node).

Ray prefixes the names with `ray_`; counters get a `_total` suffix. The Ingress records what
it answers (accepted, rejected, cancelled by DELETE), the JobRunner the jobs it runs; Prometheus
sums over replicas:

- `standin_jobs_accepted` / `standin_jobs_rejected{reason}`: POST /v1/videos answered 202 / 429.
- `standin_jobs_finished{status, code}`: completed, failed (with its error code), cancelled.
- `standin_job_retries`: attempts started again after a replica or rank died.
- `standin_job_queue_wait_seconds`: accepted → a DiT replica actually starts the job (per attempt).
- `standin_job_run_seconds`: the DiT starts → the MP4 is stored (successful attempts).
- `standin_denoise_step_seconds`: time between two denoising steps as the JobRunner sees them
  (the first from the DiT's start).
"""

from __future__ import annotations

from ray.util.metrics import Counter, Histogram

_SECONDS = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 3600]
_STEP_SECONDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60]


class JobMetrics:
    """The Ingress's counters and histograms, all tagged with the served model."""

    def __init__(self, model: str) -> None:
        self.tags = {"model": model}
        keys = ("model",)
        self.accepted = Counter("standin_jobs_accepted", "jobs accepted (202)", tag_keys=keys)
        self.rejected = Counter("standin_jobs_rejected", "jobs refused (429)", tag_keys=(*keys, "reason"))
        self.finished = Counter(
            "standin_jobs_finished", "jobs that ended", tag_keys=(*keys, "status", "code")
        )
        self.retries = Counter("standin_job_retries", "attempts started again", tag_keys=keys)
        self.queue_wait = Histogram(
            "standin_job_queue_wait_seconds", "accepted to DiT start", boundaries=_SECONDS, tag_keys=keys
        )
        self.run_time = Histogram(
            "standin_job_run_seconds", "DiT start to stored MP4", boundaries=_SECONDS, tag_keys=keys
        )
        self.step_time = Histogram(
            "standin_denoise_step_seconds", "one denoising step", boundaries=_STEP_SECONDS, tag_keys=keys
        )

    def job_accepted(self) -> None:
        self.accepted.inc(1, tags=self.tags)

    def job_rejected(self, reason: str) -> None:
        self.rejected.inc(1, tags={**self.tags, "reason": reason})

    def job_finished(self, status: str, code: str = "") -> None:
        self.finished.inc(1, tags={**self.tags, "status": status, "code": code})

    def job_retried(self) -> None:
        self.retries.inc(1, tags=self.tags)

    def job_started(self, queued_s: float) -> None:
        self.queue_wait.observe(max(queued_s, 0.0), tags=self.tags)

    def job_ran(self, seconds: float) -> None:
        self.run_time.observe(seconds, tags=self.tags)

    def step(self, seconds: float) -> None:
        self.step_time.observe(seconds, tags=self.tags)
