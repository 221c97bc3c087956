"""Sequence-parallel restricted self-attention, the `video_attention` parallel/ hands to each block.

Ulysses (all-to-all to head shards) inside a Ulysses group, ring attention across the ring of
Ulysses groups, or both. The identity K/V a rank is given is already its own head slice: it is
appended locally after the all-to-all and never enters a collective.
"""

from __future__ import annotations

import torch

from parallel.collectives import Collectives
from parallel.ring import ring_attention
from parallel.ulysses import heads_to_tokens, tokens_to_heads
from standin.attention import restricted_attention

__all__ = ["SequenceParallelAttention"]


class SequenceParallelAttention:
    """Drop-in for `standin.attention.restricted_attention` on one token shard.

    num_tokens: real video tokens S of the whole sequence; shard_len: S_loc, tokens per rank
    (S padded up to a multiple of the SP degree, padding at the end).
    """

    def __init__(self, comm: Collectives, num_tokens: int, shard_len: int) -> None:
        self.comm = comm
        mesh = comm.mesh
        self.ulysses = mesh.config.ulysses
        block = self.ulysses * shard_len  # tokens per ring block (one Ulysses group's shards)
        # Real keys in each ring block: padding sits only at the end of the global sequence.
        self.valid_keys = [min(max(num_tokens - j * block, 0), block) for j in range(mesh.config.ring)]

    # Kept out of compiled blocks (compiled_blocks): its collectives and their agreement gates
    # run eagerly, in the same order on every rank, and the compiled graph never traces them.
    @torch.compiler.disable
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        identity_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """q/k/v [B, S_loc, H, D] (RoPE applied), identity_kv [1 or B, S_id, H/U, D] → [B, S_loc, H, D]."""
        mesh = self.comm.mesh
        if self.ulysses > 1:
            qkv = tokens_to_heads(torch.stack([q, k, v]), self.comm, mesh.ulysses_group, self.ulysses)
            q, k, v = qkv.unbind(0)
        if len(self.valid_keys) > 1:
            out = ring_attention(q, k, v, identity_kv, self.comm, self.valid_keys)
        else:
            n = self.valid_keys[0]
            out = restricted_attention(q, k[:, :n], v[:, :n], identity_kv)
        return heads_to_tokens(out, self.comm, mesh.ulysses_group, self.ulysses)
