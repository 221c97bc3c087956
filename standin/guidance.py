"""Classifier-free guidance: one velocity from the positive and negative passes.

Shared by the single-process pipeline and the sequence-parallel runner (which may instead run
the two passes on the two halves of its mesh and combine them with `combine_guidance`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

__all__ = ["ModelCall", "combine_guidance", "guided_velocity"]

# (latents [B, C, F, H, W], timestep [B], context [B, L, text_dim]) → velocity [B, C, F, H, W];
# the caller's closure holds the request's identity cache and adapters.
ModelCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def combine_guidance(positive: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """neg + scale · (pos − neg)."""
    return negative + scale * (positive - negative)


def guided_velocity(
    call: ModelCall,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    negative_context: torch.Tensor | None,
    scale: float,
    cfg_mode: Literal["separate", "batched"] = "separate",
) -> torch.Tensor:
    """The guided velocity of one step: one pass when guidance is off (scale 1 or no negative
    prompt), else the positive and negative passes as two calls or one call of batch 2B.

    latents [B, C, F, H, W], timestep [B], contexts [B, L, text_dim] → [B, C, F, H, W].
    """
    if negative_context is None or scale == 1.0:
        return call(latents, timestep, context)
    if cfg_mode == "batched":
        b = latents.shape[0]
        both = call(
            torch.cat([latents, latents]),
            torch.cat([timestep, timestep]),
            torch.cat([context, negative_context]),
        )
        return combine_guidance(both[:b], both[b:], scale)
    return combine_guidance(
        call(latents, timestep, context), call(latents, timestep, negative_context), scale
    )
