"""Style LoRAs in the server: the library clients name them from, request validation, and the
bounded cache of loaded LoRAs on every DiT rank.

- `LoraLibrary`: the `.safetensors` files of `lora_dir` (a local directory or any fsspec URL,
  e.g. `s3://bucket/loras`; remote files are copied once to `<state_dir>/lora-cache`). A file
  `ghibli.safetensors` is the LoRA `ghibli`. `describe(name)` reads and validates the file
  against the served model (`standin.styles.StyleLoRA.load`) and caches the result per file
  version (size, mtime/etag): the Ingress uses it for `GET /v1/loras` and to refuse a request
  before a job exists (unknown name → 404, a pickle or a bad file → 422 with the reason).
- `parse_loras`: the `loras` field (`[{"name": "ghibli", "scale": 0.8}]` in JSON, the same list
  as a JSON string in a multipart form) → `StyleRef`s; names are safe characters only (no path
  separators, no `..`), scales finite and within `max_lora_scale`, at most
  `max_loras_per_request`, no name twice.
- `StyleCache` / `ReplicaStyles`: each DiT rank keeps recently used LoRAs loaded, on its
  device in the model's dtype, least recently used first out when over `lora_cache_count` files
  or `lora_cache_bytes` bytes (a style in use by the running request stays alive until it ends).
  `ReplicaStyles` is the rank's `parallel.styles.StyleResolver`: request header names + scales →
  a `StyleSet`, checking each file's sha256 against the one the Ingress accepted.
- `style_set_id`: the Ray Serve multiplexed model id of a request's LoRA set (a stable hash of
  the sorted names and file hashes; scales do not change what is loaded), so Serve routes a
  request to a replica that already holds its set (serve_app/dit.py).
- `LoraMetrics`: `standin_lora_loads`, `standin_lora_cache_hits`, `standin_lora_evictions`,
  `standin_lora_load_seconds`, tagged with the model and the rank.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from parallel.styles import STYLE_EXPERTS, StyleRef
from serve_app.api import APIError
from serve_app.settings import ServeSettings
from standin.config import DiTConfig
from standin.errors import StandInError
from standin.presets import get_preset
from standin.styles import PICKLE_SUFFIXES, StyleLoRA, StyleLoRAError, StyleSet, Target, style_targets

log = logging.getLogger(__name__)

__all__ = [
    "MAX_STYLE_SETS_PER_REPLICA",
    "LoraLibrary",
    "LoraMetrics",
    "LoraNotFoundError",
    "ReplicaStyles",
    "StyleCache",
    "check_lora_name",
    "parse_loras",
    "refs_from_job",
    "refs_to_job",
    "style_set_id",
]

SUFFIX = ".safetensors"
# Ray Serve's multiplexing bookkeeping per replica (which LoRA sets it advertises); the memory
# bound is each rank's StyleCache (lora_cache_count / lora_cache_bytes).
MAX_STYLE_SETS_PER_REPLICA = 32
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LORA_FIELDS = {"name", "scale", "expert"}


class LoraNotFoundError(StandInError, LookupError):
    """No LoRA of that name in lora_dir."""


def check_lora_name(name: Any) -> str:
    """A LoRA name: 1-64 of A-Z a-z 0-9 _ . - , starting with a letter or digit, no `..`."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        shown = repr(name)[:80]
        raise APIError(
            400,
            f"loras: name {shown} is not a LoRA name (1-64 characters of A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit)",
            param="loras",
            code="invalid_lora_name",
        )
    return name


