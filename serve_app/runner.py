"""JobRunner deployment: claims queued jobs from the job store and drives each through
Preprocessor → DiT replica → Decoder; retries, fails and expires them. It is separate from the
HTTP Ingress, so rolling the Ingress (or losing one) never restarts a generation.

Fencing: a run is one `Lease` (this runner + the attempt number), given by `claim` (or `retry`).
Every write of the run — status, progress, the published conditioning and video keys, the final
status — is conditional on the job still holding that lease. A run whose lease is gone (the job was
deleted, or presumed dead and claimed again elsewhere) stops at its next write or lease renewal
and can neither finish, fail nor delete anything: its files are written under its own attempt's
keys and only a fenced `finish` publishes them. All leases of a runner are renewed in one store
call. The DiT replica also checks the lease between steps and stops work whose job is gone.

Status is truthful: a job stays `queued` (its position is known from the store) while it waits for
the Preprocessor and a DiT replica; the DiT's `started` event moves it to `in_progress` and sets
`started_at`, from which queue wait and step times are measured.

Errors found after the 202 (an image without a face, an input the encoders refuse) are permanent
failures with a clean code, never retried. Infrastructure failures (a replica or rank died) are
retried up to `max_attempts`. Error messages stored for clients never carry tracebacks, paths,
hosts, pids or actor ids; those are logged here with the job id.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
from typing import Any

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import jobs
from serve_app.api import params_from_job
from serve_app.face_swap import swapped_params
from serve_app.jobs import AsyncJobStore, Job, Lease, open_job_store
from serve_app.loras import refs_from_job, style_set_id
from serve_app.metrics import JobMetrics
from serve_app.results import (
    ResultStore,
    conditioning_key,
    control_keys,
    input_mask_key,
    input_video_key,
    job_keys,
    reference_key,
    video_key,
)
from serve_app.settings import ServeSettings
from serve_app.vace import control_params
from standin.errors import InvalidImageError, InvalidRequestError, InvalidVideoError

log = logging.getLogger(__name__)

DENOISE_DONE = 95  # share of the progress bar the denoising steps fill; decoding fills the rest
POLL_S = 0.5  # how often a runner looks for claimable jobs
MAINTENANCE_S = 5.0


class LeaseLostError(Exception):
    """This run no longer holds its job's lease (deleted, or claimed by another run)."""


class UnavailableError(Exception):
    """No healthy DiT replica right now: wait without spending an attempt."""


class JobFailedError(Exception):
    """The job cannot succeed (bad input): fail it now with `code`, never retry."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def public_message(exc: BaseException, limit: int = 300) -> str:
    """The first line of the original exception's own message (Ray wraps remote exceptions in
    a RayTaskError whose text is a whole traceback; its `cause` is the original)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return (text[0] if text else type(cause).__name__)[:limit]


