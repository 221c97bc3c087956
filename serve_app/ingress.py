"""Ingress deployment: the OpenAI-Videos-shaped HTTP API and the job runner.

POST writes the job row (and the uploaded image as a blob) before it answers 202, then runs the
job here: Preprocessor → DiT replica (streamed progress) → Decoder. The runner holds a lease on
the job and renews it; if this replica dies, another (or its replacement) claims the job when the
lease expires and runs it again, up to `max_attempts` runs, then marks it failed with a reason.
Every request's state lives in the job row or in local variables of its own task.
"""

import asyncio
import hashlib
import hmac
import io
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import jobs
from serve_app.api import (
    APIError,
    VideoRequest,
    decode_data_url,
    new_job_id,
    params_from_job,
    parse_json_body,
    parse_range,
    parse_video_request,
    sniff_image,
    video_object,
)
from serve_app.jobs import Job, open_job_store
from serve_app.metrics import JobMetrics
from serve_app.results import ResultStore
from serve_app.settings import ServeSettings
from standin.errors import InvalidImageError, InvalidRequestError
from standin.image_io import ImageLimits, decode_image

log = logging.getLogger(__name__)

# Share of the progress bar each stage fills (denoising dominates).
PREPROCESS_DONE = 5
DENOISE_DONE = 95
BODY_OVERHEAD = 64 * 1024  # form fields and base64 beside the image


class RetryableError(Exception):
    """This attempt failed for a reason another attempt may not meet (a replica died…)."""


class UnavailableError(Exception):
    """No healthy DiT replica right now: wait without spending an attempt."""


class JobFailedError(Exception):
    """The job cannot succeed (bad input); fail it now with `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


app = FastAPI(title="Stand-In Serve", docs_url=None, redoc_url=None)


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(
        APIError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code
    )


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    param = str(first.get("loc", ["", ""])[-1]) or None
    return JSONResponse(APIError(400, f"invalid parameter: {first.get('msg', exc)}", param=param).body(), 400)


def _owner(settings: ServeSettings, request: Request) -> str | None:
    """The caller's identity (a hash of its API key), or None when keys are off."""
    if not settings.api_keys:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise APIError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in settings.api_keys):
        raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return hashlib.sha256(key.encode()).hexdigest()[:32]


