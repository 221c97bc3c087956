"""The DiT over one sequence-parallel group: the sharding parallel/ plugs into `WanDiT.forward`.

Latents stay replicated on every rank and every rank ends with the whole velocity, so the
Euler step needs no communication.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from parallel.attention import SequenceParallelAttention
from parallel.collectives import Collectives
from parallel.mesh import DeviceMesh
from standin.dit import IdentityCache, WanDiT
from standin.forward_plan import ForwardPlan, LinearAdapters

__all__ = ["SequenceSharding", "SequenceShards", "ShardedDiT", "TokenLayout"]


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


class SequenceShards:
    """This rank's token shard of one forward: shard, attend across the group, gather.

    A `standin.forward_plan.TokenSharding`: the DiT's forward runs unchanged on the shard.
    """

    def __init__(self, comm: Collectives, num_tokens: int) -> None:
        self.comm = comm
        self.layout = TokenLayout(num_tokens, comm.mesh.config.sp_degree)
        self.attention = SequenceParallelAttention(comm, num_tokens, self.layout.shard_len)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] → this rank's [B, S_loc, ...] (zero padding at the end of the sequence)."""
        return self.layout.shard(x, self.comm.mesh.sp_rank)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S_loc, ...] on every rank → [B, S, ...] on every rank (padding dropped)."""
        mesh = self.comm.mesh
        shards = self.comm.all_gather(x, mesh.sp_group, mesh.config.sp_degree)
        return shards.movedim(0, 1).flatten(1, 2)[:, : self.layout.num_tokens]


@dataclass(frozen=True)
class SequenceSharding:
    """The `ShardingFactory` of a sequence-parallel group: a `SequenceShards` per forward."""

    comm: Collectives

    def __call__(self, num_tokens: int) -> SequenceShards:
        return SequenceShards(self.comm, num_tokens)

    @property
    def head_range(self) -> tuple[int, int]:
        return self.comm.mesh.head_range


class ShardedDiT:
    """A `WanDiT` run over the SP group of `comm.mesh`. Holds no request state.

    The model's own `forward` and `identity_cache` run on every rank with a plan whose sharding
    is `SequenceSharding`: patchify → this rank's shard of the tokens (with their global RoPE
    positions) → every block with `SequenceParallelAttention` and the rank's head slice of the
    identity cache → head → all-gather. Every rank ends with the whole velocity.
    """

    def __init__(self, model: WanDiT, comm: Collectives, run_block: Callable[..., Any] | None = None) -> None:
        self.model = model
        self.comm = comm
        self.mesh: DeviceMesh = comm.mesh
        if model.config.num_heads != self.mesh.num_heads:
            raise ValueError(
                f"mesh was built for {self.mesh.num_heads} heads, the model has {model.config.num_heads}"
            )
        # run_block: how each block is called (`compiled_blocks()` compiles them; the attention's
        # collectives stay eager either way). None: the plain eager call.
        plan = ForwardPlan(sharding=SequenceSharding(comm))
        self.plan = plan if run_block is None else replace(plan, run_block=run_block)

    @torch.no_grad()
    def identity_cache(
        self,
        identity_latents: torch.Tensor,
        latent_shape: Sequence[int],
        adapters: LinearAdapters | None = None,
    ) -> IdentityCache:
        """This rank's share of the request's identity cache: all identity tokens, its heads.

        identity_latents [B_id, C_in, 1, h, w] → per layer [B_id, S_id, H/U, D]. Computed locally
        on every rank (the identity tokens are replicated). No communication.
        """
        return self.model.identity_cache(identity_latents, latent_shape, adapters, self.plan)

    @torch.no_grad()
    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        identity: IdentityCache | None = None,
        adapters: LinearAdapters | None = None,
    ) -> torch.Tensor:
        """Same contract as `WanDiT.forward`, run by every rank of the SP group.

        latents [B, C_in, F, H, W] (the same on every rank), timestep [B], context [B, L, text_dim],
        identity: this rank's cache from `identity_cache` or None → velocity [B, C_out, F, H, W]
        float32, identical on every rank of the SP group.
        """
        return self.model(latents, timestep, context, identity, adapters, self.plan)

    __call__ = forward
