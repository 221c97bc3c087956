"""The Wan2.1 text-to-video DiT with Stand-In's conditional image (identity) branch.

Parameter names equal the official Wan2.1 checkpoint keys plus Stand-In's
`blocks.{i}.self_attn.{q,k,v}_loras.{down,up}.weight`, so the released files load unchanged.

Identity tokens (the VAE latent of the face, patchified like the video) use timestep 0,
go through self-attention (with LoRA on their Q/K/V) and the FFN of every block, skip
cross-attention, and never attend to video tokens. Their per-layer K/V therefore do not
depend on the video, the timestep or the prompt: `WanDiT.identity_cache` computes them once
per request, and every denoising step (positive and negative pass) reuses them exactly.

Numerics (bf16/fp16 inference) follow the official model, which keeps float32 weights and runs
under `autocast(bfloat16)` with float32 regions. Here the weights themselves carry the split, so
that a bf16 model also halves its memory; `WanDiT.to_inference_dtype(dtype)` (used by the loaders)
makes it:

- **in `dtype`** (bf16): every linear and conv weight of the blocks (self/cross-attention
  q/k/v/o, FFN), the text embedding, the patch embedding and Stand-In's identity LoRA; their
  matmuls, attention (q/k/v in `dtype`) and the text context run in `dtype`;
- **float32** (`keeps_float32`): the time embedding and time projection (their sinusoid is
  computed in float64), every adaLN modulation table (`blocks.i.modulation`, `head.modulation`)
  and its sums, the norm weights (q/k RMSNorm, `norm3`) with every norm computed in float32, the
  head (its linear too, as the official fp32 autocast region), the residual stream and gates;
  RoPE angles in float64, the rotation in float32 (q/k rounded to `dtype` before and after).

`forward` and `identity_cache` are the model's only forwards: sequence parallelism, training and
per-request features plug in through a `ForwardPlan` and `LinearAdapters` (standin/forward_plan.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from standin.attention import attention
from standin.config import DiTConfig
from standin.forward_plan import LOCAL, ForwardPlan, LinearAdapters, SkipRest, VideoAttention
from standin.lora import LoRA
from standin.rope import apply_rope, identity_positions, rope_angles, video_positions

__all__ = ["DiTConfig", "IdentityCache", "Rope", "WanDiT", "keeps_float32"]

# (cos, sin) tables [S, head_dim/2] for the tokens a forward processes.
Rope = tuple[torch.Tensor, torch.Tensor]

_FLOAT32_PREFIXES = ("time_embedding.", "time_projection.", "head.")


def keeps_float32(name: str) -> bool:
    """Whether parameter `name` stays float32 in a bf16/fp16 model (see the module docstring)."""
    return name.startswith(_FLOAT32_PREFIXES) or name.endswith("modulation") or ".norm" in name


@dataclass
class IdentityCache:
    """Per-request identity K/V of every layer; owned by the request, never by the model.

    keys[i], values[i]: [B_id, S_id, H, D] (keys with RoPE applied). `video_grid` is the
    (frames, rows, columns) token grid the identity positions were placed after: the cache
    is valid only for videos with those rows and columns. B_id is 1 (shared by the whole batch) or B.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    video_grid: tuple[int, int, int]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[i], self.values[i]

    def heads(self, start: int, stop: int) -> IdentityCache:
        """The cache restricted to heads [start, stop) (a sequence-parallel rank's share)."""
        return IdentityCache(
            [k[:, :, start:stop].contiguous() for k in self.keys],
            [v[:, :, start:stop].contiguous() for v in self.values],
            self.video_grid,
        )

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def num_heads(self) -> int:
        return self.keys[0].shape[2]


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[B] timesteps → [B, dim] float32 (cos half, then sin half), computed in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)  # float32 weight, output in x's dtype


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the weights' dtype; returns float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return nn.functional.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


def _linear(
    layer: nn.Linear, name: str, x: torch.Tensor, adapters: LinearAdapters | None
) -> torch.Tensor:
    """A base linear layer (input cast to its dtype) plus the request's adapters on it, if any."""
    x = _cast_like(x, layer)
    y = layer(x)
    return y if adapters is None else adapters.linear(name, x, y)


