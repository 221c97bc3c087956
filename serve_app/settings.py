"""Every operational knob of the application, from serve_config.yaml `args` and the environment.

Precedence: environment variable `STANDIN_<NAME>` (upper case) > the application's `args` in
serve_config.yaml > the defaults below. API keys come only from the environment
(`STANDIN_API_KEYS`, comma-separated) so that secrets never sit in a config file.

Validated with pydantic: types, ranges and the cross-field rules below fail at start-up with a
`SettingsError` that names the key (`standin serve` checks the whole config before it deploys):
- `job_store: redis` needs `redis_url`;
- more than one Ingress or JobRunner replica (the config's `deployments`) needs a shared store
  (`job_store: redis`): each replica would otherwise see its own SQLite file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from standin.attention import CHOICES as ATTENTION_CHOICES

DEFAULT_STATE_DIR = Path.home() / ".cache" / "standin-serve"

# Deployments that read and write jobs: more than one replica of either needs a shared store.
JOB_DEPLOYMENTS = ("Ingress", "JobRunner")


class SettingsError(ValueError):
    """A setting is missing, mistyped or out of range; the message names the key."""


class ServeSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    # the model
    preset: str = "tiny"
    model_name: str = ""  # the `model` id clients see; default: the preset name
    checkpoint_dir: str | None = None
    standin_checkpoint: str | None = None
    # two-expert presets (wan2.2-t2v-a14b, tiny-a14b): the low-noise expert's Stand-In file
    # (default: in checkpoint_dir; standin_checkpoint is then the high-noise expert's) and where
    # the experts live: both on every rank's GPU, or the idle one in pinned host memory
    # (standin/experts.py; which fits where: cluster/README.md, "Wan2.2 A14B")
    standin_low_checkpoint: str | None = None
    expert_residency: Literal["resident", "offload"] = "resident"
    device: str | None = None  # None: cuda when present, else cpu
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # None: bf16 on GPU, fp32 on CPU
    # the DiT replica: ranks = sp_degree × cfg_degree (one placement group bundle each)
    sp_degree: int = Field(1, ge=1, le=64)
    cfg_degree: Literal[1, 2] = 1
    dist_backend: Literal["", "nccl", "gloo"] = ""  # "": nccl on GPU, gloo on CPU
    collective_timeout_s: float = Field(120.0, gt=0)
    worker_num_cpus: float = Field(0.4, ge=0)
    worker_num_gpus: float = Field(0.0, ge=0)
    # speed levers of the DiT replica (README, "Performance"): the attention kernel ("auto": the
    # fastest available, standin/attention/), regional torch.compile of the DiT blocks, whether
    # every collective is gated by an agreement (a failing rank is reported at the next
    # collective) or only every phase/step (fewer host round trips; a rank dying mid-step then
    # ends in the collective timeout), a warm-up request at replica start, and where the VAE
    # decode runs: the Decoder deployment (one process) or every rank of the DiT replica
    attention_backend: str = "auto"
    compile_blocks: bool = False
    agreement: Literal["per_collective", "per_step"] = "per_collective"
    warmup: bool = True
    decode_on: Literal["decoder", "dit"] = "decoder"
    # face preprocessing
    face_backend: Literal["offline", "insightface"] = "offline"
    face_model_dir: str | None = None
    parser_weights: str | None = None
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    prompt_cache_size: int = Field(64, ge=0)
    identity_cache_size: int = Field(64, ge=0)
    # request limits (beyond GenerationParams.validate's own)
    max_width: int = Field(1280, ge=16)
    max_height: int = Field(1280, ge=16)
    max_frames: int = Field(129, ge=1)
    max_steps: int = Field(100, ge=1)
    max_prompt_chars: int = Field(4000, ge=1)
    # face swap: uploaded videos (standin.video_input.VideoLimits; the generated size and frame
    # count must also fit max_width/max_height/max_frames)
    max_video_bytes: int = Field(100 * 1024 * 1024, ge=1024)
    max_video_seconds: float = Field(30.0, gt=0)
    max_video_frames: int = Field(241, ge=1)
    max_video_pixels_per_frame: int = Field(1280 * 720, ge=256)
    max_video_total_pixels: int = Field(1280 * 720 * 121, ge=256)
    # style LoRAs (serve_app/loras.py): the .safetensors files clients name ("" = none; a local
    # directory or an fsspec URL such as s3://bucket/loras), what one request may ask, and each
    # DiT rank's cache of loaded LoRAs (least recently used first out)
    lora_dir: str = ""
    max_lora_file_bytes: int = Field(4 * 2**30, ge=1024)
    max_loras_per_request: int = Field(4, ge=1, le=16)
    max_lora_scale: float = Field(4.0, gt=0)
    lora_cache_count: int = Field(8, ge=1)
    lora_cache_bytes: int = Field(8 * 2**30, ge=1024)
    # jobs and results
    state_dir: str = str(DEFAULT_STATE_DIR)
    job_store: Literal["sqlite", "redis"] = "sqlite"  # sqlite: one node | redis: shared by nodes
    db_path: str = ""  # "": <state_dir>/jobs.sqlite
    # redis://[:password@]host:6379/0; with a password, set it from a secret via STANDIN_REDIS_URL
    redis_url: str = Field("", repr=False)
    redis_key_prefix: str = Field("standin:", min_length=1)  # apps sharing one Redis: distinct prefixes
    results_url: str = ""  # "": <state_dir>/results; or any fsspec URL (s3://bucket/prefix)
    result_ttl_s: float = Field(24 * 3600.0, gt=0)
    max_active_jobs: int = Field(64, ge=1)  # queued + in progress; beyond → 429
    runner_max_jobs: int = Field(64, ge=1)  # jobs one JobRunner replica drives at once
    retry_after_s: int = Field(10, ge=1)
    max_attempts: int = Field(3, ge=1)
    retry_backoff_s: float = Field(1.0, ge=0)
    lease_s: float = Field(30.0, gt=0)
    job_timeout_s: float = Field(3600.0, gt=0)
    sse_keepalive_s: float = Field(15.0, gt=0)  # SSE comment lines while nothing changes
    api_keys: tuple[str, ...] = Field((), repr=False)

    @field_validator("attention_backend")
    @classmethod
    def _known_attention_backend(cls, name: str) -> str:
        # whether its package is installed is checked where it runs: on every DiT rank at start
        if name not in ATTENTION_CHOICES:
            raise ValueError(f"must be one of {', '.join(ATTENTION_CHOICES)}")
        return name

    @model_validator(mode="after")
    def _cross_field_rules(self, info: ValidationInfo) -> ServeSettings:
        if self.job_store == "redis" and not self.redis_url:
            raise ValueError(
                "redis_url: job_store is redis but redis_url is empty "
                "(set it, or STANDIN_REDIS_URL, e.g. redis://host:6379/0)"
            )
        replicas = (info.context or {}).get("replicas", {})
        for name in JOB_DEPLOYMENTS:
            if replicas.get(name, 1) > 1 and self.job_store != "redis":
                raise ValueError(
                    f"job_store: {replicas[name]} {name} replicas need a shared job store "
                    f"(job_store: redis), not {self.job_store!r}"
                )
        return self

    @classmethod
    def from_args(
        cls,
        args: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        replicas: dict[str, int] | None = None,
    ) -> ServeSettings:
        """Build from config args, then environment overrides. `replicas` ({deployment: the most
        replicas it may run}) enables the shared-store rule. Raises SettingsError naming the key."""
        args = dict(args or {})
        env = os.environ if env is None else env
        known = cls.model_fields
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise SettingsError(f"unknown serve_app args {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {k: v for k, v in args.items() if k != "api_keys"}
        for name in known:
            raw = env.get(f"STANDIN_{name.upper()}")
            if raw is not None:
                values[name] = _from_env(name, raw)
        try:
            settings = cls.model_validate(values, context={"replicas": replicas or {}})
        except ValidationError as exc:
            raise SettingsError(_describe(exc)) from None
        if not settings.model_name:
            settings = settings.model_copy(update={"model_name": settings.preset})
        return settings

    def replace(self, **changes: Any) -> ServeSettings:
        """A validated copy with `changes`."""
        return ServeSettings.model_validate({**self.model_dump(), **changes})

    @property
    def world_size(self) -> int:
        return self.sp_degree * self.cfg_degree

    @property
    def job_db(self) -> Path:
        return Path(self.db_path) if self.db_path else Path(self.state_dir) / "jobs.sqlite"

    @property
    def results_location(self) -> str:
        return self.results_url or str(Path(self.state_dir) / "results")


def _from_env(name: str, raw: str) -> Any:
    if name == "api_keys":
        return tuple(k.strip() for k in raw.split(",") if k.strip())
    annotation = str(ServeSettings.model_fields[name].annotation)
    if raw == "" and "None" in annotation:
        return None
    return raw  # pydantic converts (and checks) "4" → 4, "2.5" → 2.5


def _describe(exc: ValidationError) -> str:
    """One line per problem, each starting with the key: `sp_degree: Input should be …`."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        lines.append(message if not key else f"{key}: {message} (got {err.get('input')!r})")
    return "invalid serve_app settings: " + "; ".join(lines)


def replicas_of(deployments: list[dict[str, Any]]) -> dict[str, int]:
    """{deployment name: the most replicas it may run} from a Serve config's `deployments`."""
    out = {}
    for d in deployments or []:
        auto = d.get("autoscaling_config") or {}
        n = auto.get("max_replicas") if auto else d.get("num_replicas", 1)
        out[d.get("name", "")] = int(n) if isinstance(n, int | float) else 1
    return out
