"""Style LoRAs: community LoRA files loaded as small objects and applied per request, unmerged.

A `StyleLoRA` is built from one `.safetensors` file and never touches the model's weights. A
request's `StyleSet` (a list of (style, user scale)) is passed to the DiT forward as its
`adapters`, and the forward calls `StyleSet.linear(name, x, y)` after every base linear layer
(blocks, text/time embeddings, head); it returns

    y + Σ_styles  s · (alpha / rank) · (x · Aᵀ) · Bᵀ  +  s · x · diffᵀ  +  s · diff_b

(A = `lora_down` / `lora_A` [rank, in], B = `lora_up` / `lora_B` [out, rank], s = the user's
scale), i.e. exactly the output of the merged weight `W + s·(alpha/rank)·B·A + s·diff` and bias
`b + s·diff_b`, without writing it. So one shared model serves any number of styles to
concurrent requests, several styles stack, and a scale of 0 is the base model bit for bit.

**Scale convention.** The strength of a style is `user scale × alpha / rank` (kohya, ComfyUI,
diffusers; `alpha` is the file's per-layer `.alpha` key, and without one alpha = rank). The
official Stand-In script (`infer_with_lora.py`) ignores the file's alpha and its own
`--lora_scale` and merges `W += up @ down`: both agree when alpha equals the rank and the scale is 1.

**Formats** (detected per file; keys may carry a `diffusion_model.`, `transformer.` or PEFT
`base_model.model.` prefix):

- ``kohya``: `lora_unet_<layer with _ for .>.lora_down.weight` / `.lora_up.weight` / `.alpha`
  (kohya, musubi-tuner);
- ``ab``: official Wan2.1 names with `.lora_A.weight` / `.lora_B.weight` (or `.lora_down` /
  `.lora_up`, as ComfyUI and lightx2v write them), optional `.alpha`;
- ``peft``: a PEFT state dict (`base_model.model.` prefix, adapter names such as
  `.lora_A.default.weight`; one adapter per file);
- ``diffusers``: `WanTransformer3DModel` names (`blocks.N.attn1.to_q`, `attn1.to_out.0`,
  `attn2.*`, `ffn.net.0.proj`, `ffn.net.2`, `norm2` = our `norm3`), mapped to ours
  (`blocks.N.self_attn.q`, `self_attn.o`, `cross_attn.*`, `ffn.0`, `ffn.2`); `lora_B.bias` is a
  bias delta;
- in any of them, `.diff` (full weight delta) and `.diff_b` (bias delta) keys.

**Refused**, with a `StyleLoRAError` naming the file and the reason: pickled files (`.ckpt`,
`.pt`, `.pth`, `.bin`, … — a downloaded style is never unpickled), anything that is not a
safetensors file, files over the size limit, keys that match no layer of the model (listed),
layers whose shapes do not fit the model, LoRA variants we do not implement (DoRA, LoHa, LoKr),
non-finite values, and non-zero deltas on layers the unmerged forward cannot reach (norms,
modulation, patch embedding; listed). All-zero deltas there (lightx2v's distillation LoRAs
carry zero norm `diff`s) are ignored and named in `StyleLoRA.ignored`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from standin.checkpoints import DIFFUSERS_BLOCK_NAMES, DIFFUSERS_TOP_NAMES
from standin.config import DiTConfig
from standin.errors import StandInError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "LayerDelta",
    "StyleLoRA",
    "StyleLoRAError",
    "StyleSet",
    "load_lora_args",
    "merged_state_dict",
    "parse_lora_arg",
    "pinned_model",
    "style_targets",
]

# A rank-128 LoRA on every linear layer of Wan2.1-14B is ≈1.2 GB in bf16 (2.4 GB in fp32).
DEFAULT_MAX_BYTES = 4 * 2**30
# Suffixes of pickle-based formats: refused without being opened by any unpickler.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# safetensors: 8-byte little-endian header length, then a JSON header starting with "{".
_MAX_HEADER_BYTES = 100 * 2**20
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
# Key pieces of LoRA variants this module does not implement (named in the error).
_UNSUPPORTED = {
    "lora_magnitude_vector": "DoRA",
    "dora_scale": "DoRA",
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "lora_mid": "LoCon with a mid weight",
}
_DIFFUSERS_MARKERS = (
    ".attn1.",
    ".attn2.",
    ".ffn.net.",
    "condition_embedder.",
    "proj_out",
    "scale_shift_table",
)


class StyleLoRAError(StandInError, ValueError):
    """A style LoRA file is refused: it names the file and the reason."""


# -- what a style may target -------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One layer (or bare parameter) of the model: its weight shape and bias shape (if any)."""

    weight: tuple[int, ...]
    bias: tuple[int, ...] | None
    applicable: bool  # whether the unmerged forward can apply a delta here