async def _read_form(request: Request, body: bytes) -> tuple[dict[str, Any], bytes | None]:
    """Parse an already size-checked multipart body → (text fields, input_reference bytes)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    copy = Request(request.scope, replay)
    try:
        form = await copy.form(max_files=1, max_fields=32)
    except Exception as exc:  # malformed multipart
        raise APIError(400, f"malformed multipart body: {exc}") from None
    fields: dict[str, Any] = {}
    image: bytes | None = None
    for name, value in form.multi_items():
        if name in fields or (name == "input_reference" and image is not None):
            raise APIError(400, f"field {name} given twice", param=name)
        if isinstance(value, str):
            if name == "input_reference":
                raise APIError(
                    400,
                    "input_reference must be a file part (or use JSON with a data URL)",
                    param="input_reference",
                )
            fields[name] = value
        else:
            image = await value.read()
    await form.close()
    return fields, image


def _check_image(data: bytes, max_bytes: int) -> None:
    """Reject what the Preprocessor could never use, before the job is accepted."""
    if len(data) > max_bytes:
        raise APIError(
            413,
            f"input_reference is larger than {max_bytes} bytes",
            param="input_reference",
            code="image_too_large",
        )
    if sniff_image(data) is None:
        raise APIError(
            415,
            "input_reference must be a JPEG, PNG, WebP or AVIF image",
            param="input_reference",
            code="unsupported_image_format",
        )
    try:
        decode_image(data, ImageLimits(max_bytes=max_bytes))
    except InvalidImageError as exc:
        raise APIError(
            400, f"input_reference: {exc}", param="input_reference", code="invalid_image"
        ) from None


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
@serve.ingress(app)
class Ingress:
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
        self.store = open_job_store(settings)
        self.metrics = JobMetrics(settings.model_name)
        self.results = ResultStore(settings.results_location)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.app_name = serve.get_replica_context().app_name
        except Exception:
            self.replica, self.app_name = uuid.uuid4().hex, ""
        self.tasks: dict[str, asyncio.Task] = {}
        self._health: tuple[float, bool, str] = (0.0, False, "")
        self._background = asyncio.get_running_loop().create_task(self._maintenance())

    # -- HTTP -------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        ok, detail = await self._ready()
        if ok:
            return JSONResponse({"status": "ok"})
        return JSONResponse(
            {"status": "unavailable", "detail": detail}, status_code=503, headers={"Retry-After": "5"}
        )

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        _owner(self.settings, request)
        return {
            "object": "list",
            "data": [
                {"id": self.settings.model_name, "object": "model", "created": 0, "owned_by": "standin"}
            ],
        }

    @app.post("/v1/videos")
    async def create_video(self, request: Request) -> JSONResponse:
        owner = _owner(self.settings, request)
        video = await self._parse(request)
        if self.store.count_active() >= self.settings.max_active_jobs:
            self.metrics.job_rejected("queue_full")
            raise APIError(
                429,
                f"the server has {self.settings.max_active_jobs} jobs queued or running; retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        job = Job(
            id=new_job_id(),
            owner=owner,
            model=video.model,
            request=video.to_job_request(),
            attempts=1,
            lease_owner=self.replica,
            lease_expires_at=time.time() + self.settings.lease_s,
        )
        self.store.create(job, {"image": video.image} if video.image is not None else None)
        self.metrics.job_accepted()
        self._spawn(job.id)
        log.info("accepted %s (%s)", job.id, job.request["width"])
        return JSONResponse(video_object(job), status_code=202)

    @app.get("/v1/videos")
    async def list_videos(
        self, request: Request, limit: int = 20, after: str | None = None, order: str = "desc"
    ) -> dict[str, Any]:
        owner = _owner(self.settings, request)
        if not 1 <= limit <= 100:
            raise APIError(400, f"limit must be in [1, 100], got {limit}", param="limit")
        if order not in ("asc", "desc"):
            raise APIError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
        found = self.store.list(owner, limit + 1, after, order)
        data = [video_object(j) for j in found[:limit]]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(found) > limit,
        }

    @app.get("/v1/videos/{video_id}")
    async def get_video(self, video_id: str, request: Request) -> dict[str, Any]:
        return video_object(self._visible(video_id, _owner(self.settings, request)))

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(self, video_id: str, request: Request) -> dict[str, Any]:
        job = self._visible(video_id, _owner(self.settings, request))
        self.store.delete(job.id)  # a runner anywhere sees the row gone and stops
        if not job.terminal:
            self.metrics.job_finished("cancelled")
        task = self.tasks.get(job.id)
        if task is not None:
            task.cancel()
        if job.result_key:
            self.results.delete(job.result_key)
        log.info("deleted %s (was %s)", job.id, job.status)
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    @app.get("/v1/videos/{video_id}/content")
    async def content(self, video_id: str, request: Request) -> Response:
        job = self._visible(video_id, _owner(self.settings, request))
        if job.status != jobs.COMPLETED or not job.result_key:
            raise APIError(
                409,
                f"video {job.id} is {job.status}, not completed",
                param="video_id",
                code="video_not_ready",
            )
        data = await asyncio.to_thread(self.results.get, job.result_key)
        if data is None:
            raise APIError(
                404, f"the content of {job.id} has expired or was deleted", code="content_not_found"
            )
        headers = {"Accept-Ranges": "bytes", "Content-Disposition": f'inline; filename="{job.id}.mp4"'}
        range_header = request.headers.get("range")
        if range_header:
            span = parse_range(range_header, len(data))
            if span is None:
                return Response(status_code=416, headers={"Content-Range": f"bytes */{len(data)}"})
            start, end = span
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return Response(data[start : end + 1], status_code=206, media_type="video/mp4", headers=headers)
        return Response(data, media_type="video/mp4", headers=headers)

    @app.get("/v1/videos/{video_id}/events")
    async def events(self, video_id: str, request: Request) -> StreamingResponse:
        job = self._visible(video_id, _owner(self.settings, request))
        return StreamingResponse(
            self._event_stream(job.id, request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _event_stream(self, job_id: str, request: Request) -> AsyncIterator[str]:
        last: tuple[str, int] | None = None
        while True:
            job = self.store.get(job_id)
            if job is None:
                yield f'event: deleted\ndata: {{"id": "{job_id}"}}\n\n'
                return
            if (job.status, job.progress) != last:
                last = (job.status, job.progress)
                kind = job.status if job.terminal else "progress"
                yield f"event: {kind}\ndata: {json.dumps(video_object(job))}\n\n"
            if job.terminal or await request.is_disconnected():
                return
            await asyncio.sleep(0.25)

    # -- request parsing ----------------------------------------------------------------------

    async def _parse(self, request: Request) -> VideoRequest:
        s = self.settings
        limit = s.max_upload_bytes * 4 // 3 + BODY_OVERHEAD
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        image: bytes | None = None
        if ctype == "application/json":
            fields = parse_json_body(bytes(body))
            ref = fields.pop("input_reference", None)
            if ref is not None:
                image = decode_data_url(ref, s.max_upload_bytes)
            form = False
        elif ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            fields, image = await _read_form(request, bytes(body))
            form = True
        else:
            raise APIError(
                415,
                f"unsupported Content-Type {ctype or '(none)'!r}: "
                "send multipart/form-data or application/json",
                code="unsupported_media_type",
            )
        if image is not None:
            await asyncio.to_thread(_check_image, image, s.max_upload_bytes)
        return parse_video_request(fields, image, s, form=form)

    def _visible(self, video_id: str, owner: str | None) -> Job:
        job = self.store.get(video_id)
        # Another key's job answers exactly like a missing one: ids do not leak.
        if job is None or job.owner != owner:
            raise APIError(404, f"no video with id {video_id!r}", param="video_id", code="video_not_found")
        return job

    async def _ready(self) -> tuple[bool, str]:
        now, ok, detail = time.monotonic(), *self._health[1:]
        if now - self._health[0] < 1.0:
            return ok, detail
        try:
            status = await asyncio.to_thread(serve.status)
            app_status = status.applications.get(self.app_name) if self.app_name else None
            if app_status is None:
                ok, detail = False, f"application {self.app_name!r} not found"
            else:
                ok = str(app_status.status).endswith("RUNNING")
                bad = {
                    n: str(d.status)
                    for n, d in app_status.deployments.items()
                    if not str(d.status).endswith("HEALTHY")
                }
                detail = "" if ok else f"application {app_status.status}: {bad}"
            self.store.count_active()
        except Exception as exc:  # the controller or the database is unreachable
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        self._health = (now, ok, detail)
        return ok, detail

    # -- the job runner ----------------------------------------------------------------------

    def _spawn(self, job_id: str) -> None:
        if job_id in self.tasks:
            return
        task = asyncio.get_running_loop().create_task(self._execute(job_id))
        self.tasks[job_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(job_id, None))

    async def _execute(self, job_id: str) -> None:
        s = self.settings
        keeper = asyncio.get_running_loop().create_task(self._keep_lease(job_id, asyncio.current_task()))
        deadline = time.monotonic() + s.job_timeout_s
        try:
            while True:
                job = self.store.get(job_id)
                if job is None or job.terminal:
                    return
                if job.attempts > s.max_attempts:
                    self._fail(job_id, "retries_exhausted", f"gave up after {s.max_attempts} attempts")
                    return
                if time.monotonic() > deadline:
                    self._fail(job_id, "timeout", f"not finished within {s.job_timeout_s:g} s")
                    return
                try:
                    await self._attempt(job)
                    return
                except JobFailedError as exc:
                    self._fail(job_id, exc.code, str(exc))
                    return
                except UnavailableError as exc:
                    log.info("%s waits for a healthy DiT replica: %s", job_id, exc)
                    await asyncio.sleep(1.0)
                except Exception as exc:  # RetryableError, a dead replica, a lost actor…
                    log.warning("%s attempt %d failed: %s", job_id, job.attempts, exc)
                    if job.attempts >= s.max_attempts:
                        self._fail(
                            job_id, "generation_failed", f"attempt {job.attempts}/{s.max_attempts}: {exc}"
                        )
                        return
                    self.store.update(job_id, attempts=job.attempts + 1, status=jobs.QUEUED)
                    self.metrics.job_retried()
                    await asyncio.sleep(s.retry_backoff_s * 2 ** (job.attempts - 1))
        except asyncio.CancelledError:
            log.info("%s: runner stopped (deleted, or lease lost)", job_id)
        finally:
            keeper.cancel()

    def _fail(self, job_id: str, code: str, message: str) -> None:
        log.warning("%s failed: %s: %s", job_id, code, message)
        done = self.store.finish(
            job_id,
            jobs.FAILED,
            error_code=code,
            error_message=message,
            expires_at=int(time.time() + self.settings.result_ttl_s),
        )
        if done:
            self.metrics.job_finished(jobs.FAILED, code)

    async def _keep_lease(self, job_id: str, runner: asyncio.Task | None) -> None:
        """Renew the lease; stop the runner when the job was deleted or taken over."""
        s = self.settings
        last_renewal = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            if time.monotonic() - last_renewal >= s.lease_s / 3:
                alive = self.store.renew_lease(job_id, self.replica, s.lease_s)
                last_renewal = time.monotonic()
            else:
                alive = (job := self.store.get(job_id)) is not None and not job.terminal
            if not alive and runner is not None:
                runner.cancel()
                return

    async def _attempt(self, job: Job) -> None:
        r = job.request
        params = params_from_job(r)
        conditioning = await self._conditioning(job, params)
        self.store.update(
            job.id, status=jobs.IN_PROGRESS, started_at=int(time.time()), progress=PREPROCESS_DONE
        )
        started = time.time()
        self.metrics.job_started(started - job.created_at)
        last_step = time.monotonic()

        stream = self.dit.options(stream=True).denoise.remote(params, conditioning)
        latents = None
        shown = PREPROCESS_DONE
        try:
            async for event in stream:
                kind = event["event"]
                if kind == "progress":
                    now = time.monotonic()
                    self.metrics.step(now - last_step)
                    last_step = now
                    pct = PREPROCESS_DONE + (DENOISE_DONE - PREPROCESS_DONE) * event["step"] // event["total"]
                    if pct != shown:
                        shown = pct
                        self.store.update(job.id, progress=pct)
                elif kind == "result":
                    latents = event["latents"]
                elif event["kind"] == "invalid":
                    raise JobFailedError("invalid_request", event["message"])
                elif event["kind"] == "unavailable":
                    raise UnavailableError(event["message"])
                else:
                    raise RetryableError(f"DiT {event['kind']}: {event['message']}")
        finally:
            if latents is None:
                stream.cancel()
        if latents is None:
            raise RetryableError("the DiT stream ended without a result")

        key = f"{job.id}.mp4"
        stored = await self.decoder.decode.remote(latents, float(r["fps"]), key)
        done = self.store.finish(
            job.id,
            jobs.COMPLETED,
            progress=100,
            result_key=key,
            frames_sha256=stored["frames_sha256"],
            expires_at=int(time.time() + self.settings.result_ttl_s),
        )
        if not done:  # deleted while decoding
            self.results.delete(key)
        else:
            self.metrics.job_finished(jobs.COMPLETED)
            self.metrics.job_ran(time.time() - started)
            log.info("%s completed (attempt %d)", job.id, job.attempts)

    async def _conditioning(self, job: Job, params: Any) -> dict[str, torch.Tensor | None]:
        """Encoded prompt/face: from the blob a previous attempt saved, or from the Preprocessor.
        The raw upload is deleted as soon as its encoding is saved."""
        saved = self.store.get_blob(job.id, "conditioning")
        if saved is not None:
            return torch.load(io.BytesIO(saved), weights_only=True)
        r = job.request
        image = self.store.get_blob(job.id, "image") if r["has_reference"] else None
        if r["has_reference"] and image is None:
            raise JobFailedError("input_lost", "the reference image is no longer stored")
        negative = params.negative_prompt if params.guidance_scale != 1.0 else None
        try:
            cond = await self.preprocessor.encode.remote(params.prompt, negative, image, r["subject"])
        except InvalidImageError as exc:
            raise JobFailedError("invalid_image", str(exc)) from None
        except InvalidRequestError as exc:
            raise JobFailedError("invalid_request", str(exc)) from None
        buf = io.BytesIO()
        torch.save(cond, buf)
        self.store.put_blob(job.id, "conditioning", buf.getvalue())
        self.store.delete_blob(job.id, "image")
        return cond

    # -- recovery and expiry ------------------------------------------------------------------

    async def _maintenance(self) -> None:
        """Claim jobs whose runner died; delete expired results."""
        s = self.settings
        while True:
            try:
                for job in self.store.claim_expired(self.replica, s.lease_s):
                    log.info("recovering %s (attempt %d)", job.id, job.attempts)
                    self._spawn(job.id)
                for job in self.store.expired(time.time()):
                    if job.result_key:
                        self.results.delete(job.result_key)
                    self.store.delete(job.id)
            except Exception:
                log.exception("job maintenance failed")
            await asyncio.sleep(min(5.0, s.lease_s / 2))