def parse_loras(raw: Any, settings: ServeSettings, *, form: bool) -> tuple[StyleRef, ...]:
    """The request's `loras` field → StyleRefs (sha256 not yet known). Raises APIError."""
    if raw is None or raw == "":
        return ()
    if form or isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (TypeError, ValueError, RecursionError):
            raise APIError(
                400,
                'loras must be a JSON list like [{"name": "ghibli", "scale": 0.8}]',
                param="loras",
            ) from None
    if not isinstance(raw, list):
        raise APIError(400, 'loras must be a list like [{"name": "ghibli", "scale": 0.8}]', param="loras")
    if not raw:
        return ()
    if not settings.lora_dir:
        raise APIError(
            400, "this server serves no style LoRAs (no lora_dir)", param="loras", code="loras_disabled"
        )
    if len(raw) > settings.max_loras_per_request:
        raise APIError(
            422,
            f"loras: {len(raw)} given, at most {settings.max_loras_per_request} per request",
            param="loras",
            code="too_many_loras",
        )
    refs: list[StyleRef] = []
    for item in raw:
        if not isinstance(item, dict):
            raise APIError(400, 'each lora must be an object {"name": ..., "scale": ...}', param="loras")
        extra = sorted(str(k)[:40] for k in set(item) - _LORA_FIELDS)
        if extra:
            raise APIError(400, f"loras: unknown field(s) {extra}", param="loras")
        name = check_lora_name(item.get("name"))
        scale = _finite(item.get("scale", 1.0))
        if scale is None:
            raise APIError(400, f"loras: scale of {name} must be a finite number", param="loras")
        if abs(scale) > settings.max_lora_scale:
            raise APIError(
                422,
                f"loras: scale of {name} is {scale:g}, allowed [-{settings.max_lora_scale:g}, "
                f"{settings.max_lora_scale:g}]",
                param="loras",
                code="lora_scale_out_of_range",
            )
        expert = item.get("expert", "both")
        if expert not in STYLE_EXPERTS:
            choices = list(STYLE_EXPERTS)
            raise APIError(400, f"loras: expert of {name} must be one of {choices}", param="loras")
        if expert != "both" and get_preset(settings.preset).experts is None:
            raise APIError(
                422,
                f"loras: expert {expert!r} applies to two-expert models (Wan2.2 A14B), not {settings.preset}",
                param="loras",
                code="lora_expert_unsupported",
            )
        if any(r.name == name and r.expert == expert for r in refs):
            raise APIError(400, f"loras: {name} is given twice", param="loras")
        refs.append(StyleRef(name, float(scale), expert=expert))
    return tuple(refs)