def classify_preprocessing_error(exc: BaseException) -> JobFailedError | None:
    """A permanent failure for errors the input causes; None for ones a retry may not meet."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, InvalidImageError):
        return JobFailedError("invalid_image", public_message(cause))
    if isinstance(cause, InvalidVideoError):
        return JobFailedError("invalid_video", public_message(cause))
    if isinstance(cause, InvalidRequestError | UnicodeError | ValueError):
        return JobFailedError("invalid_request", public_message(cause))
    return None


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=8)
class JobRunner:
    def __init__(
        self,
        settings: ServeSettings,
        preprocessor: DeploymentHandle,
        dit: DeploymentHandle,
        decoder: DeploymentHandle,
    ) -> None:
        self.settings = settings
        self.preprocessor = preprocessor
        self.dit = dit
        self.decoder = decoder
        self.store = AsyncJobStore(open_job_store(settings))
        self.results = ResultStore(settings.results_location)
        self.metrics = JobMetrics(settings.model_name)
        try:
            self.owner = serve.get_replica_context().replica_id.unique_id
        except Exception:  # local testing mode
            self.owner = uuid.uuid4().hex
        self.runs: dict[str, tuple[Lease, asyncio.Task]] = {}
        self._main = asyncio.get_running_loop().create_task(self._loop())

    def stats(self) -> dict[str, Any]:
        return {"owner": self.owner, "running": sorted(self.runs)}

    def check_health(self) -> None:
        if self._main.done():
            raise RuntimeError("the job runner's loop has stopped")

    # -- the loop: claim, renew, expire ----------------------------------------------------------

    async def _loop(self) -> None:
        s = self.settings
        last_renewal = last_maintenance = 0.0
        while True:
            try:
                now = time.monotonic()
                if now - last_renewal >= s.lease_s / 3:
                    last_renewal = now
                    await self._renew()
                free = s.runner_max_jobs - len(self.runs)
                if free > 0:
                    for job in await self.store.claim(self.owner, s.lease_s, free):
                        self._start(job)
                if now - last_maintenance >= MAINTENANCE_S:
                    last_maintenance = now
                    await self._expire()
            except Exception:  # a store error must not end the loop: log it, try again
                log.warning("job runner loop: store call failed", exc_info=True)
            await asyncio.sleep(POLL_S)

    def _start(self, job: Job) -> None:
        lease = job.lease
        if lease is None or job.id in self.runs:
            return
        log.info("%s claimed (attempt %d)", job.id, lease.attempt)
        task = asyncio.get_running_loop().create_task(self._run(job, lease))
        self.runs[job.id] = (lease, task)
        task.add_done_callback(lambda _: self.runs.pop(job.id, None))

    async def _renew(self) -> None:
        """One call renews every lease; runs whose lease is gone are cancelled."""
        leases = {job_id: lease.attempt for job_id, (lease, _) in self.runs.items()}
        if not leases:
            return
        held = await self.store.renew(self.owner, leases, self.settings.lease_s)
        for job_id in set(leases) - held:
            run = self.runs.get(job_id)
            if run is not None and run[0].attempt == leases[job_id]:
                log.info("%s: lease lost (deleted or claimed elsewhere); stopping this run", job_id)
                run[1].cancel()

    async def _expire(self) -> None:
        for job in await self.store.expired(time.time()):
            await asyncio.to_thread(self._delete_files, job)
            await self.store.delete(job.id)

    def _delete_files(self, job: Job) -> None:
        for key in job_keys(job):
            self.results.delete(key)

    # -- one job ---------------------------------------------------------------------------------

    async def _run(self, job: Job, lease: Lease) -> None:
        s = self.settings
        try:
            while True:
                if lease.attempt > s.max_attempts:
                    message = f"gave up after {s.max_attempts} attempts"
                    await self._fail(job, lease, "retries_exhausted", message)
                    return
                if time.time() > job.created_at + s.job_timeout_s:
                    await self._fail(job, lease, "timeout", f"not finished within {s.job_timeout_s:g} s")
                    return
                try:
                    await self._attempt(job, lease)
                    return
                except JobFailedError as exc:
                    await self._fail(job, lease, exc.code, str(exc))
                    return
                except UnavailableError as exc:
                    log.info("%s waits for a healthy DiT replica: %s", job.id, exc)
                    await asyncio.sleep(1.0)
                    continue
                except (LeaseLostError, asyncio.CancelledError):
                    raise
                except Exception:  # a dead replica or rank, a lost actor…: worth another attempt
                    log.warning("%s attempt %d failed", job.id, lease.attempt, exc_info=True)
                if lease.attempt >= s.max_attempts:
                    await self._fail(
                        job, lease, "generation_failed", f"generation failed in all {s.max_attempts} attempts"
                    )
                    return
                new = await self.store.retry(job.id, lease)
                if new is None:
                    raise LeaseLostError
                self.metrics.job_retried()
                await asyncio.sleep(s.retry_backoff_s * 2 ** (lease.attempt - 1))
                lease = new
                self.runs[job.id] = (lease, self.runs[job.id][1])
                fresh = await self.store.get(job.id)
                if fresh is None:
                    raise LeaseLostError
                job = fresh
        except (LeaseLostError, asyncio.CancelledError):
            log.info("%s attempt %d stopped: its lease is gone", job.id, lease.attempt)
        except Exception:
            log.exception("%s: the runner failed", job.id)

    async def _fail(self, job: Job, lease: Lease, code: str, message: str) -> None:
        log.warning("%s failed: %s: %s", job.id, code, message)
        done = await self.store.finish(
            job.id,
            lease,
            jobs.FAILED,
            error_code=code,
            error_message=message,
            expires_at=int(time.time() + self.settings.result_ttl_s),
        )
        if done:
            self.metrics.job_finished(jobs.FAILED, code)
            await asyncio.to_thread(self._delete_inputs, job.id)

    def _delete_inputs(self, job_id: str) -> None:
        """After the fenced finish: the upload and every attempt's conditioning are not needed."""
        self.results.delete(reference_key(job_id))
        self.results.delete(input_video_key(job_id))
        self.results.delete(input_mask_key(job_id))
        for key in control_keys(job_id).values():
            self.results.delete(key)
        for attempt in range(1, self.settings.max_attempts + 1):
            self.results.delete(conditioning_key(job_id, attempt))

    async def _write(self, job: Job, lease: Lease, **fields: Any) -> None:
        if not await self.store.update(job.id, lease, **fields):
            raise LeaseLostError

    async def _attempt(self, job: Job, lease: Lease) -> None:
        params = params_from_job(job.request)
        conditioning = await self._conditioning(job, lease, params)
        fps = float(job.request["fps"])
        if conditioning.get("face_swap") is not None:  # the decoded video decides size, frames, fps
            params = swapped_params(params, conditioning["face_swap"])
            fps = float(conditioning["face_swap"]["fps"])
        if conditioning.get("vace") is not None:  # the decoded control video decides size and frames
            params = control_params(params, conditioning["vace"])
        fence = {"id": job.id, "owner": lease.owner, "attempt": lease.attempt}
        styles = refs_from_job(job.request)  # style LoRAs: Serve routes to a replica holding the set
        options: dict[str, Any] = {"stream": True}
        if styles:
            options["multiplexed_model_id"] = style_set_id(styles)
        stream = self.dit.options(**options).denoise.remote(params, conditioning, fence, styles)
        latents = frames = None
        started = last_step = 0.0
        shown = -1
        try:
            async for event in stream:
                kind = event["event"]
                if kind == "started":  # the DiT replica has begun this job: no longer queued
                    started, last_step = time.time(), time.monotonic()
                    await self._write(
                        job, lease, status=jobs.IN_PROGRESS, started_at=int(started), progress=0
                    )
                    self.metrics.job_started(started - job.created_at)
                elif kind == "progress":
                    now = time.monotonic()
                    self.metrics.step(now - last_step)
                    last_step = now
                    pct = DENOISE_DONE * event["step"] // event["total"]
                    if pct != shown:
                        shown = pct
                        await self._write(job, lease, progress=pct)
                elif kind == "result":  # latents, or uint8 frames when the DiT ranks decode
                    latents = event.get("latents")
                    frames = event.get("frames")
                elif event["kind"] == "invalid":
                    raise JobFailedError("invalid_request", event["message"])
                elif event["kind"] == "unavailable":
                    raise UnavailableError(event["message"])
                elif event["kind"] == "lease_lost":
                    raise LeaseLostError
                else:
                    raise RuntimeError(f"DiT {event['kind']}: {event['message']}")
        finally:
            if latents is None and frames is None:
                stream.cancel()
        if latents is None and frames is None:
            raise RuntimeError("the DiT stream ended without a result")

        key = video_key(job.id, lease.attempt)  # this attempt's own key; published by finish
        if frames is not None:
            stored = await self.decoder.store.remote(frames, fps, key)
        else:
            stored = await self.decoder.decode.remote(latents, fps, key)
        done = await self.store.finish(
            job.id,
            lease,
            jobs.COMPLETED,
            progress=100,
            result_key=key,
            frames_sha256=stored["frames_sha256"],
            expires_at=int(time.time() + self.settings.result_ttl_s),
        )
        if not done:  # stale or deleted: only this attempt's unpublished file is ours to remove
            await asyncio.to_thread(self.results.delete, key)
            raise LeaseLostError
        await asyncio.to_thread(self._delete_inputs, job.id)
        self.metrics.job_finished(jobs.COMPLETED)
        self.metrics.job_ran(time.time() - started)
        log.info("%s completed (attempt %d)", job.id, lease.attempt)

    async def _face_swap_inputs(self, job: Job, params: Any) -> dict[str, Any]:
        """What the Preprocessor needs for a face swap: the uploads and the SDEdit options."""
        r = job.request
        video = await asyncio.to_thread(self.results.get, input_video_key(job.id))
        mask = await asyncio.to_thread(self.results.get, input_mask_key(job.id)) if r["has_mask"] else None
        if video is None or (r["has_mask"] and mask is None):
            raise JobFailedError("input_lost", "the input video is no longer stored")
        return {
            "params": params,
            "video": video,
            "mask": mask,
            "denoising_strength": r["denoising_strength"],
            "background_consistency": r["background_consistency"],
        }

    async def _control_inputs(self, job: Job) -> dict[str, Any]:
        """What the Preprocessor needs for a VACE request: the control uploads and the scale."""
        r, keys = job.request, control_keys(job.id)
        out: dict[str, Any] = {"scale": r["vace_scale"]}
        for name, key in keys.items():  # control_video → "video", control_mask → "mask", first_frame
            data = await asyncio.to_thread(self.results.get, key) if r.get(f"has_{name}") else None
            if r.get(f"has_{name}") and data is None:
                raise JobFailedError("input_lost", f"the uploaded {name} is no longer stored")
            out[name.removeprefix("control_")] = data
        return out

    async def _conditioning(self, job: Job, lease: Lease, params: Any) -> dict[str, torch.Tensor | None]:
        """Encoded prompt/face: saved by an earlier attempt, or from the Preprocessor (then saved
        under this attempt's key and published by a fenced write)."""
        if job.conditioning_key:
            saved = await asyncio.to_thread(self.results.get, job.conditioning_key)
            if saved is not None:
                return torch.load(io.BytesIO(saved), weights_only=True)
        r = job.request
        image = None
        if r["has_reference"]:
            image = await asyncio.to_thread(self.results.get, reference_key(job.id))
            if image is None:
                raise JobFailedError("input_lost", "the reference image is no longer stored")
        negative = params.negative_prompt if params.uses_guidance else None
        face_swap = await self._face_swap_inputs(job, params) if r.get("has_video") else None
        vace = await self._control_inputs(job) if r.get("has_control_video") else None
        try:
            cond = await self.preprocessor.encode.remote(
                params.prompt, negative, image, r["subject"], face_swap, vace
            )
        except Exception as exc:
            permanent = classify_preprocessing_error(exc)
            if permanent is None:
                raise
            log.info("%s: input refused by the Preprocessor: %s", job.id, exc)
            raise permanent from None
        buf = io.BytesIO()
        torch.save(cond, buf)  # a face swap's start latents are saved too: a retry reuses them
        key = conditioning_key(job.id, lease.attempt)
        await asyncio.to_thread(self.results.put, key, buf.getvalue())
        try:
            await self._write(job, lease, conditioning_key=key)
        except LeaseLostError:
            await asyncio.to_thread(self.results.delete, key)
            raise
        return cond