def style_targets(model: nn.Module | DiTConfig) -> dict[str, Target]:
    """Every layer of the DiT a style file may name, by our (official Wan2.1) name.

    Built on the meta device from a config (no memory). Stand-In's identity LoRA
    (`*_loras.*`) is not a target.
    """
    if isinstance(model, DiTConfig):
        from standin.dit import WanDiT

        with torch.device("meta"):
            model = WanDiT(model)
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, p in model.named_parameters():
        if "_loras." in name:
            continue
        module, leaf = name.rsplit(".", 1)
        if leaf not in ("weight", "bias"):
            module, leaf = name, "weight"  # a bare parameter (modulation): its own target
        shapes.setdefault(module, {})[leaf] = tuple(p.shape)
    # The forward calls `StyleSet.linear` after every base linear layer: those are adaptable.
    applicable = {
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) and "_loras" not in name
    }
    return {
        name: Target(s["weight"], s.get("bias"), name in applicable)
        for name, s in shapes.items()
        if "weight" in s
    }


# -- one layer's delta ---------------------------------------------------------------------


@dataclass(frozen=True)
class LayerDelta:
    """A style's change to one linear layer (weight [out, in], bias [out]).

    down [rank, in] and up [out, rank] (both or neither), scaled by `scale` = alpha / rank;
    diff [out, in] a full weight delta; diff_b [out] a bias delta. Any may be absent.
    """

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    scale: float = 1.0
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return 0 if self.down is None else self.down.shape[0]

    def apply(self, x: torch.Tensor, y: torch.Tensor, strength: float) -> torch.Tensor:
        """y [..., out] (the base layer's output for x [..., in]) plus this delta, in x's dtype.

        The low-rank product's last GEMM accumulates into y (addmm), so a LoRA costs two thin
        matrix products and no extra pass over the output.
        """
        x2, out = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        if self.down is not None and self.up is not None:
            h = F.linear(x2, self.down.to(x.device, x.dtype))
            out = torch.addmm(out, h, self.up.to(x.device, x.dtype).t(), alpha=strength * self.scale)
        if self.diff is not None:
            out = torch.addmm(out, x2, self.diff.to(x.device, x.dtype).t(), alpha=strength)
        if self.diff_b is not None:
            out = torch.add(out, self.diff_b.to(x.device, out.dtype), alpha=strength)
        return out.reshape(y.shape)

    def weight_delta(self, strength: float) -> torch.Tensor | None:
        """The merged weight's change [out, in] (float32), or None."""
        delta = None
        if self.down is not None and self.up is not None:
            delta = (self.up.float() @ self.down.float()) * (strength * self.scale)
        if self.diff is not None:
            d = self.diff.float() * strength
            delta = d if delta is None else delta + d
        return delta

    def bias_delta(self, strength: float) -> torch.Tensor | None:
        return None if self.diff_b is None else self.diff_b.float() * strength

    def tensors(self) -> Iterable[torch.Tensor]:
        return (t for t in (self.down, self.up, self.diff, self.diff_b) if t is not None)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LayerDelta:
        def conv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return replace(
            self, down=conv(self.down), up=conv(self.up), diff=conv(self.diff), diff_b=conv(self.diff_b)
        )


