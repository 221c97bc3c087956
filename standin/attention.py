"""One attention entry point with interchangeable kernels.

Layout everywhere is [B, S, H, D] (FlashAttention's), so sequence-parallel code can split
S or H without transposes. `STANDIN_ATTENTION=sdpa|flash2|flash3` forces a backend; by
default FlashAttention 3, then 2, is used for fp16/bf16 CUDA tensors when installed, and
PyTorch SDPA otherwise (CPU, fp32, or no flash-attn).
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

_HAS_FLASH3 = importlib.util.find_spec("flash_attn_interface") is not None
_HAS_FLASH2 = importlib.util.find_spec("flash_attn") is not None
BACKENDS = ("sdpa", "flash2", "flash3")


def select_backend(q: torch.Tensor) -> str:
    forced = os.environ.get("STANDIN_ATTENTION")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"STANDIN_ATTENTION must be one of {BACKENDS}, got {forced!r}")
        return forced
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if _HAS_FLASH3:
            return "flash3"
        if _HAS_FLASH2:
            return "flash2"
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention, no mask. q [B, Sq, H, D], k/v [B, Sk, H, D] → [B, Sq, H, D]."""
    backend = select_backend(q)
    if backend == "flash3":
        import flash_attn_interface

        out = flash_attn_interface.flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    if backend == "flash2":
        import flash_attn

        return flash_attn.flash_attn_func(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def restricted_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    identity_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Stand-In's restricted self-attention for video queries.

    q/k/v [B, S, H, D] are the video tokens' (RoPE applied); identity_kv holds the identity
    tokens' K and V [B or 1, S_id, H, D]. Video queries attend to [video K; identity K]. The
    identity tokens' own attention (identity → identity only) happens when their cache is built.
    """
    if identity_kv is not None:
        k_id, v_id = identity_kv
        b = q.shape[0]
        k = torch.cat([k, k_id.to(k.dtype).expand(b, -1, -1, -1)], dim=1)
        v = torch.cat([v, v_id.to(v.dtype).expand(b, -1, -1, -1)], dim=1)
    return attention(q, k, v)