class _Projections(nn.Module):
    """q/k/v/o projections with RMS-normalised queries and keys (both attention kinds).

    `prefix` is the module's parameter prefix (`blocks.3.self_attn`), the name adapters see.
    """

    def __init__(self, dim: int, num_heads: int, eps: float, prefix: str) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.prefix = prefix
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def project(self, which: str, x: torch.Tensor, adapters: LinearAdapters | None) -> torch.Tensor:
        """x [B, S, C] through projection `which` (q, k, v or o) and the request's adapters."""
        # The name is read only with adapters: a compiled block then never guards on its prefix,
        # so every block shares one graph (standin.forward_plan.compiled_blocks).
        name = f"{self.prefix}.{which}" if adapters is not None else which
        return _linear(getattr(self, which), name, x, adapters)


class SelfAttention(_Projections):
    def __init__(self, dim: int, num_heads: int, eps: float, lora_rank: int, prefix: str) -> None:
        super().__init__(dim, num_heads, eps, prefix)
        if lora_rank > 0:
            self.q_loras = LoRA(dim, dim, lora_rank)
            self.k_loras = LoRA(dim, dim, lora_rank)
            self.v_loras = LoRA(dim, dim, lora_rank)
        self.has_lora = lora_rank > 0

    def qkv(
        self, x: torch.Tensor, rope: Rope, identity: bool, adapters: LinearAdapters | None
    ) -> tuple[torch.Tensor, ...]:
        """x [B, S, C] → q, k, v [B, S, H, D]; Stand-In's LoRA only for identity tokens."""
        x = _cast_like(x, self.q)
        q, k, v = (self.project(name, x, adapters) for name in "qkv")
        if identity and self.has_lora:
            q = q + self.q_loras(x)
            k = k + self.k_loras(x)
            v = v + self.v_loras(x)
        q = apply_rope(self.norm_q(q).unflatten(-1, (self.num_heads, -1)), *rope)
        k = apply_rope(self.norm_k(k).unflatten(-1, (self.num_heads, -1)), *rope)
        return q, k, v.unflatten(-1, (self.num_heads, -1))

    def out(self, x: torch.Tensor, adapters: LinearAdapters | None) -> torch.Tensor:
        """[B, S, H, D] → [B, S, C]."""
        return self.project("o", x.flatten(-2), adapters)


class CrossAttention(_Projections):
    def forward(
        self, x: torch.Tensor, context: torch.Tensor, adapters: LinearAdapters | None
    ) -> torch.Tensor:
        """x [B, S, C], context [B, L, C] (embedded text) → [B, S, C]."""
        heads = (self.num_heads, -1)
        q = self.norm_q(self.project("q", x, adapters)).unflatten(-1, heads)
        k = self.norm_k(self.project("k", context, adapters)).unflatten(-1, heads)
        v = self.project("v", context, adapters).unflatten(-1, heads)
        return self.project("o", attention(q, k, v).flatten(-2), adapters)


