"""Wan2.1-VACE: control-video hints added to the Stand-In DiT through its `after_block` seam.

The VACE branch is a second stack of Wan blocks over a 96-channel context (VAE latents of the
control video's inactive and reactive parts, 16 + 16 channels, plus its mask folded into 64
channels; standin/vace_conditioning.py builds it). Parameter names are the official
Wan2.1-VACE keys (`vace_patch_embedding.*`, `vace_blocks.{j}.*` with `before_proj` on block 0
and `after_proj` on every block), so the released files load unchanged.

One forward (the official `forward_vace`, computed lazily here):

    c₀ = before_proj(vace_patch_embedding(vace_context)) + x₀      x₀: video tokens before any block
    c_j = VaceBlock_j(c_{j-1})                                     same t_mod, text and video RoPE
    hint_j = after_proj(c_j)
    after DiT block layers[j]:  x ← x + vace_scale · hint_j

VACE blocks are `DiTBlock`s (attention, RoPE and modulation are the DiT's own code) with the
two projections around them. They never see the identity: their self-attention gets no
identity K/V, exactly as the official Stand-In runs VACE on the video tokens only.

Hints are computed per DiT call (both CFG passes), by a hook made for that call: the module
holds weights only. `VaceHints` advances the VACE stack one block each time the DiT reaches a
hinted layer, so at most one context stream `c` is alive (not one hint per layer). Under
sequence parallelism the context tokens are sharded by the very sharding the forward uses, and
each rank's hints stay on that rank.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from standin.checkpoints import check_file, load_strict, read_safetensors, read_torch_pickle, shard_files
from standin.config import DiTConfig
from standin.dit import DiTBlock, IdentityCache, Rope, WanDiT, keeps_float32
from standin.errors import CheckpointError, InvalidRequestError
from standin.forward_plan import LOCAL, ForwardPlan, LinearAdapters, SkipRest, TokenSharding, VideoAttention
from standin.rope import video_positions

__all__ = [
    "TINY_VACE",
    "TINY_VACE_WEIGHTS",
    "WAN21_1_3B_VACE",
    "WAN21_14B_VACE",
    "VaceBlock",
    "VaceBranch",
    "VaceConfig",
    "VaceHints",
    "VaceInputs",
    "check_vace_scale",
    "load_tiny_vace",
    "load_vace_branch",
    "load_vace_dit",
    "save_tiny_vace",
    "vace_call",
]

log = logging.getLogger(__name__)

DEFAULT_VACE_SCALE = 0.8  # the official default (0.5 is suggested with a face reference)
MAX_VACE_SCALE = 10.0


@dataclass(frozen=True)
class VaceConfig:
    """Which DiT blocks receive a hint (`layers`, ascending, starting at 0) and the context channels."""

    layers: tuple[int, ...]
    in_dim: int = 96

    def __post_init__(self) -> None:
        if not self.layers or self.layers[0] != 0 or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"vace layers must be ascending, distinct and start at 0, got {self.layers}")

    def check(self, dit: DiTConfig) -> None:
        if self.layers[-1] >= dit.num_layers:
            raise ValueError(f"vace layer {self.layers[-1]} does not exist in a {dit.num_layers}-layer DiT")


# Official Wan2.1-VACE configurations; tiny: a hint after each of its two blocks.
WAN21_14B_VACE = VaceConfig(layers=tuple(range(0, 40, 5)))  # 0, 5, …, 35
WAN21_1_3B_VACE = VaceConfig(layers=tuple(range(0, 30, 2)))  # 0, 2, …, 28
TINY_VACE = VaceConfig(layers=(0, 1))


class VaceBlock(DiTBlock):
    """A Wan block of the VACE stack (`vace_blocks.{j}`): `before_proj` (block 0 only), the
    DiT block itself, and `after_proj`, which emits the hint. No identity LoRA."""

    def __init__(self, cfg: DiTConfig, index: int) -> None:
        super().__init__(replace(cfg, lora_rank=0), f"vace_blocks.{index}")
        if index == 0:
            self.before_proj = nn.Linear(cfg.dim, cfg.dim)
        self.after_proj = nn.Linear(cfg.dim, cfg.dim)

    def hint(
        self,
        c: torch.Tensor,
        x0: torch.Tensor | None,
        t_mod: torch.Tensor,
        context: torch.Tensor,
        rope: Rope,
        video_attention: VideoAttention,
        adapters: LinearAdapters | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context stream c [B, S, C] float32 → (next c, hint) both [B, S, C] float32.

        Block 0 first mixes in the video tokens x0 [B, S, C] (before any DiT block):
        c = before_proj(c) + x0. The self-attention gets no identity K/V.
        """
        if hasattr(self, "before_proj"):
            if x0 is None:
                raise ValueError("VACE block 0 needs the video tokens x0")
            w = self.before_proj.weight
            c = self.before_proj(c.to(w.dtype)).float() + x0
        c = self.forward(c, t_mod, context, rope, None, video_attention, adapters)
        w = self.after_proj.weight
        return c, self.after_proj(c.to(w.dtype)).float()


