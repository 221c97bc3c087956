"""The warm-up request a DiT replica runs once, on every rank, before it takes jobs.

The first real request would otherwise pay for what only happens once per process: compiling
the DiT blocks (`compile_blocks`), the attention kernel's selection and first launch, NCCL's lazy
communicator set-up and the CUDA caching allocator's first growth. The warm-up goes through the
same runner path as a job — identity cache, both CFG passes, one Euler step, the sequence-parallel
collectives — on the smallest video the model takes, so it costs little beyond those one-time
costs. With `dynamic=True` compilation the graphs it compiles serve every later video size.
"""

from __future__ import annotations

import logging
import time

import torch

from parallel import DenoiseRequest, SPRunner

log = logging.getLogger(__name__)

# Latent frames and latent pixels per side: 2 × 4 × 4 latents = 8 tokens with the 1×2×2 patch.
WARMUP_FRAMES = 2
WARMUP_SIDE = 4
WARMUP_TEXT_TOKENS = 8


def warmup_request(runner: SPRunner) -> DenoiseRequest:
    """A one-step request with identity and guidance, shaped for the runner's model."""
    config = runner.model.config
    pt, ph, pw = config.patch_size
    shape = (1, config.in_dim, WARMUP_FRAMES * pt, WARMUP_SIDE * ph, WARMUP_SIDE * pw)
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(1, WARMUP_TEXT_TOKENS, config.text_dim, generator=generator)
    return DenoiseRequest(
        latents=torch.randn(shape, generator=generator),
        context=context,
        negative_context=torch.zeros_like(context),
        identity_latents=torch.randn(1, config.in_dim, 1, *shape[-2:], generator=generator),
        num_steps=1,
        guidance=5.0,
    )


def warm_up(runner: SPRunner) -> float:
    """Run the warm-up request (rank 0; the workers must be in `serve_forever`); its seconds."""
    start = time.perf_counter()
    runner.generate(warmup_request(runner))
    seconds = time.perf_counter() - start
    log.info("DiT replica warmed up in %.1f s", seconds)
    return seconds
