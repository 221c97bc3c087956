"""Ulysses layout changes: sequence shards ↔ head shards with one all-to-all each way.

Before: each of the N ranks of a Ulysses group holds S_loc consecutive tokens, all H heads.
After `tokens_to_heads`: each rank holds all N·S_loc tokens (in global order) for H/N heads,
rank i having heads [i·H/N, (i+1)·H/N). `heads_to_tokens` is the inverse.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.collectives import Collectives

__all__ = ["heads_to_tokens", "tokens_to_heads"]


def tokens_to_heads(
    x: torch.Tensor, comm: Collectives, group: dist.ProcessGroup | None, size: int
) -> torch.Tensor:
    """[..., B, S_loc, H, D] → [..., B, N·S_loc, H/N, D] (leading dims, e.g. a q/k/v stack, kept).

    One all-to-all moves (N−1)/N of the buffer.
    """
    if size == 1:
        return x
    *lead, b, s, h, d = x.shape
    # Chunk j (heads of rank j) to the front: the all-to-all sends chunk j to rank j.
    send = x.reshape(*lead, b, s, size, h // size, d).movedim(-3, 0)
    recv = comm.all_to_all(send, group, size)  # chunk i: rank i's tokens, my heads
    return recv.movedim(0, -4).reshape(*lead, b, size * s, h // size, d)


def heads_to_tokens(
    x: torch.Tensor, comm: Collectives, group: dist.ProcessGroup | None, size: int
) -> torch.Tensor:
    """[B, N·S_loc, H/N, D] → [B, S_loc, H, D], the inverse of `tokens_to_heads`."""
    if size == 1:
        return x
    b, s_all, h_loc, d = x.shape
    send = x.reshape(b, size, s_all // size, h_loc, d).movedim(1, 0)  # chunk j: rank j's tokens
    recv = comm.all_to_all(send, group, size)  # chunk i: my tokens, rank i's heads
    return recv.movedim(0, 2).reshape(b, s_all // size, size * h_loc, d)