class VaceBranch(nn.Module):
    """`vace_patch_embedding` + `vace_blocks`: weights only, no request state."""

    def __init__(self, dit: DiTConfig, config: VaceConfig) -> None:
        super().__init__()
        config.check(dit)
        self.config = config
        self.dit_config = dit
        self.vace_blocks = nn.ModuleList(VaceBlock(dit, j) for j in range(len(config.layers)))
        self.vace_patch_embedding = nn.Conv3d(
            config.in_dim, dit.dim, kernel_size=dit.patch_size, stride=dit.patch_size
        )
        # DiT block index → VACE block index
        self.hinted = {layer: j for j, layer in enumerate(config.layers)}

    def patchify(self, vace_context: torch.Tensor) -> torch.Tensor:
        """[B, in_dim, F, H, W] → tokens [B, S, C] float32, (frame, row, column) order."""
        w = self.vace_patch_embedding.weight
        return self.vace_patch_embedding(vace_context.to(w.dtype)).flatten(2).transpose(1, 2).float()


@dataclass(frozen=True)
class VaceInputs:
    """One request's VACE conditioning: context [1 or B, in_dim, F', H', W'] and its scale."""

    context: torch.Tensor
    scale: float = DEFAULT_VACE_SCALE

    def validate(self, branch_in_dim: int, latent_shape: tuple[int, ...] | torch.Size) -> None:
        """Raise `InvalidRequestError` unless the context fits latents of `latent_shape`."""
        c = self.context
        if not isinstance(c, torch.Tensor) or c.ndim != 5 or c.shape[1] != branch_in_dim:
            shape = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            raise InvalidRequestError(f"vace context must be [B, {branch_in_dim}, F, H, W], got {shape}")
        b = latent_shape[0]
        if tuple(c.shape[2:]) != tuple(latent_shape[2:]) or c.shape[0] not in (1, b):
            raise InvalidRequestError(
                f"vace context {tuple(c.shape)} does not match the latents {tuple(latent_shape)}"
            )
        check_vace_scale(self.scale)


def check_vace_scale(scale: object) -> None:
    """Raise `InvalidRequestError` unless `scale` is a number in [0, MAX_VACE_SCALE]."""
    s = scale
    if isinstance(s, bool) or not isinstance(s, int | float) or not (0 <= s <= MAX_VACE_SCALE):
        raise InvalidRequestError(f"vace_scale must be a number in [0, {MAX_VACE_SCALE:g}], got {s!r}")


class _RememberedSharding:
    """Wraps a plan's sharding factory and keeps the `TokenSharding` the forward made."""

    def __init__(self, factory: Callable[[int], TokenSharding]) -> None:
        self.factory = factory
        self.current: TokenSharding | None = None

    def __call__(self, num_tokens: int) -> TokenSharding:
        self.current = self.factory(num_tokens)
        return self.current

    @property
    def head_range(self) -> tuple[int, int] | None:
        return self.factory.head_range  # type: ignore[attr-defined]