# -- the file ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StyleLoRA:
    """A loaded style: per-layer deltas by our layer name, plus what `describe` reports."""

    name: str
    format: str
    layers: dict[str, LayerDelta]
    bytes: int = 0
    sha256: str = ""
    source: str = ""
    ignored: tuple[str, ...] = ()  # all-zero deltas on layers the unmerged forward cannot reach
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The largest rank of its low-rank layers (0 for a file of full deltas only)."""
        return max((d.rank for d in self.layers.values()), default=0)

    @property
    def parameters(self) -> int:
        return sum(t.numel() for d in self.layers.values() for t in d.tensors())

    def describe(self) -> dict[str, Any]:
        """What `GET /v1/loras` lists: name, format, rank, layers, bytes, sha256 (+ details)."""
        alphas = sorted({round(d.scale * d.rank, 6) for d in self.layers.values() if d.rank})
        kinds: dict[str, int] = {}
        for name in self.layers:
            kind = name.split(".")[2] if name.startswith("blocks.") else name
            kinds[kind] = kinds.get(kind, 0) + 1
        return {
            "name": self.name,
            "format": self.format,
            "rank": self.rank,
            "alpha": alphas[0] if len(alphas) == 1 else alphas,
            "layers": len(self.layers),
            "layer_kinds": kinds,
            "has_full_deltas": any(d.diff is not None or d.diff_b is not None for d in self.layers.values()),
            "parameters": self.parameters,
            "bytes": self.bytes,
            "sha256": self.sha256,
        }

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StyleLoRA:
        """A copy with every tensor on `device` in `dtype` (the model's, to avoid per-call casts)."""
        return replace(self, layers={k: d.to(device, dtype) for k, d in self.layers.items()})

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module | DiTConfig | Mapping[str, Target],
        *,
        name: str | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> StyleLoRA:
        """Read and validate a style file against `model` (a WanDiT, its config, or its targets).

        dtype: convert every tensor (None keeps the file's). Raises `StyleLoRAError`.
        """
        path = Path(path)
        targets = model if isinstance(model, Mapping) else style_targets(model)
        size = _check_file(path, max_bytes)
        tensors, metadata, digest = _read_safetensors(path)
        fmt, layers, ignored = parse_state_dict(tensors, targets, source=path.name)
        style = cls(
            name=name or path.stem,
            format=fmt,
            layers=layers,
            bytes=size,
            sha256=digest,
            source=str(path),
            ignored=tuple(ignored),
            metadata=metadata,
        )
        if dtype is not None or str(device) != "cpu":
            style = style.to(device, dtype)
        log.info(
            "style %s: %s, %d layers, rank %d, %.1f MB", style.name, fmt, len(layers), style.rank, size / 1e6
        )
        return style


def _check_file(path: Path, max_bytes: int) -> int:
    """Refuse pickles, missing files and files over the limit; returns the size in bytes."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise StyleLoRAError(
            f"{path.name}: {path.suffix} files are Python pickles, which can run code when loaded; "
            "style LoRAs are only read from .safetensors (convert it where you trust it)"
        )
    if not path.is_file():
        raise StyleLoRAError(f"{path}: no such file")
    size = path.stat().st_size
    if size > max_bytes:
        raise StyleLoRAError(
            f"{path.name}: {size / 2**20:.0f} MiB is over the limit of {max_bytes / 2**20:.0f} MiB"
        )
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) == 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len <= min(size - 8, _MAX_HEADER_BYTES) and head[8:9] == b"{":
            return size
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):
        raise StyleLoRAError(
            f"{path.name}: this is a torch pickle (zip or pickle stream), not safetensors; refused"
        )
    raise StyleLoRAError(f"{path.name}: not a safetensors file (bad header)")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """All tensors (CPU, file dtype), the header metadata and the file's sha256."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(8 * 2**20), b""):
            digest.update(chunk)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a Mapping
    except Exception as e:  # safetensors raises its own error types
        raise StyleLoRAError(f"{path.name}: cannot read as safetensors: {e}") from e
    return tensors, metadata, digest.hexdigest()


# -- key names → our layers -------------------------------------------------------------------

_ROLE_SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "diff_b"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
)


