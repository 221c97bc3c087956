"""Every operational knob of the application, from serve_config.yaml `args` and the environment.

Precedence: environment variable `STANDIN_<NAME>` (upper case) > the application's `args` in
serve_config.yaml > the defaults below. API keys come only from the environment
(`STANDIN_API_KEYS`, comma-separated) so that secrets never sit in a config file.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path.home() / ".cache" / "standin-serve"


@dataclass(frozen=True)
class ServeSettings:
    # the model
    preset: str = "tiny"
    model_name: str = ""  # the `model` id clients see; default: the preset name
    checkpoint_dir: str | None = None
    standin_checkpoint: str | None = None
    device: str | None = None  # None: cuda when present, else cpu
    dtype: str | None = None  # float32 | bfloat16 | float16; None: bf16 on GPU, fp32 on CPU
    # the DiT replica: ranks = sp_degree × cfg_degree (one placement group bundle each)
    sp_degree: int = 1
    cfg_degree: int = 1
    dist_backend: str = ""  # "": nccl on GPU, gloo on CPU
    collective_timeout_s: float = 120.0
    worker_num_cpus: float = 0.4
    worker_num_gpus: float = 0.0
    # face preprocessing
    face_backend: str = "offline"
    face_model_dir: str | None = None
    parser_weights: str | None = None
    max_upload_bytes: int = 20 * 1024 * 1024
    prompt_cache_size: int = 64
    identity_cache_size: int = 64
    # request limits (beyond GenerationParams.validate's own)
    max_width: int = 1280
    max_height: int = 1280
    max_frames: int = 129
    max_steps: int = 100
    max_prompt_chars: int = 4000
    # jobs and results
    state_dir: str = str(DEFAULT_STATE_DIR)
    job_store: str = "sqlite"  # sqlite: one node (db_path) | redis: ingress replicas on many nodes
    db_path: str = ""  # "": <state_dir>/jobs.sqlite
    # redis://[:password@]host:6379/0; with a password, set it from a secret via STANDIN_REDIS_URL
    redis_url: str = field(default="", repr=False)
    redis_key_prefix: str = "standin:"  # apps sharing one Redis need distinct prefixes
    results_url: str = ""  # "": <state_dir>/results; or any fsspec URL (s3://bucket/prefix)
    result_ttl_s: float = 24 * 3600.0
    max_active_jobs: int = 64  # queued + in progress; beyond → 429
    retry_after_s: int = 10
    max_attempts: int = 3
    retry_backoff_s: float = 1.0
    lease_s: float = 30.0
    job_timeout_s: float = 3600.0
    api_keys: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_args(
        cls, args: dict[str, Any] | None = None, env: dict[str, str] | None = None
    ) -> ServeSettings:
        """Build from config args, then environment overrides; unknown args are an error."""
        args = dict(args or {})
        env = os.environ if env is None else env
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown serve_app args {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for name, f in known.items():
            raw = env.get(f"STANDIN_{name.upper()}")
            if raw is not None:
                values[name] = _parse(f, raw)
            elif name in args and name != "api_keys":
                values[name] = args[name]
        settings = cls(**values)
        if not settings.model_name:
            settings = dataclasses.replace(settings, model_name=settings.preset)
        return settings

    @property
    def world_size(self) -> int:
        return self.sp_degree * self.cfg_degree

    @property
    def job_db(self) -> Path:
        return Path(self.db_path) if self.db_path else Path(self.state_dir) / "jobs.sqlite"

    @property
    def results_location(self) -> str:
        return self.results_url or str(Path(self.state_dir) / "results")


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = str(f.type)
    if f.name == "api_keys":
        return tuple(k.strip() for k in raw.split(",") if k.strip())
    if kind.startswith("int"):
        return int(raw)
    if kind.startswith("float"):
        return float(raw)
    if raw == "" and "None" in kind:
        return None
    return raw
