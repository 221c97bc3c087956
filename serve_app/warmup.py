"""The warm-up request a DiT replica runs once, on every rank, before it takes jobs.

The first real request would otherwise pay for what only happens once per process: compiling
the DiT blocks (`compile_blocks`), the attention kernel's selection and first launch, NCCL's lazy
communicator set-up and the CUDA caching allocator's first growth. The warm-up goes through the
same runner path as a job — identity cache, both CFG passes, one Euler step, the sequence-parallel
collectives, and the VAE decode when the ranks decode — on a tiny video, so it costs little beyond
those one-time costs. With `dynamic=True` compilation its graphs serve every later video size.
This is the runner-level warm-up (every rank, the request path); `standin.warmup.warm_up` is the
model-level one for a single forward.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from parallel import DenoiseRequest, SPRunner

log = logging.getLogger(__name__)

# Tokens per frame side and frames: 2 × 4 × 4 = 32 tokens (8 × 8 latents with the 1×2×2 patch).
WARMUP_FRAMES = 2
WARMUP_SIDE = 4
WARMUP_TEXT_TOKENS = 8


def warmup_request(runner: SPRunner) -> DenoiseRequest:
    """A one-step request with identity and guidance, shaped for the runner's model; decoded on
    the ranks when the runner has a VAE (`decode_on: dit`), which needs a latent row per rank."""
    config = runner.model.config
    pt, ph, pw = config.patch_size
    token_rows = max(WARMUP_SIDE, -(-runner.mesh.world_size // ph))  # ≥ 1 latent row per rank
    shape = (1, config.in_dim, WARMUP_FRAMES * pt, token_rows * ph, WARMUP_SIDE * pw)
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(1, WARMUP_TEXT_TOKENS, config.text_dim, generator=generator)
    return DenoiseRequest(
        latents=torch.randn(shape, generator=generator),
        context=context,
        negative_context=torch.zeros_like(context),
        identity_latents=torch.randn(1, config.in_dim, 1, *shape[-2:], generator=generator),
        num_steps=1,
        guidance=5.0,
        decode=runner.vae is not None,
    )


def warm_up_replica(runner: SPRunner) -> float:
    """Run the warm-up requests (rank 0; the workers must be in `serve_forever`); their seconds.

    Two requests: with identity, and text-only (a forward without identity is its own graph)."""
    start = time.perf_counter()
    request = warmup_request(runner)
    runner.generate(request)
    runner.generate(replace(request, identity_latents=None, decode=False))
    seconds = time.perf_counter() - start
    log.info("DiT replica warmed up in %.1f s", seconds)
    return seconds