def _split_role(key: str) -> tuple[str, str, str | None] | None:
    """'x.lora_A.default.weight' → ('x', 'down', 'default'); None when not a LoRA key."""
    parts = key.split(".")
    # PEFT: <layer>.lora_A.<adapter>.weight
    if len(parts) >= 4 and parts[-3] in ("lora_A", "lora_B") and parts[-1] in ("weight", "bias"):
        role = {"lora_A": "down", "lora_B": "up"}[parts[-3]]
        if parts[-1] == "bias":
            role = "diff_b" if role == "up" else "bad"
        return ".".join(parts[:-3]), role, parts[-2]
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role, None
    return None


def _strip_prefixes(layer: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if layer.startswith(prefix):
                layer, changed = layer[len(prefix) :], True
    return layer


def _diffusers_to_ours(layer: str) -> str | None:
    parts = layer.split(".")
    if parts[0] == "blocks" and len(parts) > 2:
        ours = DIFFUSERS_BLOCK_NAMES.get(".".join(parts[2:]))
        return f"blocks.{parts[1]}.{ours}" if ours else None
    return DIFFUSERS_TOP_NAMES.get(layer)


def _kohya_table(targets: Mapping[str, Target]) -> dict[str, str]:
    """'blocks_0_self_attn_q' (and diffusers spellings like 'blocks_0_attn1_to_q') → our name."""
    table = {name.replace(".", "_"): name for name in targets}
    for name in targets:
        parts = name.split(".")
        if parts[0] == "blocks":
            rest = ".".join(parts[2:])
            for theirs, ours in DIFFUSERS_BLOCK_NAMES.items():
                if ours == rest:
                    table.setdefault(f"blocks_{parts[1]}_{theirs.replace('.', '_')}", name)
    for theirs, ours in DIFFUSERS_TOP_NAMES.items():
        if ours in targets:
            table.setdefault(theirs.replace(".", "_"), ours)
    return table


def _list(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" … ({len(names)} in all)" if len(names) > limit else "")


def parse_state_dict(
    tensors: Mapping[str, torch.Tensor], targets: Mapping[str, Target], source: str = "state dict"
) -> tuple[str, dict[str, LayerDelta], list[str]]:
    """Recognise the format and map every key to one of `targets`.

    Returns (format, deltas by our layer name, ignored layers: all-zero deltas on layers the
    unmerged forward does not reach, such as the norms of lightx2v's distillation LoRAs).
    """
    if not tensors:
        raise StyleLoRAError(f"{source}: holds no tensors")
    for key in tensors:
        for piece, variant in _UNSUPPORTED.items():
            if piece in key:
                raise StyleLoRAError(f"{source}: {variant} files are not supported (key {key})")
    kohya = any(k.startswith(_KOHYA_PREFIXES) for k in tensors)
    peft = any(k.startswith("base_model.model.") for k in tensors)
    diffusers = any(m in k for k in tensors for m in _DIFFUSERS_MARKERS)
    kohya_names = _kohya_table(targets) if kohya else {}

    # key → (our layer, role)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    adapters: set[str] = set()
    for key, tensor in tensors.items():
        split = _split_role(key)
        if split is None or split[1] == "bad":
            unknown.append(key)
            continue
        layer, role, adapter = split
        if adapter is not None:
            adapters.add(adapter)
        if layer.startswith(_KOHYA_PREFIXES):
            stem = layer.split("_", 2)[2]
            ours = kohya_names.get(stem)
        else:
            layer = _strip_prefixes(layer)
            ours = _diffusers_to_ours(layer) if diffusers else layer
        if ours is None or ours not in targets:
            unknown.append(key)
            continue
        slot = parts.setdefault(ours, {})
        if role in slot:
            raise StyleLoRAError(f"{source}: two keys give the {role} of layer {ours} (one is {key})")
        slot[role] = tensor
    if unknown:
        raise StyleLoRAError(
            f"{source}: {len(unknown)} keys match no layer of the model: {_list(sorted(unknown))}"
        )
    if len(adapters) > 1:
        raise StyleLoRAError(
            f"{source}: holds several PEFT adapters ({', '.join(sorted(adapters))}); save one"
        )

    layers: dict[str, LayerDelta] = {}
    ignored: list[str] = []
    unreachable: list[str] = []
    for ours in sorted(parts, key=_layer_order):
        delta = _layer_delta(ours, parts[ours], targets[ours], source)
        if not targets[ours].applicable:
            if all(not bool(t.any()) for t in delta.tensors()):
                ignored.append(ours)
                continue
            unreachable.append(ours)
            continue
        layers[ours] = delta
    if unreachable:
        raise StyleLoRAError(
            f"{source}: changes layers the unmerged forward does not adapt (only linear layers): "
            f"{_list(unreachable)}"
        )
    if not layers:
        raise StyleLoRAError(f"{source}: changes no layer (every delta is zero)")
    fmt = "kohya" if kohya else "peft" if peft else "diffusers" if diffusers else "ab"
    if ignored:
        log.debug("%s: ignoring all-zero deltas on %s", source, _list(ignored))
    return fmt, layers, ignored


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]) if parts[0] == "blocks" else -1, name)