class DiTBlock(nn.Module):
    """One Wan block; `prefix` (`blocks.3`) names its layers for per-request adapters."""

    def __init__(self, cfg: DiTConfig, prefix: str) -> None:
        super().__init__()
        dim = cfg.dim
        self.prefix = prefix
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps, cfg.lora_rank, f"{prefix}.self_attn")
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps, f"{prefix}.cross_attn")
        self.norm1 = LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.norm2 = LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.norm3 = LayerNorm(dim, eps=cfg.eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def _modulation(self, t_mod: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """t_mod [B, 6, C] float32 → six [B, 1, C]: shift/scale/gate for attention, then FFN."""
        return (self.modulation.float() + t_mod).chunk(6, dim=1)

    def _ffn(
        self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, adapters: LinearAdapters | None
    ) -> torch.Tensor:
        prefix = self.prefix if adapters is not None else "block"  # see _Projections.project
        h = _linear(self.ffn[0], f"{prefix}.ffn.0", self.norm2(x) * (1 + scale) + shift, adapters)
        return _linear(self.ffn[2], f"{prefix}.ffn.2", self.ffn[1](h), adapters)

    def forward(
        self,
        x: torch.Tensor,
        t_mod: torch.Tensor,
        context: torch.Tensor,
        rope: Rope,
        identity_kv: tuple[torch.Tensor, torch.Tensor] | None,
        video_attention: VideoAttention,
        adapters: LinearAdapters | None = None,
    ) -> torch.Tensor:
        """Video tokens x [B, S, C] float32 → [B, S, C] float32."""
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self._modulation(t_mod)
        h = self.norm1(x) * (1 + scale_a) + shift_a
        q, k, v = self.self_attn.qkv(h, rope, identity=False, adapters=adapters)
        x = x + self.self_attn.out(video_attention(q, k, v, identity_kv), adapters).float() * gate_a
        x = x + self.cross_attn(self.norm3(x), context, adapters).float()
        return x + self._ffn(x, shift_f, scale_f, adapters).float() * gate_f

    def identity_forward(
        self,
        x: torch.Tensor,
        t_mod: torch.Tensor,
        rope: Rope,
        last: bool,
        adapters: LinearAdapters | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Identity tokens x [B, S_id, C] float32 through this block (timestep-0 t_mod).

        Returns (x after the block, K, V) with K/V [B, S_id, H, D]. Identity tokens attend
        only to themselves and skip cross-attention. After the last block their stream is
        dropped, so `last` skips its FFN.
        """
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self._modulation(t_mod)
        h = self.norm1(x) * (1 + scale_a) + shift_a
        q, k, v = self.self_attn.qkv(h, rope, identity=True, adapters=adapters)
        if last:
            return x, k, v
        x = x + self.self_attn.out(attention(q, k, v), adapters).float() * gate_a
        return x + self._ffn(x, shift_f, scale_f, adapters).float() * gate_f, k, v


def _cast_like(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return x.to(layer.weight.dtype)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(
        self, x: torch.Tensor, t_emb: torch.Tensor, adapters: LinearAdapters | None = None
    ) -> torch.Tensor:
        """x [B, S, C] float32, t_emb [B, C] float32 → [B, S, out_dim * prod(patch)]."""
        shift, scale = (self.modulation.float() + t_emb[:, None, :]).chunk(2, dim=1)
        return _linear(self.head, "head.head", self.norm(x) * (1 + scale) + shift, adapters)


class WanDiT(nn.Module):
    """Wan2.1 T2V DiT + Stand-In identity branch. Holds weights only, no request state."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, c.dim * 6))
        self.blocks = nn.ModuleList(DiTBlock(c, f"blocks.{i}") for i in range(c.num_layers))
        self.head = Head(c)

    def to_inference_dtype(self, dtype: torch.dtype) -> WanDiT:
        """Cast in place for inference in `dtype`: linear/conv weights (and the LoRA) to `dtype`,
        the `keeps_float32` parameters to float32. float32 → every parameter float32. Returns self."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                if param.is_floating_point():
                    param.data = param.data.to(torch.float32 if keeps_float32(name) else dtype)
        return self

    # -- pieces of the forward ------------------------------------------------------------

    def token_grid(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """(frames, rows, columns) of tokens for latents of shape [..., F, H, W]."""
        f, h, w = latent_shape[-3:]
        pt, ph, pw = self.config.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(
                f"latent size {(f, h, w)} is not divisible by the patch size {(pt, ph, pw)}"
            )
        return f // pt, h // ph, w // pw

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C_in, F, H, W] → tokens [B, S, C] float32, in (frame, row, column) order."""
        w = self.patch_embedding.weight
        return self.patch_embedding(latents.to(w.dtype)).flatten(2).transpose(1, 2).float()

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, S, out_dim * prod(patch)] → [B, out_dim, F, H, W]."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, self.config.out_dim)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], self.config.out_dim, f * pt, h * ph, w * pw)

    def rope(self, positions: torch.Tensor) -> Rope:
        return rope_angles(positions, self.config.head_dim)

    def time_modulation(
        self, timestep: torch.Tensor, adapters: LinearAdapters | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B] → (t_emb [B, C], t_mod [B, 6, C]), both float32."""
        emb = self.time_embedding
        sinusoid = sinusoidal_embedding(self.config.freq_dim, timestep)
        h = _linear(emb[0], "time_embedding.0", sinusoid, adapters)
        t_emb = _linear(emb[2], "time_embedding.2", emb[1](h), adapters).float()
        proj = self.time_projection
        t_mod = _linear(proj[1], "time_projection.1", proj[0](_cast_like(t_emb, proj[1])), adapters).float()
        return t_emb, t_mod.unflatten(1, (6, self.config.dim))

    def embed_text(self, context: torch.Tensor, adapters: LinearAdapters | None = None) -> torch.Tensor:
        """[B, L, text_dim] → [B, L, C] in the weights' dtype."""
        emb = self.text_embedding
        h = _linear(emb[0], "text_embedding.0", context, adapters)
        return _linear(emb[2], "text_embedding.2", emb[1](h), adapters)

    # -- the two entry points ----------------------------------------------------------

    def identity_cache(
        self,
        identity_latents: torch.Tensor,
        latent_shape: Sequence[int],
        adapters: LinearAdapters | None = None,
        plan: ForwardPlan = LOCAL,
    ) -> IdentityCache:
        """Run the identity tokens through every block once; keep each layer's K/V.

        identity_latents: [B_id, C_in, 1, h, w], the VAE latent of the face image.
        latent_shape: the shape of the video latents ([..., F, H, W]) it will condition;
        identity rows/columns are placed right after that video grid. The identity tokens are
        never sharded: every process computes all of them and keeps the heads its plan's
        sharding names (all by default).
        """
        if identity_latents.ndim != 5:
            raise ValueError(
                f"identity_latents must be [B, C, 1, h, w], got shape {tuple(identity_latents.shape)}"
            )
        grid = self.token_grid(latent_shape)
        _, id_h, id_w = self.token_grid(identity_latents.shape)
        x = self.patchify(identity_latents)
        rope = self.rope(identity_positions(id_h, id_w, grid[1], grid[2], device=x.device))
        _, t_mod = self.time_modulation(torch.zeros(x.shape[0], device=x.device), adapters)
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            x, k, v = plan.run_block(block.identity_forward, x, t_mod, rope, last, adapters)
            keys.append(k)
            values.append(v)
        cache = IdentityCache(keys, values, grid)
        heads = plan.sharding.head_range
        if heads is None or heads == (0, self.config.num_heads):
            return cache
        return cache.heads(*heads)

    def check_identity(
        self, identity: IdentityCache, grid: tuple[int, int, int], batch: int, plan: ForwardPlan = LOCAL
    ) -> None:
        if identity.video_grid[1:] != grid[1:]:
            raise ValueError(
                f"identity cache was built for a {identity.video_grid} token grid, "
                f"the latents give {grid}: rebuild it for this video size"
            )
        if identity.batch_size not in (1, batch):
            raise ValueError(
                f"identity cache has batch {identity.batch_size}, latents have batch {batch}"
            )
        start, stop = plan.sharding.head_range or (0, self.config.num_heads)
        if identity.num_heads != stop - start:
            raise ValueError(
                f"identity cache holds {identity.num_heads} heads, this process computes heads "
                f"[{start}, {stop}): build it with the same plan as the forward"
            )

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        identity: IdentityCache | None = None,
        adapters: LinearAdapters | None = None,
        plan: ForwardPlan = LOCAL,
    ) -> torch.Tensor:
        """Predict the flow-matching velocity.

        latents [B, C_in, F, H, W], timestep [B] (0…1000), context [B, L, text_dim],
        identity: the request's cache, or None for plain Wan2.1; adapters: the request's style
        adapters; plan: how the forward runs (sharding, block execution, hooks)
        → [B, C_out, F, H, W] float32 (every token's, on every process of a sharded plan).
        """
        grid = self.token_grid(latents.shape)
        if identity is not None:
            self.check_identity(identity, grid, latents.shape[0], plan)
        sharding = plan.sharding(math.prod(grid))
        x = sharding.shard(self.patchify(latents))
        # Global positions of this process's tokens (padding, if any, is dropped by `gather`).
        positions = sharding.shard(video_positions(*grid, device=x.device)[None])[0]
        rope = self.rope(positions)
        t_emb, t_mod = self.time_modulation(timestep, adapters)
        ctx = self.embed_text(context, adapters)
        for i, block in enumerate(self.blocks):
            kv = identity.layer(i) if identity is not None else None
            x = plan.run_block(block, x, t_mod, ctx, rope, kv, sharding.attention, adapters)
            if plan.after_block is not None:
                x = plan.after_block(i, x)
                if isinstance(x, SkipRest):
                    x = x.x
                    break
        out = self.head(x, t_emb, adapters).float()  # [B, S_loc, out_dim * prod(patch)]
        return self.unpatchify(sharding.gather(out), grid)
