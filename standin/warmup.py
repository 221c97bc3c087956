"""Warm-up: one tiny forward through a plan before the first request, so that what happens on a
first call (torch.compile of `compiled_blocks`, kernel selection, allocator growth) is paid at
replica start and not by a user's job.

Under a sharded plan (parallel/'s `ShardedDiT.plan`) the forward has collectives: every process of
the group calls `warm_up` with the same arguments, in lockstep, like any other forward.
"""

from __future__ import annotations

import time

import torch

from standin.dit import WanDiT
from standin.forward_plan import LOCAL, ForwardPlan

__all__ = ["warm_up"]


@torch.no_grad()
def warm_up(
    model: WanDiT,
    plan: ForwardPlan = LOCAL,
    *,
    batch: int = 1,
    video_tokens: tuple[int, int, int] = (2, 6, 8),
    identity_tokens: tuple[int, int] = (2, 2),
    context_len: int = 8,
    without_identity: bool = True,
) -> float:
    """Run `plan`'s identity cache and forward once on random inputs; returns the seconds it took.

    The sizes are small on purpose: `compiled_blocks(dynamic=True)` compiles graphs that hold for
    every token count, except that torch specialises dimensions of size 1. So `batch` must be the
    batch the requests will use (1 with separate CFG passes), and the grids here stay above 1.
    video_tokens: the (f, h, w) token grid of the warm-up video; identity_tokens: (h, w) of the
    face; without_identity: also run a forward without identity (text-only requests, their own
    graph). Every process of a sharded plan must pass the same arguments.
    """
    cfg = model.config
    param = next(model.parameters())
    device = param.device
    pt, ph, pw = cfg.patch_size
    f, h, w = video_tokens
    gen = torch.Generator().manual_seed(0)  # the same inputs on every process of a group

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device)

    latents = noise(batch, cfg.in_dim, f * pt, h * ph, w * pw)
    face = noise(1, cfg.in_dim, 1, identity_tokens[0] * ph, identity_tokens[1] * pw)
    context = noise(batch, context_len, cfg.text_dim)
    timestep = torch.full((batch,), 500.0, device=device)
    start = time.perf_counter()
    identity = model.identity_cache(face, latents.shape, plan=plan)
    model(latents, timestep, context, identity, plan=plan)
    if without_identity:
        model(latents, timestep, context, plan=plan)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