def _layer_delta(name: str, slot: dict[str, torch.Tensor], target: Target, source: str) -> LayerDelta:
    """Validate one layer's tensors against its target shape."""
    for role, t in slot.items():
        if not t.is_floating_point():
            raise StyleLoRAError(f"{source}: {name} {role} has dtype {t.dtype}, expected a float tensor")
        if not bool(torch.isfinite(t).all()):
            raise StyleLoRAError(f"{source}: {name} {role} holds NaN or infinite values")
    down, up, alpha = slot.get("down"), slot.get("up"), slot.get("alpha")
    if (down is None) != (up is None):
        raise StyleLoRAError(
            f"{source}: {name} has {'lora_down/A' if up is None else 'lora_up/B'} without its pair"
        )
    if alpha is not None and down is None:
        raise StyleLoRAError(f"{source}: {name} has an alpha but no lora_down/lora_up")
    scale = 1.0
    if down is not None and up is not None:
        if len(target.weight) != 2:
            raise StyleLoRAError(
                f"{source}: {name} is not a linear layer (weight {target.weight}); low-rank deltas need one"
            )
        out_f, in_f = target.weight
        if (
            down.ndim != 2
            or up.ndim != 2
            or down.shape[1] != in_f
            or up.shape[0] != out_f
            or up.shape[1] != down.shape[0]
        ):
            raise StyleLoRAError(
                f"{source}: {name} has lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)}; "
                f"the model's layer is [{out_f}, {in_f}] (expected down [r, {in_f}], up [{out_f}, r])"
            )
        rank = down.shape[0]
        if alpha is not None:
            if alpha.numel() != 1:
                raise StyleLoRAError(
                    f"{source}: {name} alpha has shape {tuple(alpha.shape)}, expected a scalar"
                )
            scale = float(alpha.float().item()) / rank
    diff, diff_b = slot.get("diff"), slot.get("diff_b")
    if diff is not None and tuple(diff.shape) != target.weight:
        raise StyleLoRAError(
            f"{source}: {name} diff has shape {tuple(diff.shape)}, the model's weight is {target.weight}"
        )
    if diff_b is not None:
        if target.bias is None:
            raise StyleLoRAError(f"{source}: {name} has a diff_b but the layer has no bias")
        if tuple(diff_b.shape) != target.bias:
            raise StyleLoRAError(
                f"{source}: {name} diff_b has shape {tuple(diff_b.shape)}, the model's bias is {target.bias}"
            )
    if not math.isfinite(scale):
        raise StyleLoRAError(f"{source}: {name} alpha is not finite")
    return LayerDelta(down, up, scale, diff, diff_b)


# -- a request's styles ----------------------------------------------------------------------


