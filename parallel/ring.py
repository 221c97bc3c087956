"""Ring attention: K/V blocks travel around the ring, partial results merge by log-sum-exp.

Each of the R ranks of a ring holds the queries and K/V of one super-shard of the video tokens.
In R steps every rank sees every K/V block; its partial softmax results are merged exactly
through their log-sum-exp. The identity K/V joins as one extra block that never leaves the rank.
Padding (the tail of the last shards) is excluded by slicing each block to its valid keys.

Each block runs the configured kernel that returns the log-sum-exp (`standin.attention`'s
`attention_with_lse`: flash-attn, SageAttention or PyTorch's fused kernels; exact chunked math
elsewhere), so no block ever holds an S_q × S_k float32 score matrix. The K/V shift of the next
block is posted (grouped send + receive, `Collectives.ring_shift`) before the current block is
computed, overlapping the two.
"""

from __future__ import annotations

import torch

from parallel.collectives import Collectives, PendingShift
from standin.attention import BlockResult, attention_with_lse, merge

__all__ = ["ring_attention"]


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    identity_kv: tuple[torch.Tensor, torch.Tensor] | None,
    comm: Collectives,
    valid_keys: list[int],
) -> torch.Tensor:
    """q/k/v [B, S_blk, H, D] of this rank's block → attention over all blocks [B, S_blk, H, D].

    identity_kv: this rank's identity K/V [1 or B, S_id, H, D] (a local block, never sent).
    valid_keys[j]: how many leading keys of ring rank j's block are real tokens (the rest is
    padding). Ring rank 0's block always has at least one.
    """
    mesh = comm.mesh
    size = len(mesh.ring_ranks)
    acc: BlockResult | None = None
    if identity_kv is not None:
        b = q.shape[0]
        k_id, v_id = (t.to(q.dtype).expand(b, -1, -1, -1) for t in identity_kv)  # a view, no copy
        acc = attention_with_lse(q, k_id, v_id)
    kv = torch.stack([k, v])
    for step in range(size):
        source = (mesh.ring_index - step) % size
        pending: PendingShift | None = comm.ring_shift(kv) if step < size - 1 else None
        try:
            n = valid_keys[source]
            if n > 0:
                acc = merge(acc, attention_with_lse(q, kv[0, :, :n], kv[1, :, :n]))
        finally:
            # Even when the block failed, finish the shift: the peers posted their halves.
            if pending is not None:
                kv = pending.wait()
    if acc is None:
        raise RuntimeError("ring attention saw no valid keys; ring rank 0 must hold real tokens")
    return acc[0].to(q.dtype)