def _finite(value: Any) -> float | None:
    """A JSON number as a finite float (None: not a number, infinite, NaN or too large)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        out = float(value)
    except OverflowError:
        return None
    return out if math.isfinite(out) else None


def refs_to_job(refs: Sequence[StyleRef]) -> list[dict[str, Any]]:
    """What the job row stores (and the video object shows)."""
    return [{"name": r.name, "scale": r.scale, "sha256": r.sha256, "expert": r.expert} for r in refs]


def refs_from_job(request: dict[str, Any]) -> tuple[StyleRef, ...]:
    return tuple(
        StyleRef(d["name"], float(d["scale"]), d.get("sha256", ""), d.get("expert", "both"))
        for d in request.get("loras") or ()
    )


def style_set_id(refs: Sequence[StyleRef]) -> str:
    """The multiplexed model id of a LoRA set: order and scales do not matter ("" = no LoRA)."""
    if not refs:
        return ""
    key = json.dumps(sorted((r.name, r.sha256) for r in refs), separators=(",", ":"))
    return "loras-" + hashlib.sha256(key.encode()).hexdigest()[:32]


# -- the library ------------------------------------------------------------------------------


class LoraLibrary:
    """The LoRA files of `location` (a directory or an fsspec URL), validated for one model."""

    def __init__(
        self,
        location: str,
        model: DiTConfig | dict[str, Target],
        *,
        max_bytes: int,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.location = location
        self.max_bytes = max_bytes
        self.targets = model if isinstance(model, dict) else style_targets(model)
        self._fs = None
        if "://" in location and not location.startswith("file://"):
            import fsspec  # only object storage needs it

            self._fs, self._root = fsspec.core.url_to_fs(location)
            self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "standin-serve" / "lora-cache")
        else:
            self._root = location.removeprefix("file://")
            self.cache_dir = Path(self._root)
        self._described: dict[tuple[str, str], dict[str, Any] | str] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, settings: ServeSettings) -> LoraLibrary | None:
        """The Ingress's library (validated against the served preset's DiT); None without lora_dir."""
        if not settings.lora_dir:
            return None
        return cls(
            settings.lora_dir,
            get_preset(settings.preset).dit,
            max_bytes=settings.max_lora_file_bytes,
            cache_dir=Path(settings.state_dir) / "lora-cache",
        )

    async def check_field(self, raw: Any, settings: ServeSettings, *, form: bool) -> tuple[StyleRef, ...]:
        """The Ingress's whole check of the `loras` field (parsing, then each file, off the loop)."""
        refs = parse_loras(raw, settings, form=form)
        return await asyncio.to_thread(self.check, refs) if refs else ()

    # files

    def _entries(self) -> dict[str, dict[str, Any]]:
        """{file name: {"size", "version"}} of the candidate files (safetensors and pickles)."""
        out: dict[str, dict[str, Any]] = {}
        if self._fs is not None:
            for info in self._fs.ls(self._root, detail=True):
                if info.get("type") == "directory":
                    continue
                name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
                version = (
                    info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
                )
                out[name] = {"size": int(info.get("size") or 0), "version": f"{info.get('size')}:{version}"}
        else:
            root = Path(self._root)
            if not root.is_dir():
                log.warning("lora_dir %s is not a directory: no LoRAs", self.location)
                return {}
            for path in root.iterdir():
                if path.is_file():
                    st = path.stat()
                    out[path.name] = {"size": st.st_size, "version": f"{st.st_size}:{st.st_mtime_ns}"}
        return {n: e for n, e in out.items() if n.lower().endswith((SUFFIX, *PICKLE_SUFFIXES))}

    @staticmethod
    def _name_of(filename: str) -> str:
        return filename.rsplit(".", 1)[0]

    def _file_of(self, name: str, entries: dict[str, dict[str, Any]]) -> str:
        if name + SUFFIX in entries:
            return name + SUFFIX
        for filename in sorted(entries):  # a pickle of that name: found, and refused when loaded
            if self._name_of(filename) == name:
                return filename
        raise LoraNotFoundError(f"no LoRA named {name!r}")

    def _local(self, filename: str, entry: dict[str, Any]) -> Path:
        """The file on this machine (a remote file is copied once per version)."""
        if self._fs is None:
            return Path(self._root) / filename
        if entry["size"] > self.max_bytes:  # refused by the size check without a download
            return Path(self._root) / filename
        tag = hashlib.sha256(f"{self.location}/{filename}:{entry['version']}".encode()).hexdigest()[:16]
        local = self.cache_dir / tag / filename
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f"{local.name}.tmp-{os.getpid()}-{threading.get_ident()}")  # ranks share it
            self._fs.get_file(f"{self._root.rstrip('/')}/{filename}", str(tmp))
            tmp.replace(local)
        return local

    # what clients see

    def names(self) -> list[str]:
        return sorted({self._name_of(f) for f in self._entries()})

    def describe(self, name: str) -> dict[str, Any]:
        """`StyleLoRA.describe()` of the named file (cached per file version). Raises
        LoraNotFoundError, or StyleLoRAError with the reason the file is refused."""
        entries = self._entries()
        filename = self._file_of(name, entries)
        key = (filename, entries[filename]["version"])
        with self._lock:
            known = self._described.get(key)
        if known is None:
            try:
                style = self._load(name, filename, entries[filename])
                known = {**style.describe(), "file": filename}
            except StyleLoRAError as exc:
                known = str(exc)
            with self._lock:
                self._described[key] = known
        if isinstance(known, str):
            raise StyleLoRAError(known)
        return dict(known)

    def listing(self) -> dict[str, Any]:
        """GET /v1/loras: usable LoRAs (`data`) and files that are refused, with the reason."""
        data, unusable = [], []
        try:
            names = self.names()
        except OSError as exc:
            raise _unavailable(exc) from None
        for name in names:
            if not _NAME.match(name) or ".." in name:
                unusable.append({"name": name[:80], "error": "the file name is not a valid LoRA name"})
                continue
            try:
                data.append({"object": "lora", **self.describe(name)})
            except (StyleLoRAError, LoraNotFoundError) as exc:
                unusable.append({"name": name, "error": str(exc)})
            except OSError as exc:
                raise _unavailable(exc) from None
        return {"object": "list", "data": data, "unusable": unusable}

    def check(self, refs: Sequence[StyleRef]) -> tuple[StyleRef, ...]:
        """The Ingress's check: each named LoRA exists and loads → refs with their sha256.
        Raises APIError (404 unknown, 422 refused file)."""
        out = []
        for ref in refs:
            try:
                info = self.describe(ref.name)
            except LoraNotFoundError:
                raise APIError(
                    404,
                    f"no LoRA named {ref.name!r} (GET /v1/loras lists them)",
                    param="loras",
                    code="lora_not_found",
                ) from None
            except StyleLoRAError as exc:
                raise APIError(
                    422, f"LoRA {ref.name!r} is refused: {exc}", param="loras", code="invalid_lora"
                ) from None
            except OSError as exc:
                raise _unavailable(exc) from None
            out.append(StyleRef(ref.name, ref.scale, info["sha256"], ref.expert))
        return tuple(out)

    def load(
        self, name: str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> StyleLoRA:
        entries = self._entries()
        filename = self._file_of(name, entries)
        return self._load(name, filename, entries[filename], dtype=dtype, device=device)

    def _load(
        self,
        name: str,
        filename: str,
        entry: dict[str, Any],
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> StyleLoRA:
        if entry["size"] > self.max_bytes:
            raise StyleLoRAError(
                f"{filename}: {entry['size'] / 2**20:.0f} MiB is over the limit of "
                f"{self.max_bytes / 2**20:.0f} MiB"
            )
        path = self._local(filename, entry)
        return StyleLoRA.load(
            path, self.targets, name=name, max_bytes=self.max_bytes, dtype=dtype, device=device
        )


def _unavailable(exc: OSError) -> APIError:
    """lora_dir cannot be read (storage down, permissions): 503, details only in the log."""
    log.warning("lora_dir unreadable: %s", exc)
    return APIError(
        503,
        "the style LoRA directory cannot be read right now; retry later",
        type="server_error",
        code="lora_dir_unavailable",
        headers={"Retry-After": "10"},
    )


# -- one rank's loaded LoRAs --------------------------------------------------------------------


def style_nbytes(style: StyleLoRA) -> int:
    """Memory the loaded style holds (its tensors, as converted)."""
    return sum(t.numel() * t.element_size() for d in style.layers.values() for t in d.tensors())


class StyleCache:
    """Loaded styles by (name, sha256), least recently used first out, bounded by the number of
    styles and their bytes. Thread-safe. `observer` (e.g. `LoraMetrics`) hears of loads, hits,
    evictions."""

    def __init__(self, max_count: int, max_bytes: int, observer: Any = None) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.observer = observer
        self._items: OrderedDict[tuple[str, str], tuple[StyleLoRA, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = self.hits = self.evictions = 0
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._items

    def order(self) -> list[tuple[str, str]]:
        """Oldest first."""
        with self._lock:
            return list(self._items)

    def get(self, key: tuple[str, str], load: Callable[[], StyleLoRA]) -> StyleLoRA:
        """The cached style, or `load()` it (outside the lock: other keys stay usable) and keep it."""
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                self.hits += 1
                self._tell("hit")
                return found[0]
        start = time.perf_counter()
        style = load()
        seconds = time.perf_counter() - start
        size = style_nbytes(style)
        with self._lock:
            self.loads += 1
            self._tell("loaded", seconds)
            if key in self._items:  # loaded twice at once: keep one
                self._items.move_to_end(key)
                return self._items[key][0]
            if size > self.max_bytes:
                log.warning("style %s (%d bytes) is larger than the whole cache: not kept", key[0], size)
                return style
            self._items[key] = (style, size)
            self.bytes += size
            while len(self._items) > self.max_count or self.bytes > self.max_bytes:
                old, (_, old_size) = self._items.popitem(last=False)
                self.bytes -= old_size
                self.evictions += 1
                self._tell("evicted")
                log.info("style cache: evicted %s", old[0])
        return style

    def _tell(self, event: str, *args: float) -> None:
        if self.observer is not None:
            try:
                getattr(self.observer, event)(*args)
            except Exception:  # metrics must never fail a request
                log.debug("style cache observer failed", exc_info=True)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "loaded": [name for name, _ in self._items],
                "count": len(self._items),
                "bytes": self.bytes,
                "loads": self.loads,
                "hits": self.hits,
                "evictions": self.evictions,
            }


class ReplicaStyles:
    """One rank's `StyleResolver`: StyleRefs → a StyleSet of cached styles (model device/dtype)."""

    def __init__(
        self,
        library: LoraLibrary,
        cache: StyleCache,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.library = library
        self.cache = cache
        self.dtype = dtype
        self.device = device

    def __call__(self, refs: Sequence[StyleRef]) -> StyleSet:
        styles = []
        for ref in refs:
            check_name = _NAME.match(ref.name) and ".." not in ref.name
            if not check_name:
                raise StyleLoRAError(f"{ref.name!r} is not a LoRA name")

            def load(ref: StyleRef = ref) -> StyleLoRA:
                style = self.library.load(ref.name, dtype=self.dtype, device=self.device)
                if ref.sha256 and style.sha256 != ref.sha256:
                    raise StyleLoRAError(
                        f"LoRA {ref.name} changed since the request was accepted "
                        f"(sha256 {style.sha256[:12]}…, expected {ref.sha256[:12]}…)"
                    )
                return style

            styles.append((self.cache.get((ref.name, ref.sha256), load), ref.scale))
        return StyleSet(styles)

    @classmethod
    def for_rank(
        cls, settings: ServeSettings, model: torch.nn.Module, rank: int, metrics: bool = True
    ) -> ReplicaStyles | None:
        """The rank's resolver (None when the server has no lora_dir)."""
        if not settings.lora_dir:
            return None
        param = next(model.parameters())
        library = LoraLibrary(
            settings.lora_dir,
            style_targets(model),
            max_bytes=settings.max_lora_file_bytes,
            cache_dir=Path(settings.state_dir) / "lora-cache",
        )
        observer = LoraMetrics(settings.model_name or settings.preset, rank) if metrics else None
        cache = StyleCache(settings.lora_cache_count, settings.lora_cache_bytes, observer)
        return cls(library, cache, dtype=param.dtype, device=param.device)


class LoraMetrics:
    """The style cache's counters through Ray's metrics agent (Ray adds `ray_` and `_total`)."""

    def __init__(self, model: str, rank: int) -> None:
        from ray.util.metrics import Counter, Histogram

        self.tags = {"model": model, "rank": str(rank)}
        keys = ("model", "rank")
        self._loads = Counter("standin_lora_loads", "style LoRA files loaded into a rank", tag_keys=keys)
        self._hits = Counter("standin_lora_cache_hits", "style LoRAs found loaded", tag_keys=keys)
        self._evictions = Counter("standin_lora_evictions", "style LoRAs dropped (LRU)", tag_keys=keys)
        self._load_time = Histogram(
            "standin_lora_load_seconds",
            "reading and validating one style LoRA",
            boundaries=[0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60],
            tag_keys=keys,
        )

    def loaded(self, seconds: float) -> None:
        self._loads.inc(1, tags=self.tags)
        self._load_time.observe(seconds, tags=self.tags)

    def hit(self) -> None:
        self._hits.inc(1, tags=self.tags)

    def evicted(self) -> None:
        self._evictions.inc(1, tags=self.tags)


# -- the OpenAPI document's models -------------------------------------------------------------


class LoraObject(BaseModel):
    """One usable LoRA of GET /v1/loras (`StyleLoRA.describe()`)."""

    object: Literal["lora"]
    name: str = Field(description='what a request names in "loras": [{"name": ..., "scale": ...}]')
    format: str = Field(description="kohya | ab | peft | diffusers")
    rank: int = Field(description="the largest rank of its low-rank layers (0: full deltas only)")
    alpha: float | list[float] = Field(description="the file's alpha(s); strength = scale × alpha / rank")
    layers: int
    layer_kinds: dict[str, int]
    has_full_deltas: bool
    parameters: int
    bytes: int
    sha256: str
    file: str


class UnusableLora(BaseModel):
    name: str
    error: str = Field(description="why the file is refused (a pickle, not safetensors, keys, shapes…)")


class LoraList(BaseModel):
    object: Literal["list"]
    data: list[LoraObject]
    unusable: list[UnusableLora]
