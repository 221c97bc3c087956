"""The low-rank adapter Stand-In adds to the identity tokens' Q/K/V projections."""

from __future__ import annotations

import torch
from torch import nn


class LoRA(nn.Module):
    """x ↦ up(down(x)), no bias, no scaling (as the released checkpoints were trained).

    `up` starts at zero so an untrained adapter leaves the base model unchanged.
    Keys: `down.weight` [rank, in], `up.weight` [out, rank].
    """

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))
