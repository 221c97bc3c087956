"""Attention over one key block that also returns its log-sum-exp, for ring attention.

Ring attention merges partial results over disjoint key blocks exactly through their
log-sum-exp (LSE). Each kernel here returns `(out, lse)` without materialising the
Sq × Sk score matrix of a whole block in float32:

| backend      | where                          | kernel                                              |
|--------------|--------------------------------|-----------------------------------------------------|
| `flash3`     | CUDA fp16/bf16, flash-attn 3   | `flash_attn_interface.flash_attn_func`              |
| `flash2`     | CUDA fp16/bf16, flash-attn 2   | `flash_attn.flash_attn_func(return_attn_probs=True)`|
| `sdpa_flash` | CUDA fp16/bf16 (any torch)     | PyTorch's built-in FlashAttention-2 kernel          |
| `cpu_flash`  | CPU fp32/fp64/bf16             | PyTorch's blockwise CPU flash kernel                |
| `chunked`    | anywhere (e.g. CUDA fp32)      | exact math over query chunks (≤ `CHUNK_ELEMENTS`)   |

`STANDIN_RING_ATTENTION=<backend>` forces one. `BACKEND_CALLS` counts what actually ran (the
GPU suite reports it).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections import Counter

import torch

__all__ = [
    "BACKEND_CALLS",
    "LSE_BACKENDS",
    "BlockResult",
    "attention_with_lse",
    "merge",
    "select_lse_backend",
]

# (out [B, Sq, H, D], lse [B, Sq, H]), both float32 (float64 for float64 inputs)
BlockResult = tuple[torch.Tensor, torch.Tensor]

LSE_BACKENDS = ("flash3", "flash2", "sdpa_flash", "cpu_flash", "chunked")
_HAS_FLASH3 = importlib.util.find_spec("flash_attn_interface") is not None
_HAS_FLASH2 = importlib.util.find_spec("flash_attn") is not None
# Score elements one chunk of the `chunked` kernel may hold (64 Mi floats = 256 MiB in fp32).
CHUNK_ELEMENTS = 64 * 1024 * 1024
BACKEND_CALLS: Counter = Counter()
_FAILED: set[str] = set()  # fused kernels that refused an input (logged once, then not tried again)

log = logging.getLogger(__name__)


def select_lse_backend(q: torch.Tensor) -> str:
    """The kernel `attention_with_lse` uses for queries like q (see the module table)."""
    forced = os.environ.get("STANDIN_RING_ATTENTION")
    if forced:
        if forced not in LSE_BACKENDS:
            raise ValueError(f"STANDIN_RING_ATTENTION must be one of {LSE_BACKENDS}, got {forced!r}")
        return forced
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if _HAS_FLASH3:
            return "flash3"
        if _HAS_FLASH2:
            return "flash2"
        return "sdpa_flash"
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16):
        return "cpu_flash"
    return "chunked"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None
) -> BlockResult:
    """Softmax attention of q [B, Sq, H, D] over k/v [B, Sk, H, D] (no mask, scale D^-½).

    Returns out [B, Sq, H, D] and its log-sum-exp [B, Sq, H] (of the scaled scores), in float32
    (float64 for float64 inputs), for `merge`. backend None: `select_lse_backend`, and a fused
    kernel that raises falls back to `chunked` (logged once; `BACKEND_CALLS` shows it); a
    named backend is used as is.
    """
    if backend is None:
        backend = select_lse_backend(q)
        if backend in _FAILED:
            backend = "chunked"
        try:
            return _run(backend, q, k, v)
        except RuntimeError as exc:  # a fused kernel refusing this input (head dim, alignment, …)
            if backend == "chunked":
                raise
            _FAILED.add(backend)
            log.warning("ring attention: %s failed (%s); using the chunked kernel from now on", backend, exc)
            backend = "chunked"
    return _run(backend, q, k, v)


def _run(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> BlockResult:
    BACKEND_CALLS[backend] += 1
    acc = _acc_dtype(q.dtype)
    if backend == "chunked":
        return _chunked(q, k, v)
    if backend in ("flash2", "flash3"):
        out, lse = _flash_attn(backend, q, k, v)
        return out.to(acc), lse.transpose(1, 2).to(acc)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    if backend == "sdpa_flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh)
    elif backend == "cpu_flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh)
    else:
        raise ValueError(f"unknown LSE attention backend {backend!r}; one of {LSE_BACKENDS}")
    out, lse = res[0], res[1]  # [B, H, Sq, D], [B, H, Sq]
    return out.transpose(1, 2).to(acc), lse[..., : q.shape[1]].transpose(1, 2).to(acc)


def _flash_attn(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> BlockResult:
    if backend == "flash2":
        import flash_attn

        out, lse, _ = flash_attn.flash_attn_func(q, k, v, return_attn_probs=True)
        return out, lse
    import flash_attn_interface

    try:
        res = flash_attn_interface.flash_attn_func(q, k, v, return_attn_probs=True)
    except TypeError:  # early flash-attn 3 releases always return (out, lse)
        res = flash_attn_interface.flash_attn_func(q, k, v)
    return res[0], res[1]


def _chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> BlockResult:
    """Exact math, one query chunk at a time: at most CHUNK_ELEMENTS score floats live."""
    acc = _acc_dtype(q.dtype)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * h * sk))
    scale = d**-0.5
    kf, vf = k.to(acc), v.to(acc)
    outs, lses = [], []
    for start in range(0, sq, chunk):
        qc = q[:, start : start + chunk].to(acc)
        scores = torch.einsum("bqhd,bkhd->bhqk", qc, kf) * scale
        lse = torch.logsumexp(scores, dim=-1)
        scores.sub_(lse[..., None]).exp_()
        outs.append(torch.einsum("bhqk,bkhd->bqhd", scores, vf))
        lses.append(lse.transpose(1, 2))
        del scores
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def merge(acc: BlockResult | None, block: BlockResult) -> BlockResult:
    """Combine two partial attentions over disjoint key sets into the attention over their union."""
    if acc is None:
        return block
    out_a, lse_a = acc
    out_b, lse_b = block
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a * torch.exp(lse_a - lse)[..., None] + out_b * torch.exp(lse_b - lse)[..., None]
    return out, lse
