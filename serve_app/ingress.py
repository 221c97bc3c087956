"""Ingress deployment: the OpenAI-Videos-shaped HTTP API. It validates, stores and answers —
nothing else: POST writes the upload to the results store and the job row (queued) before it
answers 202; a JobRunner replica (serve_app/runner.py) claims and runs the job. So a rolling
update (or a crash) of the Ingress never touches a running generation.

Every job-store call runs on worker threads (`AsyncJobStore`); SSE streams are pushed from one
change watcher per replica (`ChangeFeed`), with keep-alive comments and event ids.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from parallel.styles import StyleRef
from serve_app import jobs
from serve_app.api import (
    OPENAPI_MODELS,
    APIError,
    CreateVideoForm,
    CreateVideoJSON,
    ErrorResponse,
    Video,
    VideoDeleted,
    VideoList,
    VideoRequest,
    check_text,
    decode_data_url,
    new_job_id,
    parse_json_body,
    parse_range,
    parse_video_request,
    sniff_image,
    video_object,
)
from serve_app.face_swap import VIDEO_FIELDS, decode_video_data_url, video_upload
from serve_app.jobs import AsyncJobStore, Job, JobStore, open_job_store
from serve_app.loras import LoraLibrary, LoraList, parse_loras, refs_to_job
from serve_app.metrics import JobMetrics
from serve_app.results import (
    ResultStore,
    control_keys,
    input_mask_key,
    input_video_key,
    job_keys,
    reference_key,
)
from serve_app.settings import ServeSettings
from serve_app.vace import CONTROL_FIELDS, control_upload
from standin.errors import InvalidImageError
from standin.image_io import ImageLimits, decode_image

log = logging.getLogger(__name__)

BODY_OVERHEAD = 64 * 1024  # form fields and base64 beside the image

app = FastAPI(title="Stand-In Serve", version="1", docs_url=None, redoc_url=None)


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
    message = f"invalid parameter: {first.get('msg', 'invalid')}"
    return JSONResponse(APIError(400, message, param=param).body(), 400)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Details (traceback, paths, hosts) go to the log, never to the client.
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(APIError(500, "internal server error", type="server_error").body(), 500)


_ERRORS = {
    400: {"model": ErrorResponse, "description": "invalid request"},
    401: {"model": ErrorResponse, "description": "missing or invalid API key"},
}
_NOT_FOUND = {404: {"model": ErrorResponse, "description": "no such video"}}


def _openapi() -> dict[str, Any]:
    """FastAPI's document + the request bodies and models that the handlers parse themselves."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in OPENAPI_MODELS:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        for path in doc["paths"].values():  # parameter errors are 400 here, never FastAPI's 422
            for operation in path.values():
                if "HTTPValidationError" in json.dumps(operation["responses"].get("422", {})):
                    del operation["responses"]["422"]
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        app.openapi_schema = doc
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]

_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{CreateVideoJSON.__name__}"}},
            "multipart/form-data": {"schema": {"$ref": f"#/components/schemas/{CreateVideoForm.__name__}"}},
        },
    }
}


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