class VaceHints:
    """The `after_block` hook of ONE DiT call: adds `scale · hint_j` after block `layers[j]`.

    Built with the call's own inputs (latents [B, C_in, F, H, W], timestep [B], context
    [B, L, text_dim]); the VACE stack runs lazily, one block per hinted layer, on the video
    tokens and context tokens of this process's shard (the forward's own sharding).
    """

    def __init__(
        self,
        dit: WanDiT,
        branch: VaceBranch,
        inputs: VaceInputs,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        sharding: _RememberedSharding,
        run_block: Callable[..., object],
        adapters: LinearAdapters | None = None,
    ) -> None:
        self.dit, self.branch, self.inputs = dit, branch, inputs
        self.latents, self.timestep, self.context = latents, timestep, context
        self.sharding, self.run_block, self.adapters = sharding, run_block, adapters
        self.done = 0  # VACE blocks run so far in this call
        self.state: tuple | None = None  # (c, t_mod, ctx, rope, attention) once started

    def _prepare(self) -> None:
        """The VACE stack's inputs on this process's shard (what the forward had before block 0)."""
        sharding = self.sharding.current
        if sharding is None:
            raise RuntimeError("VaceHints ran before the forward made its sharding")
        dit, latents = self.dit, self.latents
        grid = dit.token_grid(latents.shape)
        x0 = sharding.shard(dit.patchify(latents))  # [B, S_loc, C]
        vc = self.inputs.context.to(latents.device)
        if vc.shape[0] != latents.shape[0]:  # one context for the batch (or both CFG halves)
            vc = vc.expand(latents.shape[0], *vc.shape[1:])
        c = sharding.shard(self.branch.patchify(vc))  # [B, S_loc, C], sharded like x0
        positions = sharding.shard(video_positions(*grid, device=x0.device)[None])[0]
        _, t_mod = dit.time_modulation(self.timestep, self.adapters)
        ctx = dit.embed_text(self.context, self.adapters)
        self.state = (c, x0, t_mod, ctx, dit.rope(positions), sharding.attention)

    def _next(self, j: int) -> torch.Tensor:
        """Run VACE block j (blocks run in order, once per call) → hint_j [B, S_loc, C]."""
        if j != self.done:
            raise RuntimeError(f"VACE hint {j} asked for out of order (next is {self.done})")
        if self.state is None:
            self._prepare()
        c, x0, t_mod, ctx, rope, attention = self.state
        block = self.branch.vace_blocks[j]
        c, hint = self.run_block(block.hint, c, x0, t_mod, ctx, rope, attention, self.adapters)
        self.state = (c, None, t_mod, ctx, rope, attention)  # x0 is only needed by block 0
        self.done = j + 1
        return hint

    def __call__(self, i: int, x: torch.Tensor) -> torch.Tensor | SkipRest:
        """x [B, S_loc, C] float32 after DiT block i → x (+ scale · hint when i is hinted)."""
        j = self.branch.hinted.get(i)
        if j is None:
            return x
        return x + self._next(j) * self.inputs.scale


