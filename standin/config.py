"""Model configurations (data only; the named presets are standin/presets.py).

Dimensions of the real presets are those of the official Wan2.1 releases; `tiny` has the
same architecture at sizes that run in milliseconds on a CPU, for tests and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The dtypes a user can name (CLI flags, serve settings).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DiTConfig:
    """Wan2.1 text-to-video DiT with Stand-In's identity branch (lora_rank 0: no LoRA)."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    lora_rank: int = 128

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (RoPE rotates pairs)")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim {self.freq_dim} must be even")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


# The DiTs of the presets (named in standin/presets.py, the one registry).
TINY_DIT = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, freq_dim=32, lora_rank=8)
WAN21_1_3B_DIT = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
WAN21_14B_DIT = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