class StyleSet:
    """The styles of one request: (style, user scale) pairs, applied unmerged in the forward.

    Implements the DiT's `LinearAdapters` seam (standin/forward_plan.py): `linear(name, x, y)` is
    called after every base linear layer and returns y plus every style's delta for that layer.
    Holds no state between calls, so one StyleSet may serve both CFG passes, the identity cache
    and every sequence-parallel rank (each applies it to its own tokens). Styles should already
    be on the model's device and dtype (`StyleLoRA.to`, once per loaded file): otherwise every
    call converts them again.
    """

    def __init__(self, styles: Iterable[tuple[StyleLoRA, float]] = ()) -> None:
        self.styles: tuple[tuple[StyleLoRA, float], ...] = tuple(
            (style, float(scale)) for style, scale in styles
        )
        for style, scale in self.styles:
            if not math.isfinite(scale):
                raise StyleLoRAError(f"style {style.name}: scale must be a finite number, got {scale}")
        self._by_layer: dict[str, list[tuple[LayerDelta, float]]] = {}
        for style, scale in self.styles:
            if scale == 0.0:
                continue  # exactly the base model: skip the layer's work altogether
            for layer, delta in style.layers.items():
                self._by_layer.setdefault(layer, []).append((delta, scale))

    def __bool__(self) -> bool:
        return bool(self._by_layer)

    def __repr__(self) -> str:
        return "StyleSet(" + ", ".join(f"{s.name}:{k:g}" for s, k in self.styles) + ")"

    @property
    def layers(self) -> set[str]:
        return set(self._by_layer)

    def linear(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Layer `name`'s output y [..., out] for input x [..., in], plus the styles' deltas."""
        for delta, scale in self._by_layer.get(name, ()):
            y = delta.apply(x, y, scale)
        return y

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StyleSet:
        """The same set with every style converted (do it once per loaded style, not per request)."""
        return StyleSet((style.to(device, dtype), scale) for style, scale in self.styles)


def merged_state_dict(model: nn.Module, styles: StyleSet) -> dict[str, torch.Tensor]:
    """The model's weights with `styles` merged in (float32 arithmetic, the weights' dtype),
    for exactly the layers the styles change (the rest of the state dict is not copied)."""
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for layer, entries in styles._by_layer.items():
        w = params[f"{layer}.weight"]
        weight = w.detach().float().clone()
        bias = params.get(f"{layer}.bias")
        bias_f = bias.detach().float().clone() if bias is not None else None
        for delta, scale in entries:
            dw = delta.weight_delta(scale)
            if dw is not None:
                weight += dw.to(weight.device)
            db = delta.bias_delta(scale)
            if db is not None and bias_f is not None:
                bias_f += db.to(bias_f.device)
        out[f"{layer}.weight"] = weight.to(w.dtype)
        if bias is not None and bias_f is not None:
            out[f"{layer}.bias"] = bias_f.to(bias.dtype)
    return out


def pinned_model(model: nn.Module, styles: StyleSet) -> nn.Module:
    """A private copy of `model` with `styles` merged into its weights ("pinned" mode).

    For a replica dedicated to one style set: no per-call cost at all, at the price of a second
    copy of the weights the styles change. Exact to float rounding in fp32 (the merged product
    is formed in float32, then cast to the weights' dtype).
    """
    import copy

    pinned = copy.deepcopy(model)
    merged = merged_state_dict(model, styles)
    with torch.no_grad():
        params = dict(pinned.named_parameters())
        for key, value in merged.items():
            params[key].copy_(value)
    return pinned


# -- the command line ----------------------------------------------------------------------


def parse_lora_arg(value: str) -> tuple[Path, float]:
    """`PATH[:SCALE]` → (path, scale); the scale defaults to 1 and may be negative or 0.

    Only a suffix that parses as a number is a scale, so paths with colons still work.
    """
    path, sep, tail = value.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            return Path(value), 1.0
        if not math.isfinite(scale):
            raise StyleLoRAError(f"--lora {value}: the scale must be a finite number")
        return Path(path), scale
    return Path(value), 1.0


def load_lora_args(
    values: Sequence[str], model: nn.Module | DiTConfig, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> StyleSet:
    """Every `--lora PATH[:SCALE]` of a command line → the request's StyleSet.

    Given a model, the styles are converted to its device and dtype; given a config they stay
    on the CPU in the file's dtype (check the files before loading a model, convert after).
    """
    styles = []
    param = next(model.parameters()) if isinstance(model, nn.Module) else None
    targets = style_targets(model)
    for value in values:
        path, scale = parse_lora_arg(value)
        style = StyleLoRA.load(path, targets, max_bytes=max_bytes)
        if param is not None:
            style = style.to(param.device, param.dtype)
        styles.append((style, scale))
    return StyleSet(styles)