async def _read_form(request: Request, body: bytes) -> tuple[dict[str, Any], bytes | None, dict[str, bytes]]:
    """Parse an already size-checked multipart body → (text fields, input_reference bytes,
    {"input_video"/"input_mask": bytes} of a face swap)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    copy = Request(request.scope, replay)
    try:
        form = await copy.form(max_files=1 + len(_UPLOAD_FIELDS), max_fields=32)
    except Exception:  # malformed multipart (the parser's message may quote raw bytes)
        raise APIError(400, "malformed multipart body") from None
    fields: dict[str, Any] = {}
    image: bytes | None = None
    videos: dict[str, bytes] = {}
    for name, value in form.multi_items():
        check_text(name, "field name")
        if name in fields or name in videos or (name == "input_reference" and image is not None):
            raise APIError(400, f"field {name!r} given twice", param=name)
        if isinstance(value, str) and name in _UPLOAD_FIELDS:
            raise APIError(400, f"{name} must be a file part (or use JSON with a data URL)", param=name)
        if not isinstance(value, str) and name in _UPLOAD_FIELDS:
            videos[name] = await value.read()
        elif isinstance(value, str):
            if name == "input_reference":
                raise APIError(
                    400,
                    "input_reference must be a file part (or use JSON with a data URL)",
                    param="input_reference",
                )
            fields[name] = value
        elif name != "input_reference":
            raise APIError(400, f"field {name!r} must be text, not a file", param=name)
        else:
            image = await value.read()
    await form.close()
    return fields, image, videos


# every file upload besides input_reference: a face swap's videos, a VACE request's control
_UPLOAD_FIELDS = VIDEO_FIELDS + CONTROL_FIELDS


def _check_image(data: bytes, max_bytes: int) -> None:
    """Reject what the Preprocessor could never use, before the job is accepted (400: a bad
    field, as OpenAI answers it; 415 is only for the request's own Content-Type)."""
    if len(data) > max_bytes:
        raise APIError(
            413,
            f"input_reference is larger than {max_bytes} bytes",
            param="input_reference",
            code="image_too_large",
        )
    if sniff_image(data) is None:
        raise APIError(
            400,
            "input_reference must be a JPEG, PNG, WebP or AVIF image",
            param="input_reference",
            code="invalid_image",
        )
    try:
        decode_image(data, ImageLimits(max_bytes=max_bytes))
    except InvalidImageError as exc:
        raise APIError(
            400, f"input_reference: {exc}", param="input_reference", code="invalid_image"
        ) from None


async def _check_loras(
    library: LoraLibrary | None, raw: Any, settings: ServeSettings, form: bool
) -> tuple[StyleRef, ...]:
    if library is None:  # parse_loras refuses a non-empty list without lora_dir (400)
        return parse_loras(raw, settings, form=form)
    return await library.check_field(raw, settings, form=form)


class ChangeFeed:
    """One watcher thread per replica wakes the SSE streams of jobs that changed (Redis pushes
    the ids; SQLite reports that something changed). Streams of queued jobs wake on any change,
    since their queue position moves when other jobs start."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.subscribers: dict[str, dict[asyncio.Event, bool]] = {}  # id → {event: any change}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def subscribe(self, job_id: str) -> asyncio.Event:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._watch, name="job-changes", daemon=True)
            self._thread.start()
        event = asyncio.Event()
        self.subscribers.setdefault(job_id, {})[event] = False
        return event

    def wake_on_any_change(self, job_id: str, event: asyncio.Event, on: bool) -> None:
        self.subscribers.get(job_id, {})[event] = on

    def unsubscribe(self, job_id: str, event: asyncio.Event) -> None:
        events = self.subscribers.get(job_id, {})
        events.pop(event, None)
        if not events:
            self.subscribers.pop(job_id, None)

    def _wake(self, ids: set[str] | None) -> None:
        for job_id, events in list(self.subscribers.items()):
            for event, any_change in events.items():
                if ids is None or any_change or job_id in ids:
                    event.set()

    def _watch(self) -> None:
        watcher = None
        while True:
            try:
                watcher = watcher or self.store.watch()
                ids = watcher.wait(1.0)
                if ids is None or ids:
                    assert self._loop is not None
                    self._loop.call_soon_threadsafe(self._wake, ids)
            except Exception:
                log.warning("job change watcher failed; reconnecting", exc_info=True)
                watcher = None
                time.sleep(1.0)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
@serve.ingress(app)
class Ingress:
    def __init__(self, settings: ServeSettings, runner: DeploymentHandle | None = None) -> None:
        self.settings = settings
        self.runner = runner  # bound so that the JobRunner is part of the application
        store = open_job_store(settings)
        self.store = AsyncJobStore(store)
        self.feed = ChangeFeed(store)
        self.metrics = JobMetrics(settings.model_name)
        self.results = ResultStore(settings.results_location)
        self.loras = LoraLibrary.for_settings(settings)  # style LoRAs by name (None: no lora_dir)
        try:
            self.app_name = serve.get_replica_context().app_name
        except Exception:
            self.app_name = ""
        self._health: tuple[float, bool, str] = (0.0, False, "")

    # -- HTTP -------------------------------------------------------------------------------

    @app.get("/healthz", responses={503: {"description": "not ready"}})
    async def healthz(self) -> JSONResponse:
        ok, detail = await self._ready()
        if ok:
            return JSONResponse({"status": "ok"})
        return JSONResponse(
            {"status": "unavailable", "detail": detail}, status_code=503, headers={"Retry-After": "5"}
        )

    @app.get("/v1/models", responses=_ERRORS)
    async def models(self, request: Request) -> dict[str, Any]:
        _owner(self.settings, request)
        return {
            "object": "list",
            "data": [
                {"id": self.settings.model_name, "object": "model", "created": 0, "owned_by": "standin"}
            ],
        }

    @app.get("/v1/loras", response_model=LoraList, responses=_ERRORS)
    async def list_loras(self, request: Request) -> dict[str, Any]:
        """The style LoRAs of lora_dir a request may name, and the files that are refused (why)."""
        _owner(self.settings, request)
        if self.loras is None:
            return {"object": "list", "data": [], "unusable": []}
        return await asyncio.to_thread(self.loras.listing)

    @app.post(
        "/v1/videos",
        status_code=202,
        response_model=None,
        openapi_extra=_CREATE_BODY,
        responses={
            202: {"model": Video, "description": "accepted: the job is queued"},
            **_ERRORS,
            404: {"model": ErrorResponse, "description": "unknown model or LoRA"},
            413: {"model": ErrorResponse, "description": "body or image too large"},
            415: {"model": ErrorResponse, "description": "unsupported Content-Type"},
            422: {"model": ErrorResponse, "description": "a value out of range"},
            429: {"model": ErrorResponse, "description": "queue full (see Retry-After)"},
        },
    )
    async def create_video(self, request: Request) -> JSONResponse:
        owner = _owner(self.settings, request)
        styles, video = await self._parse(request)
        if await self.store.count_active() >= self.settings.max_active_jobs:
            self.metrics.job_rejected("queue_full")
            raise APIError(
                429,
                f"the server has {self.settings.max_active_jobs} jobs queued or running; retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        request_fields = {**video.to_job_request(), "loras": refs_to_job(styles)}
        job = Job(id=new_job_id(), owner=owner, model=video.model, request=request_fields)
        uploads = {reference_key(job.id): video.image}
        if video.video is not None:  # a face swap's video (and mask)
            uploads[input_video_key(job.id)] = video.video.video
            uploads[input_mask_key(job.id)] = video.video.mask
        if video.control is not None:  # a VACE request's control video (mask, first frame)
            keys = control_keys(job.id)
            uploads[keys["control_video"]] = video.control.video
            uploads[keys["control_mask"]] = video.control.mask
            uploads[keys["first_frame"]] = video.control.first_frame
        uploads = {key: data for key, data in uploads.items() if data is not None}
        # large inputs live in the results store, not the job store
        for key, data in uploads.items():
            await asyncio.to_thread(self.results.put, key, data)
        try:
            await self.store.create(job)
        except BaseException:
            for key in uploads:  # no job row: the uploads must not linger
                await asyncio.to_thread(self.results.delete, key)
            raise
        self.metrics.job_accepted()
        log.info("accepted %s", job.id)
        return JSONResponse(video_object(job, await self.store.queue_position(job.id)), status_code=202)

    @app.get("/v1/videos", response_model=VideoList, responses=_ERRORS)
    async def list_videos(
        self, request: Request, limit: int = 20, after: str | None = None, order: str = "desc"
    ) -> dict[str, Any]:
        owner = _owner(self.settings, request)
        if not 1 <= limit <= 100:
            raise APIError(400, f"limit must be in [1, 100], got {limit}", param="limit")
        if order not in ("asc", "desc"):
            raise APIError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
        found = await self.store.list(owner, limit + 1, after, order)
        data = [video_object(j) for j in found[:limit]]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(found) > limit,
        }

    @app.get("/v1/videos/{video_id}", response_model=Video, responses={**_ERRORS, **_NOT_FOUND})
    async def get_video(self, video_id: str, request: Request) -> dict[str, Any]:
        job = await self._visible(video_id, _owner(self.settings, request))
        return await self._video(job)

    @app.delete("/v1/videos/{video_id}", response_model=VideoDeleted, responses={**_ERRORS, **_NOT_FOUND})
    async def delete_video(self, video_id: str, request: Request) -> dict[str, Any]:
        job = await self._visible(video_id, _owner(self.settings, request))
        # The runner's next lease renewal (and the DiT's own check) sees the row gone and stops.
        removed = await self.store.delete(job.id)
        if removed is not None:
            if not removed.terminal:
                self.metrics.job_finished("cancelled")
            await asyncio.to_thread(self._delete_files, removed)
        log.info("deleted %s (was %s)", job.id, job.status)
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    def _delete_files(self, job: Job) -> None:
        for key in job_keys(job):
            self.results.delete(key)

    @app.get(
        "/v1/videos/{video_id}/content",
        response_class=Response,
        responses={
            200: {"content": {"video/mp4": {}}, "description": "the MP4 (Range requests: 206)"},
            **_ERRORS,
            **_NOT_FOUND,
            409: {"model": ErrorResponse, "description": "the video is not completed"},
        },
    )
    async def content(self, video_id: str, request: Request) -> Response:
        job = await self._visible(video_id, _owner(self.settings, request))
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

    @app.get(
        "/v1/videos/{video_id}/events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS, **_NOT_FOUND},
    )
    async def events(self, video_id: str, request: Request) -> StreamingResponse:
        job = await self._visible(video_id, _owner(self.settings, request))
        return StreamingResponse(
            self._event_stream(job.id, request.headers.get("last-event-id")),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _event_stream(self, job_id: str, last_event_id: str | None) -> AsyncIterator[str]:
        """Pushed on change: one event per change of the job (id = its write count `rev`), a
        keep-alive comment while nothing changes; a client reconnecting with Last-Event-ID gets
        only what it has not seen."""
        changed = self.feed.subscribe(job_id)
        last: tuple[str, int | None] | None = None
        try:
            while True:
                changed.clear()
                job = await self.store.get(job_id)
                if job is None:
                    yield f'event: deleted\ndata: {{"id": "{job_id}"}}\n\n'
                    return
                video = await self._video(job)
                now = (str(job.rev), video["queue_position"])
                if now != last and (last is not None or now[0] != last_event_id or job.terminal):
                    kind = job.status if job.terminal else "progress"
                    yield f"id: {job.rev}\nevent: {kind}\ndata: {json.dumps(video)}\n\n"
                last = now
                if job.terminal:
                    return
                self.feed.wake_on_any_change(job_id, changed, job.status == jobs.QUEUED)
                try:
                    await asyncio.wait_for(changed.wait(), self.settings.sse_keepalive_s)
                except TimeoutError:
                    yield ": keep-alive\n\n"
        finally:
            self.feed.unsubscribe(job_id, changed)

    # -- helpers ------------------------------------------------------------------------------

    async def _video(self, job: Job) -> dict[str, Any]:
        position = await self.store.queue_position(job.id) if job.status == jobs.QUEUED else None
        return video_object(job, position)

    async def _parse(self, request: Request) -> tuple[tuple[StyleRef, ...], VideoRequest]:
        s = self.settings
        # a face swap's video and mask (or a VACE control, mask and first frame) ride in the same
        # body (base64 in JSON)
        limit = (2 * s.max_upload_bytes + 2 * s.max_video_bytes) * 4 // 3 + BODY_OVERHEAD
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("application/json", "multipart/form-data", "application/x-www-form-urlencoded"):
            raise APIError(
                415,
                f"unsupported Content-Type {ctype[:100] or '(none)'!r}: "
                "send multipart/form-data or application/json",
                code="unsupported_media_type",
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")
        image: bytes | None = None
        if ctype == "application/json":
            fields = parse_json_body(bytes(body))
            ref = fields.pop("input_reference", None)
            if ref is not None:
                image = decode_data_url(ref, s.max_upload_bytes)
            videos = {
                name: decode_video_data_url(value, s.max_video_bytes, name)
                for name in _UPLOAD_FIELDS
                if (value := fields.pop(name, None)) is not None
            }
            form = False
        else:
            fields, image, videos = await _read_form(request, bytes(body))
            form = True
        if image is not None:
            await asyncio.to_thread(_check_image, image, s.max_upload_bytes)
        # style LoRAs by name: 404 unknown, 422 a refused file, before a job exists
        styles = await _check_loras(self.loras, fields.pop("loras", None), s, form)
        upload = await asyncio.to_thread(video_upload, videos.get("input_video"), videos.get("input_mask"), s)
        control = await asyncio.to_thread(control_upload, *(videos.get(n) for n in CONTROL_FIELDS), s)
        return styles, parse_video_request(fields, image, s, form=form, video=upload, control=control)

    async def _visible(self, video_id: str, owner: str | None) -> Job:
        job = await self.store.get(video_id)
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
                ok, detail = False, "application not found"
            else:
                ok = str(app_status.status).endswith("RUNNING")
                bad = sorted(
                    n for n, d in app_status.deployments.items() if not str(d.status).endswith("HEALTHY")
                )
                detail = "" if ok else f"deployments not healthy: {bad}"
            await self.store.count_active()
        except Exception:  # the controller or the database is unreachable
            log.warning("readiness check failed", exc_info=True)
            ok, detail = False, "the job store or the Serve controller is unreachable"
        self._health = (now, ok, detail)
        return ok, detail