def vace_call(
    dit: WanDiT,
    branch: VaceBranch,
    inputs: VaceInputs,
    identity: IdentityCache | None = None,
    adapters: LinearAdapters | None = None,
    plan: ForwardPlan = LOCAL,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A `standin.guidance.ModelCall` that runs the DiT with VACE hints: every call gets its
    own `VaceHints` (so both CFG passes and every step compute their hints afresh).

    (latents [B, C_in, F, H, W], timestep [B], context [B, L, text_dim]) → velocity like `WanDiT.forward`.
    """
    if plan.after_block is not None:
        raise ValueError("the plan already has an after_block hook; VACE needs that seam")

    def call(latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        inputs.validate(branch.config.in_dim, latents.shape)
        sharding = _RememberedSharding(plan.sharding)
        hook = VaceHints(dit, branch, inputs, latents, timestep, context, sharding, plan.run_block, adapters)
        this_plan = replace(plan, sharding=sharding, after_block=hook)
        return dit(latents, timestep, context, identity, adapters, this_plan)

    return call


# -- loading -------------------------------------------------------------------------------


def is_vace_key(key: str) -> bool:
    return key.startswith(("vace_blocks.", "vace_patch_embedding."))


def load_vace_dit(
    dit_path: Path,
    config: DiTConfig,
    vace: VaceConfig,
    *,
    lora_path: Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    with_branch: bool = True,
) -> tuple[WanDiT, VaceBranch | None]:
    """The DiT and its VACE branch from one official Wan2.1-VACE checkpoint, strictly.

    dit_path: a Wan2.1-VACE directory (`diffusion_pytorch_model-0000i-of-0000n.safetensors`
    + index, holding `blocks.*` … and `vace_*` keys) or one .safetensors file. The file is read
    once; `vace_blocks.*` / `vace_patch_embedding.*` go to the branch, everything else (+ the
    Stand-In LoRA from `lora_path`) to the DiT. Any missing, unexpected or mis-shaped key of
    either is a `CheckpointError` naming it and its file. `with_branch=False` reads only the DiT's
    tensors (the branch is None): for a process that loads the branch apart (`load_vace_branch`).
    """
    if not dit_path.exists():
        raise CheckpointError(f"missing VACE checkpoint: {dit_path}")
    paths = [dit_path] if dit_path.is_file() else shard_files(dit_path)
    keep = None if with_branch else (lambda k: None if is_vace_key(k) else k)
    # The DiT's float32 parameters (standin.dit.keeps_float32) are read as float32; the branch's
    # weights all in dtype.
    dit_float32 = lambda k: not is_vace_key(k) and keeps_float32(k)  # noqa: E731
    tensors = read_safetensors(paths, dtype=dtype, device=device, rename=keep, float32_keys=dit_float32)
    branch_tensors = {k: v for k, v in tensors.items() if is_vace_key(k)}
    dit_tensors = {k: v for k, v in tensors.items() if not is_vace_key(k)}
    where = ", ".join(p.name for p in paths)
    if lora_path is not None:
        lora = read_torch_pickle(lora_path, dtype=dtype, device=device)
        clash = next((k for k in lora if k in tensors), None)
        if clash:
            raise CheckpointError(f"{lora_path.name} and the DiT shards both hold {clash}")
        dit_tensors.update(lora)
    else:
        config = replace(config, lora_rank=0)
    with torch.device("meta"):
        model, branch = WanDiT(config), VaceBranch(config, vace)
    load_strict(model, dit_tensors, expected_in=where + (f" + {lora_path.name}" if lora_path else ""))
    model.to_inference_dtype(dtype)
    if not with_branch:
        log.info("loaded the DiT of a VACE checkpoint from %s (%s, %s)", where, dtype, device)
        return model.eval().requires_grad_(False), None
    load_strict(branch, branch_tensors, expected_in=where)
    log.info("loaded DiT + VACE (%d hinted layers) from %s (%s, %s)", len(vace.layers), where, dtype, device)
    return model.eval().requires_grad_(False), branch.eval().requires_grad_(False)


def load_vace_branch(
    dit_path: Path,
    config: DiTConfig,
    vace: VaceConfig,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> VaceBranch:
    """Only the VACE branch of an official Wan2.1-VACE checkpoint (its `vace_*` tensors are the
    only ones read), strictly: for processes that get the DiT some other way (a sequence-parallel
    rank that receives it by broadcast)."""
    if not dit_path.exists():
        raise CheckpointError(f"missing VACE checkpoint: {dit_path}")
    paths = [dit_path] if dit_path.is_file() else shard_files(dit_path)
    tensors = read_safetensors(
        paths, dtype=dtype, device=device, rename=lambda k: k if is_vace_key(k) else None
    )
    with torch.device("meta"):
        branch = VaceBranch(config, vace)
    load_strict(branch, tensors, expected_in=", ".join(p.name for p in paths))
    return branch.eval().requires_grad_(False)


# The tiny preset's VACE branch: a separate file beside tiny.safetensors (`standin train --recipe vace`).
TINY_VACE_WEIGHTS = Path(__file__).resolve().parent / "weights" / "tiny_vace.safetensors"


def save_tiny_vace(path: Path, branch: VaceBranch, metadata: dict) -> None:
    """One safetensors file, fp16, official keys (`vace_blocks.*`, `vace_patch_embedding.*`)."""
    tensors = {k: v.detach().half().contiguous() for k, v in branch.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"standin": json.dumps(metadata)})


def load_tiny_vace(path: Path, dit: DiTConfig, vace: VaceConfig) -> tuple[VaceBranch, dict]:
    """The branch of a `save_tiny_vace` file (float32, CPU) and its metadata, strictly."""
    check_file(path, "tiny VACE weights")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = json.loads((f.metadata() or {}).get("standin", "{}"))
    with torch.device("meta"):
        branch = VaceBranch(dit, vace)
    load_strict(branch, {k: (t.float(), path.name) for k, t in tensors.items()}, expected_in=path.name)
    return branch.eval().requires_grad_(False), metadata
