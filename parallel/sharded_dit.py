"""The DiT forward over one sequence-parallel group, composed from `WanDiT`'s public pieces.

Every rank of the SP group: patchify → pad the tokens to a multiple of the SP degree and keep
its shard → RoPE tables from the shard's global positions → every block with
`SequenceParallelAttention` and the rank's head slice of the identity cache → head → all-gather
→ unpatchify. Every rank ends with the whole velocity (latents stay replicated, so the Euler
step needs no communication).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from parallel.attention import SequenceParallelAttention
from parallel.collectives import Collectives
from parallel.mesh import DeviceMesh
from standin.dit import IdentityCache, WanDiT
from standin.rope import video_positions

__all__ = ["ShardedDiT", "TokenLayout"]


@dataclass(frozen=True)
class TokenLayout:
    """How S video tokens are cut into `shards` equal shards (zero padding at the end)."""

    num_tokens: int
    shards: int

    @property
    def shard_len(self) -> int:
        return math.ceil(self.num_tokens / self.shards)

    @property
    def padded(self) -> int:
        return self.shard_len * self.shards

    def shard(self, x: torch.Tensor, index: int, dim: int = 1) -> torch.Tensor:
        """Shard `index` of x along `dim` (size S), zero-padded to shard_len."""
        start = index * self.shard_len
        length = max(0, min(self.shard_len, self.num_tokens - start))
        part = x.narrow(dim, min(start, self.num_tokens), length)
        missing = self.shard_len - part.shape[dim]
        if missing:
            pad_shape = list(part.shape)
            pad_shape[dim] = missing
            part = torch.cat([part, part.new_zeros(pad_shape)], dim=dim)
        return part.contiguous()


class ShardedDiT:
    """A `WanDiT` run over the SP group of `comm.mesh`. Holds no request state."""

    def __init__(self, model: WanDiT, comm: Collectives) -> None:
        self.model = model
        self.comm = comm
        self.mesh: DeviceMesh = comm.mesh
        if model.config.num_heads != self.mesh.num_heads:
            raise ValueError(
                f"mesh was built for {self.mesh.num_heads} heads, the model has {model.config.num_heads}"
            )

    @torch.no_grad()
    def identity_cache(self, identity_latents: torch.Tensor, latent_shape: Sequence[int]) -> IdentityCache:
        """This rank's share of the request's identity cache: all identity tokens, its heads.

        identity_latents [B_id, C_in, 1, h, w]. Computed locally on every rank (the identity
        tokens are replicated); only the Ulysses head slice is kept ([B_id, S_id, H/U, D] per
        layer). No communication.
        """
        full = self.model.identity_cache(identity_latents, latent_shape)
        start, stop = self.mesh.head_range
        if (start, stop) == (0, self.model.config.num_heads):
            return full
        return full.heads(start, stop)

    @torch.no_grad()
    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        identity: IdentityCache | None = None,
    ) -> torch.Tensor:
        """Same contract as `WanDiT.forward`, run by every rank of the SP group.

        latents [B, C_in, F, H, W] (the same on every rank), timestep [B], context [B, L, text_dim],
        identity: this rank's cache from `identity_cache` or None → velocity [B, C_out, F, H, W]
        float32, identical on every rank of the SP group.
        """
        model, mesh = self.model, self.mesh
        grid = model.token_grid(latents.shape)
        if identity is not None:
            model.check_identity(identity, grid, latents.shape[0])
            self._check_identity_heads(identity)
        layout = TokenLayout(math.prod(grid), mesh.config.sp_degree)
        index = mesh.sp_rank

        x = layout.shard(model.patchify(latents), index)
        # Global positions of this shard's tokens; padding gets position 0 (its output is dropped).
        positions = layout.shard(video_positions(*grid, device=x.device)[None], index)[0]
        rope = model.rope(positions)
        t_emb, t_mod = model.time_modulation(timestep)
        ctx = model.embed_text(context)
        attend = SequenceParallelAttention(self.comm, layout.num_tokens, layout.shard_len)
        for i, block in enumerate(model.blocks):
            kv = identity.layer(i) if identity is not None else None
            x = block(x, t_mod, ctx, rope, kv, video_attention=attend)
        out = model.head(x, t_emb).float()  # [B, S_loc, out_dim * prod(patch)]

        shards = self.comm.all_gather(out, mesh.sp_group, mesh.config.sp_degree)
        tokens = shards.movedim(0, 1).flatten(1, 2)[:, : layout.num_tokens]
        return model.unpatchify(tokens, grid)

    __call__ = forward

    def _check_identity_heads(self, identity: IdentityCache) -> None:
        start, stop = self.mesh.head_range
        heads = identity.keys[0].shape[2]
        if heads != stop - start:
            raise ValueError(
                f"identity cache holds {heads} heads, this rank computes heads [{start}, {stop}): "
                "build it with ShardedDiT.identity_cache on this mesh"
            )
