"""The HTTP contract: OpenAI-shaped errors, request parsing and validation, the video object,
and the pydantic models that describe them in the OpenAPI document.

Status codes for bad input (OpenAI's conventions): 400 malformed (missing or mistyped field, a
string that is not clean Unicode, an undecodable or unsupported image, a bad data URL), 404 unknown
model or video, 409 content of an unfinished video, 413 too large, 415 an unsupported request
Content-Type (only that), 422 well-formed but out of range (size, frames, steps, prompt length…),
429 queue full. Messages quote user input only through repr(). Nothing here touches models or Ray.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.jobs import QUEUED, Job
from serve_app.settings import ServeSettings
from standin.errors import InvalidRequestError
from standin.pipeline import WAN_NEGATIVE_PROMPT, GenerationParams
from standin.presets import get_preset
from standin.sdedit import DEFAULT_DENOISING_STRENGTH
from standin.step_cache import CACHE_KINDS, MAX_THRESHOLD, StepCache
from standin.vace import DEFAULT_VACE_SCALE, MAX_VACE_SCALE
from standin.video import DEFAULT_FPS, MAX_FPS

if TYPE_CHECKING:
    from serve_app.face_swap import VideoUpload
    from serve_app.vace import ControlUpload

NATIVE_FPS = 16  # Wan2.1 generates at 16 frames per second; `seconds` counts at this rate


class APIError(Exception):
    """An error response: `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def new_job_id() -> str:
    """Unguessable: 128 random bits."""
    return "video_" + secrets.token_hex(16)


@dataclass(frozen=True)
class VideoRequest:
    """A validated POST /v1/videos."""

    params: GenerationParams
    image: bytes | None
    subject: str
    fps: float
    model: str
    # face swap: the input video (+ mask) and the SDEdit options; None: text-to-video
    video: VideoUpload | None = None
    denoising_strength: float | None = None
    background_consistency: bool = False
    # VACE control (serve_app/vace.py): the control video (+ mask, + first frame) and its scale
    control: ControlUpload | None = None
    vace_scale: float | None = None

    def to_job_request(self) -> dict[str, Any]:
        p = self.params
        return {
            "prompt": p.prompt,
            "negative_prompt": p.negative_prompt,
            "width": p.width,
            "height": p.height,
            "num_frames": p.num_frames,
            "num_steps": p.num_steps,
            "guidance_scale": p.guidance_scale,
            "guidance_scale_low": p.guidance_scale_low,
            "shift": p.shift,
            "seed": p.seed,
            "cache": None if p.cache is None else {"kind": p.cache.kind, "threshold": p.cache.threshold},
            "fps": self.fps,
            "subject": self.subject,
            "has_reference": self.image is not None,
            "mode": "text_to_video" if self.video is None else "face_swap",
            "has_video": self.video is not None,
            "has_mask": self.video is not None and self.video.mask is not None,
            "denoising_strength": self.denoising_strength,
            "background_consistency": self.background_consistency,
            **(
                {}
                if self.control is None
                else {
                    "mode": "vace_control",
                    "has_control_video": True,
                    "has_control_mask": self.control.mask is not None,
                    "has_first_frame": self.control.first_frame is not None,
                    "vace_scale": self.vace_scale,
                }
            ),
        }


def params_from_job(request: dict[str, Any]) -> GenerationParams:
    names = ("prompt", "negative_prompt", "width", "height", "num_frames", "num_steps")
    return GenerationParams(
        **{k: request[k] for k in names},
        guidance_scale=request["guidance_scale"],
        guidance_scale_low=request.get("guidance_scale_low"),
        shift=request["shift"],
        seed=request["seed"],
        cache=StepCache(**request["cache"]) if request.get("cache") else None,
    )


# -- field parsing --------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")
_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w-]+=[^;,]*)*)(;base64)?,(.*)$", re.DOTALL)
_FIELDS = {
    "prompt",
    "model",
    "size",
    "seconds",
    "num_frames",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "guidance_scale_low",
    "negative_prompt",
    "fps",
    "subject",
    "shift",
    "input_reference",
    "input_video",
    "input_mask",
    "denoising_strength",
    "background_consistency",
    "control_video",
    "control_mask",
    "first_frame",
    "vace_scale",
    "cache",
}


def _int(fields: dict[str, Any], name: str, form: bool) -> int | None:
    v = fields.get(name)
    if v is None or v == "":
        return None
    if form or isinstance(v, str):
        try:
            return int(str(v).strip())
        except ValueError:
            raise APIError(400, f"{name} must be an integer, got {v!r}", param=name) from None
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"{name} must be an integer, got {v!r}", param=name)
    return v


def _float(fields: dict[str, Any], name: str, form: bool) -> float | None:
    v = fields.get(name)
    if v is None or v == "":
        return None
    if form or isinstance(v, str):
        try:
            out = float(str(v).strip())
        except ValueError:
            raise APIError(400, f"{name} must be a number, got {v!r}", param=name) from None
    elif isinstance(v, bool) or not isinstance(v, int | float):
        raise APIError(400, f"{name} must be a number, got {v!r}", param=name)
    else:
        out = float(v)
    if not math.isfinite(out):
        raise APIError(400, f"{name} must be a finite number, got {v!r}", param=name)
    return out


def _cache_option(fields: dict[str, Any], form: bool) -> StepCache | None:
    """`cache`: {"kind": "first_block", "threshold": 0.05} (multipart: that object as a JSON
    string) → a validated `StepCache`; absent or null: off. Bad shape 400, out of range 422."""
    v = fields.get("cache")
    if v is None or v == "":
        return None
    if form or isinstance(v, str):
        try:
            v = json.loads(str(v))
        except (json.JSONDecodeError, RecursionError):
            raise APIError(400, "cache must be a JSON object", param="cache") from None
    if v is None:
        return None
    if not isinstance(v, dict) or set(v) - {"kind", "threshold"}:
        raise APIError(400, 'cache must be {"kind": ..., "threshold": ...}', param="cache")
    kind, threshold = v.get("kind", "first_block"), v.get("threshold", StepCache.threshold)
    if not isinstance(kind, str) or isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise APIError(400, "cache kind must be a string and threshold a number", param="cache")
    cache = StepCache(kind, float(threshold))
    try:
        cache.validate()
    except InvalidRequestError as exc:
        raise APIError(422, str(exc), param="cache") from None
    return cache


def check_text(value: str, name: str) -> str:
    """Valid Unicode text: encodable as UTF-8 (no lone surrogates) and without NUL; else 400."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(
            400, f"{name} is not valid Unicode (lone surrogate)", param=name, code="invalid_string"
        ) from None
    if "\x00" in value:
        raise APIError(400, f"{name} contains a NUL character", param=name, code="invalid_string")
    return value


def _str(fields: dict[str, Any], name: str) -> str | None:
    v = fields.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise APIError(400, f"{name} must be a string", param=name)
    return check_text(v, name)


def decode_data_url(value: Any, max_bytes: int) -> bytes:
    """`{"image_url": "data:image/jpeg;base64,…"}` (or the bare string) → image bytes."""
    url = value.get("image_url") if isinstance(value, dict) else value
    if isinstance(url, dict):  # {"image_url": {"url": "data:…"}} as in chat messages
        url = url.get("url")
    if not isinstance(url, str):
        raise APIError(
            400,
            'input_reference must be a file upload (multipart) or {"image_url": "data:image/...;base64,..."}',
            param="input_reference",
        )
    m = _DATA_URL.match(url.strip())
    if m is None:
        raise APIError(
            400,
            "input_reference.image_url must be a data: URL; remote URLs are never fetched "
            "(upload the image as multipart/form-data instead)",
            param="input_reference",
            code="unsupported_url",
        )
    payload = m.group(4)
    if len(payload) * 3 // 4 > max_bytes:
        raise APIError(
            413,
            f"input_reference is larger than {max_bytes} bytes",
            param="input_reference",
            code="image_too_large",
        )
    if not m.group(3):
        raise APIError(400, "input_reference data URL must be base64-encoded", param="input_reference")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "input_reference is not valid base64", param="input_reference") from None


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
)


def sniff_image(data: bytes) -> str | None:
    """The format the bytes claim to be (JPEG, PNG, WEBP, AVIF), or None."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis", b"mif1", b"msf1"):
        return "AVIF"
    return None


def parse_video_request(
    fields: dict[str, Any],
    image: bytes | None,
    settings: ServeSettings,
    *,
    form: bool,
    video: VideoUpload | None = None,
    control: ControlUpload | None = None,
) -> VideoRequest:
    """Validate POST /v1/videos fields (multipart: strings; JSON: typed values). `video`: a face
    swap's uploads, already checked (`serve_app.face_swap.check_video_upload`)."""
    for name in fields:
        check_text(name, "field name")
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise APIError(400, f"unknown field(s): {', '.join(map(repr, unknown))}", param=unknown[0])
    preset = get_preset(settings.preset)

    prompt = _str(fields, "prompt")
    if prompt is None or not prompt.strip():
        raise APIError(400, "prompt is required", param="prompt", code="missing_required_parameter")
    if len(prompt) > settings.max_prompt_chars:
        raise APIError(
            422,
            f"prompt is {len(prompt)} characters, the limit is {settings.max_prompt_chars}",
            param="prompt",
        )
    negative = _str(fields, "negative_prompt")
    if negative is not None and len(negative) > settings.max_prompt_chars:
        raise APIError(
            422,
            f"negative_prompt is longer than {settings.max_prompt_chars} characters",
            param="negative_prompt",
        )

    model = _str(fields, "model") or settings.model_name
    if model != settings.model_name:
        raise APIError(
            404,
            f"model {model!r} is not served here; available: {settings.model_name}",
            param="model",
            code="model_not_found",
        )

    width, height = preset.width, preset.height
    size = _str(fields, "size")
    if size:
        m = _SIZE.match(size)
        if m is None:
            raise APIError(400, f"size must look like '832x480' (WIDTHxHEIGHT), got {size!r}", param="size")
        width, height = int(m.group(1)), int(m.group(2))
        if (
            width > settings.max_width
            or height > settings.max_height
            or width % 16
            or height % 16
            or min(width, height) < 16
        ):
            raise APIError(
                422,
                f"unsupported size {width}x{height}: sides must be multiples of 16, at least 16, "
                f"at most {settings.max_width}x{settings.max_height}",
                param="size",
                code="unsupported_size",
            )

    fps = _float(fields, "fps", form)
    fps = DEFAULT_FPS if fps is None else fps
    if not 0 < fps <= MAX_FPS:
        raise APIError(422, f"fps must be in (0, {MAX_FPS:g}], got {fps:g}", param="fps")

    frames = _int(fields, "num_frames", form)
    seconds = _float(fields, "seconds", form)
    if frames is not None and seconds is not None:
        raise APIError(400, "give seconds or num_frames, not both", param="seconds")
    if seconds is not None:
        if seconds <= 0:
            raise APIError(422, f"seconds must be positive, got {seconds:g}", param="seconds")
        frames = 4 * max(0, round(seconds * NATIVE_FPS / 4)) + 1
    frames = preset.num_frames if frames is None else frames
    if not 1 <= frames <= settings.max_frames or (frames - 1) % 4:
        param = "seconds" if seconds is not None else "num_frames"
        raise APIError(
            422,
            f"num_frames must be 4k+1 in [1, {settings.max_frames}] "
            f"(at most {(settings.max_frames - 1) / NATIVE_FPS:g} seconds), got {frames}",
            param=param,
            code="frames_out_of_range",
        )

    has_vace = preset.vace is not None and preset.experts is None  # two-expert models: no VACE
    vace_scale = _vace_options(fields, form, control, video is not None, has_vace)
    strength, consistency = _face_swap_options(fields, form, video is not None)
    if video is not None:
        width, height, frames, fps = _face_swap_shape(fields, image, video, settings)
    if control is not None:
        width, height, frames = _control_shape(fields, control, settings)

    steps = _int(fields, "num_inference_steps", form)
    steps = preset.num_steps if steps is None else steps
    if not 1 <= steps <= settings.max_steps:
        raise APIError(
            422,
            f"num_inference_steps must be in [1, {settings.max_steps}], got {steps}",
            param="num_inference_steps",
        )
    seed = _int(fields, "seed", form)
    seed = secrets.randbelow(2**31) if seed is None else seed
    guidance = _float(fields, "guidance_scale", form)
    guidance_low = _float(fields, "guidance_scale_low", form)
    if guidance_low is not None and preset.experts is None:
        raise APIError(
            422,
            f"guidance_scale_low applies to two-expert models (Wan2.2 A14B), not {preset.name}",
            param="guidance_scale_low",
        )
    shift = _float(fields, "shift", form)
    cache = _cache_option(fields, form)
    if cache is not None and control is not None:
        raise APIError(422, "step caching is not available with a control video (VACE)", param="cache")
    subject = _str(fields, "subject") or "face"
    if subject not in ("face", "object"):
        raise APIError(422, f"subject must be 'face' or 'object', got {subject!r}", param="subject")

    params = GenerationParams(
        prompt=prompt,
        negative_prompt=WAN_NEGATIVE_PROMPT if negative is None else negative,
        width=width,
        height=height,
        num_frames=frames,
        num_steps=steps,
        guidance_scale=5.0 if guidance is None else guidance,
        guidance_scale_low=guidance_low,
        shift=5.0 if shift is None else shift,
        seed=seed,
        cache=cache,
    )
    try:
        params.validate()
    except InvalidRequestError as exc:
        raise APIError(422, str(exc), param=_api_param(str(exc))) from None
    return VideoRequest(
        params=params,
        image=image,
        subject=subject,
        fps=fps,
        model=model,
        video=video,
        denoising_strength=strength,
        background_consistency=consistency,
        control=control,
        vace_scale=vace_scale,
    )


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")


def _face_swap_options(fields: dict[str, Any], form: bool, has_video: bool) -> tuple[float | None, bool]:
    """denoising_strength (in (0, 1], default 0.85) and background_consistency (a boolean; a
    string only in multipart, and only true/false/1/0/yes/no/on/off), given input_video."""
    strength = _float(fields, "denoising_strength", form)
    raw = fields.get("background_consistency")
    if raw is None or raw is False:
        consistency = False
    elif raw is True:
        consistency = True
    elif (form or isinstance(raw, str)) and str(raw).strip().lower() in _TRUE + _FALSE:
        consistency = str(raw).strip().lower() in _TRUE
    else:
        raise APIError(
            400, f"background_consistency must be true or false, got {raw!r}", param="background_consistency"
        )
    if not has_video:
        if strength is not None or consistency:
            name = "denoising_strength" if strength is not None else "background_consistency"
            raise APIError(400, f"{name} applies to face swap: send input_video too", param=name)
        return None, False
    if strength is None:
        strength = DEFAULT_DENOISING_STRENGTH
    if not 0 < strength <= 1:
        raise APIError(
            422, f"denoising_strength must be in (0, 1], got {strength:g}", param="denoising_strength"
        )
    return strength, consistency


def _face_swap_shape(
    fields: dict[str, Any], image: bytes | None, video: VideoUpload, settings: ServeSettings
) -> tuple[int, int, int, float]:
    """(width, height, num_frames, fps) of a face swap: the input video's, within the limits."""
    for name in ("size", "seconds", "num_frames", "fps"):
        if fields.get(name) not in (None, ""):
            raise APIError(
                400, f"{name}: with input_video the size, frame count and fps come from the video", param=name
            )
    if image is None:
        raise APIError(
            400,
            "input_video needs input_reference: the face to put into the video",
            param="input_reference",
            code="missing_required_parameter",
        )
    width, height, frames = video.width, video.height, video.num_frames
    if width > settings.max_width or height > settings.max_height:
        raise APIError(
            422,
            f"input_video is {width}x{height} after cropping to multiples of 16; this server generates "
            f"at most {settings.max_width}x{settings.max_height}",
            param="input_video",
            code="unsupported_size",
        )
    if frames > settings.max_frames:
        raise APIError(
            422,
            f"input_video gives {frames} frames (the largest 4k+1); this server generates at most "
            f"{settings.max_frames}",
            param="input_video",
            code="frames_out_of_range",
        )
    fps = video.header.fps or DEFAULT_FPS
    if not 0 < fps <= MAX_FPS:
        raise APIError(400, f"input_video: frame rate {fps:g} is not supported", param="input_video")
    return width, height, frames, fps


def _vace_options(
    fields: dict[str, Any], form: bool, control: ControlUpload | None, has_video: bool, has_vace: bool
) -> float | None:
    """vace_scale (in [0, 10], default 0.8) given control_video; None without one."""
    scale = _float(fields, "vace_scale", form)
    if control is None:
        if scale is not None:
            message = "vace_scale applies to VACE control: send control_video too"
            raise APIError(400, message, param="vace_scale")
        return None
    if has_video:
        message = "control_video and input_video (face swap) cannot be combined"
        raise APIError(400, message, param="control_video")
    if not has_vace:
        raise APIError(
            400, "this model has no VACE branch: control_video needs a VACE preset", param="control_video"
        )
    scale = DEFAULT_VACE_SCALE if scale is None else scale
    if not 0 <= scale <= MAX_VACE_SCALE:
        message = f"vace_scale must be in [0, {MAX_VACE_SCALE:g}], got {scale:g}"
        raise APIError(422, message, param="vace_scale")
    return scale


def _control_shape(
    fields: dict[str, Any], control: ControlUpload, settings: ServeSettings
) -> tuple[int, int, int]:
    """(width, height, num_frames) of a VACE request: the control video's, within the limits."""
    for name in ("size", "seconds", "num_frames"):
        if fields.get(name) not in (None, ""):
            raise APIError(
                400, f"{name}: with control_video the size and frame count come from the video", param=name
            )
    width, height, frames = control.width, control.height, control.num_frames
    if width > settings.max_width or height > settings.max_height:
        raise APIError(
            422,
            f"control_video is {width}x{height} after cropping to multiples of 16; this server generates "
            f"at most {settings.max_width}x{settings.max_height}",
            param="control_video",
            code="unsupported_size",
        )
    if frames > settings.max_frames:
        raise APIError(
            422,
            f"control_video gives {frames} frames (the largest 4k+1); this server generates at most "
            f"{settings.max_frames}",
            param="control_video",
            code="frames_out_of_range",
        )
    return width, height, frames


def _api_param(message: str) -> str | None:
    first = message.split(" ", 1)[0]
    return {
        "width": "size",
        "height": "size",
        "num_steps": "num_inference_steps",
        "guidance_scale": "guidance_scale",
        "guidance_scale_low": "guidance_scale_low",
        "seed": "seed",
        "shift": "shift",
        "num_frames": "num_frames",
        "prompt": "prompt",
        "negative_prompt": "negative_prompt",
    }.get(first)


def parse_json_body(body: bytes) -> dict[str, Any]:
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise APIError(400, "request body must be a JSON object")
    return fields


def video_object(job: Job, queue_position: int | None = None) -> dict[str, Any]:
    """The OpenAI video object (+ Stand-In extras)."""
    r = job.request
    out: dict[str, Any] = {
        "id": job.id,
        "object": "video",
        "model": job.model,
        "status": job.status,
        "progress": job.progress,
        "queue_position": queue_position if job.status == QUEUED else None,
        "created_at": job.created_at,
        "started_at": job.started_at,  # when the DiT replica started it (queue wait = started − created)
        "completed_at": job.completed_at,
        "expires_at": job.expires_at,
        "size": f"{r['width']}x{r['height']}",
        "seconds": f"{(r['num_frames'] - 1) / NATIVE_FPS:g}",
        "prompt": r["prompt"],
        "num_frames": r["num_frames"],
        "fps": r["fps"],
        "seed": r["seed"],
        "num_inference_steps": r["num_steps"],
        "guidance_scale": r["guidance_scale"],
        "guidance_scale_low": r.get("guidance_scale_low"),
        "shift": r["shift"],
        "cache": r.get("cache"),
        "loras": [
            {"name": d["name"], "scale": d["scale"], "expert": d.get("expert", "both")}
            for d in r.get("loras") or ()
        ],
        "subject": r["subject"],
        "has_reference": r["has_reference"],
        "mode": r.get("mode", "text_to_video"),
        "denoising_strength": r.get("denoising_strength"),
        "background_consistency": r.get("background_consistency", False),
        "has_mask": r.get("has_mask", False),
        "frames_sha256": job.frames_sha256,
        "error": None,
    }
    if job.error_code or job.error_message:
        out["error"] = {"code": job.error_code, "message": job.error_message}
    return out


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """`bytes=a-b` / `bytes=a-` / `bytes=-n` → inclusive (start, end); None: not satisfiable.
    Multiple ranges are answered with the first one."""
    m = re.match(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*(,.*)?$", header)
    if m is None or (m.group(1) == "" and m.group(2) == ""):
        return None
    if m.group(1) == "":
        n = int(m.group(2))
        if n == 0:
            return None
        return max(0, size - n), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


# -- the OpenAPI document's models ------------------------------------------------------------
# They describe the contract for clients and fuzzers; parse_video_request does the validating
# (multipart sends every field as a string, so its checks and messages are shared by both).

SIZE_PATTERN = r"^\s*\d{1,5}\s*[xX×]\s*\d{1,5}\s*$"


class ImageURL(BaseModel):
    image_url: str = Field(description="a data: URL (data:image/png;base64,…); remote URLs are refused")


class VideoURL(BaseModel):
    video_url: str = Field(description="a data: URL (data:video/mp4;base64,…); remote URLs are refused")


class _VideoFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="what happens in the video")
    model: str | None = Field(None, description="a model id from GET /v1/models")
    size: str | None = Field(None, pattern=SIZE_PATTERN, examples=["832x480"])
    negative_prompt: str | None = None
    subject: Literal["face", "object"] | None = Field(None, description="what the reference shows")


class CreateVideoJSON(_VideoFields):
    """POST /v1/videos as application/json."""

    seconds: float | str | None = Field(None, description="duration at 16 fps; or num_frames")
    num_frames: int | None = Field(None, description="4k+1 frames")
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_low: float | None = Field(
        None, description="two-expert models (Wan2.2 A14B): the low-noise expert's guidance (guidance_scale)"
    )
    shift: float | None = None
    fps: float | None = None
    loras: list[LoraField] | None = Field(None, description="style LoRAs by name (GET /v1/loras), stacked")
    cache: CacheField | None = Field(None, description="opt-in step caching (faster, approximate); null: off")
    input_reference: ImageURL | str | None = Field(None, description="the identity image as a data URL")
    input_video: VideoURL | str | None = Field(
        None, description="face swap: the video (MP4/MOV/MKV/WebM) as a data URL; remote URLs are refused"
    )
    input_mask: VideoURL | str | None = Field(None, description="face swap: a mask video (white = face)")
    control_video: VideoURL | str | None = Field(
        None, description="VACE: a control video (pose/depth/…) the output follows; size and frames are its"
    )
    control_mask: VideoURL | str | None = Field(
        None, description="VACE: a mask video for control_video (white = generate)"
    )
    first_frame: str | None = Field(None, description="VACE: a reference image as a data URL")
    vace_scale: float | None = Field(None, description="VACE: strength of the control in [0, 10] (0.8)")
    denoising_strength: float | None = Field(None, description="face swap: SDEdit strength in (0, 1]")
    background_consistency: bool | None = Field(
        None, description="face swap: keep the input outside the mask"
    )


class CreateVideoForm(_VideoFields):
    """POST /v1/videos as multipart/form-data (what the openai SDK and AIPerf send)."""

    seconds: str | None = None
    num_frames: str | None = None
    seed: str | None = None
    num_inference_steps: str | None = None
    guidance_scale: str | None = None
    guidance_scale_low: str | None = None
    shift: str | None = None
    fps: str | None = None
    loras: str | None = Field(
        None, description='style LoRAs as a JSON string: [{"name": "ghibli", "scale": 0.8}]'
    )
    cache: str | None = Field(
        None, description='opt-in step caching as a JSON string: {"kind": "first_block", "threshold": 0.05}'
    )
    input_reference: bytes | None = Field(
        None,
        description="the identity image file (JPEG, PNG, WebP, AVIF)",
        json_schema_extra={"format": "binary"},
    )
    input_video: bytes | None = Field(
        None,
        description="face swap: the video file (MP4/MOV/MKV/WebM)",
        json_schema_extra={"format": "binary"},
    )
    input_mask: bytes | None = Field(
        None,
        description="face swap: a mask video file (white = face)",
        json_schema_extra={"format": "binary"},
    )
    denoising_strength: str | None = None
    background_consistency: str | None = None
    control_video: bytes | None = Field(
        None,
        description="VACE: a control video file (pose/depth/…); size and frames are its",
        json_schema_extra={"format": "binary"},
    )
    control_mask: bytes | None = Field(
        None,
        description="VACE: a mask video file for control_video (white = generate)",
        json_schema_extra={"format": "binary"},
    )
    first_frame: bytes | None = Field(
        None, description="VACE: a reference image file", json_schema_extra={"format": "binary"}
    )
    vace_scale: str | None = None


class CacheField(BaseModel):
    """Opt-in step caching (standin/step_cache.py): skip most of a step's DiT blocks while the first
    block's residual moved less than `threshold` (relative L1) since the last full step."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal[CACHE_KINDS] = Field("first_block", description="the caching method")  # type: ignore[valid-type]
    threshold: float = Field(0.05, ge=0, le=MAX_THRESHOLD, description="0 never skips; larger skips more")


class LoraField(BaseModel):
    """One style LoRA of a request (serve_app/loras.py validates; multipart: the list as JSON)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="a name from GET /v1/loras")
    scale: float = Field(1.0, description="strength = scale × alpha / rank; |scale| ≤ max_lora_scale")
    expert: Literal["both", "high", "low"] = Field(
        "both",
        description="two-expert models (Wan2.2 A14B): the expert this style applies to; a style's "
        "high/low pair is two entries",
    )


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class VideoError(BaseModel):
    code: str | None
    message: str | None


class Video(BaseModel):
    """The video object (202 from POST, 200 from GET)."""

    id: str
    object: Literal["video"]
    model: str
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"]
    progress: int
    queue_position: int | None = Field(description="1 = next to start; set while queued")
    created_at: int
    started_at: int | None
    completed_at: int | None
    expires_at: int | None
    size: str
    seconds: str
    prompt: str
    num_frames: int
    fps: float
    seed: int
    num_inference_steps: int
    guidance_scale: float
    guidance_scale_low: float | None = Field(
        None, description="two-expert models: the low-noise expert's guidance (null: guidance_scale)"
    )
    shift: float = Field(description="the flow-matching schedule's shift")
    cache: CacheField | None = Field(None, description="the request's step caching (null: off)")
    loras: list[LoraField] = Field(description="the style LoRAs applied, with their scales")
    subject: str
    has_reference: bool
    mode: Literal["text_to_video", "face_swap", "vace_control"] = Field(
        description="face_swap: the input video with the reference's face (size, frames, fps are its); "
        "vace_control: follows the control video (size and frames are its)"
    )
    denoising_strength: float | None = Field(description="face swap: where SDEdit started")
    background_consistency: bool
    has_mask: bool = Field(description="face swap: the client's mask video was used")
    frames_sha256: str | None
    error: VideoError | None


class VideoList(BaseModel):
    object: Literal["list"]
    data: list[Video]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"]
    deleted: bool


OPENAPI_MODELS = (
    CreateVideoJSON,
    CreateVideoForm,
    ImageURL,
    VideoURL,
    ErrorResponse,
    ErrorDetail,
    Video,
    VideoError,
)
