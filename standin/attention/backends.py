"""The attention kernels, one `Backend` each: what it needs, its plain call, its log-sum-exp call.

Every call takes q [B, Sq, H, D] and k/v [B, Sk, H, D] (no mask, scale D^-½). The plain call
returns out [B, Sq, H, D] in q's dtype; the LSE call returns `BlockResult`: out [B, Sq, H, D]
and lse [B, Sq, H], both float32 (float64 for float64 inputs), for `merge`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["BACKENDS", "CHUNK_ELEMENTS", "PACKAGES", "Backend", "BlockResult", "installed"]

# (out [B, Sq, H, D], lse [B, Sq, H]), float32 (float64 for float64 inputs)
BlockResult = tuple[torch.Tensor, torch.Tensor]
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LseKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], BlockResult]

# Score elements one chunk of the `chunked` kernel may hold (64 Mi floats = 256 MiB in fp32).
CHUNK_ELEMENTS = 64 * 1024 * 1024
_HALF = (torch.float16, torch.bfloat16)
PACKAGES = {"flash3": "flash_attn_interface", "flash2": "flash_attn", "sage": "sageattention"}
_INSTALLED = {name: importlib.util.find_spec(pkg) is not None for name, pkg in PACKAGES.items()}


def installed(name: str) -> bool:
    """Whether the backend's Python package is importable (PyTorch's own kernels always are)."""
    return _INSTALLED.get(name, True)


@dataclass(frozen=True)
class Backend:
    """One kernel family. `refuses(q)` is None when it can run queries like q, else the reason.

    split_kv: `restricted_attention` attends to the video and the identity K/V in two LSE calls
    merged exactly, instead of one call over their concatenation (a copy of all of K and V).
    False everywhere, by measurement: on CPU split/concat was 0.76–1.24 across sizes and dtypes
    with no consistent winner (benchmarks/results/attention_cpu.json), and on a GPU the second
    call re-reads Q and writes a second output, which the merge then reads: more bytes than
    the copy (the same JSON's "real_case": 57 vs 14 GB per step and GPU for Wan 14B 480p).
    """

    name: str
    plain: Kernel
    with_lse: LseKernel | None
    refuses: Callable[[torch.Tensor], str | None]
    split_kv: bool = False


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _heads_first(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.transpose(1, 2) for t in ts)  # [B, S, H, D] → [B, H, S, D], a view


def _block(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, heads_first: bool) -> BlockResult:
    """Kernel outputs → (out [B, Sq, H, D], lse [B, Sq, H]) in the accumulation dtype."""
    acc = _acc_dtype(q.dtype)
    b, sq, h, _ = q.shape
    if heads_first:
        out = out.transpose(1, 2)
    lse = lse.reshape(b, h, -1)[..., :sq]  # some kernels pad the LSE's query axis (efficient: ×32)
    return out.to(acc), lse.transpose(1, 2).to(acc)


# -- PyTorch SDPA ---------------------------------------------------------------------------


def _sdpa(kernel: SDPBackend | None) -> Kernel:
    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qh, kh, vh = _heads_first(q, k, v)
        if kernel is None:  # PyTorch's own choice
            return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2)
        with sdpa_kernel(kernel):
            return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2)

    return call


def _sdpa_flash_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> BlockResult:
    qh, kh, vh = _heads_first(q, k, v)
    if q.device.type == "cpu":
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh)
    else:
        res = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh)
    return _block(res[0], res[1], q, heads_first=True)


def _sdpa_efficient_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> BlockResult:
    qh, kh, vh = _heads_first(q, k, v)
    res = torch.ops.aten._scaled_dot_product_efficient_attention(qh, kh, vh, None, True)
    return _block(res[0], res[1], q, heads_first=True)


def _sdpa_cudnn_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> BlockResult:
    qh, kh, vh = _heads_first(q, k, v)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(qh, kh, vh, None, True)
    return _block(res[0], res[1], q, heads_first=True)


# -- FlashAttention 3 / 2, SageAttention (layout [B, S, H, D] natively) -------------------------


def _flash3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    import flash_attn_interface

    out = flash_attn_interface.flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out  # early releases always return (out, lse)


def _flash3_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> BlockResult:
    import flash_attn_interface

    try:
        res = flash_attn_interface.flash_attn_func(q, k, v, return_attn_probs=True)
    except TypeError:  # early releases have no return_attn_probs and always return (out, lse)
        res = flash_attn_interface.flash_attn_func(q, k, v)
    return _block(res[0], res[1], q, heads_first=False)  # lse [B, H, Sq]


def _flash2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    import flash_attn

    return flash_attn.flash_attn_func(q, k, v)


def _flash2_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> BlockResult:
    import flash_attn

    out, lse, _ = flash_attn.flash_attn_func(q, k, v, return_attn_probs=True)
    return _block(out, lse, q, heads_first=False)  # lse [B, H, Sq]


def _sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    import sageattention

    return sageattention.sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _sage_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> BlockResult:
    import sageattention

    out, lse = sageattention.sageattn(q, k, v, tensor_layout="NHD", is_causal=False, return_lse=True)
    return _block(out, lse, q, heads_first=False)  # lse [B, H, Sq]


# -- exact math over query chunks (anywhere, any dtype) ------------------------------------------


def chunked_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> BlockResult:
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


def _chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return chunked_with_lse(q, k, v)[0].to(q.dtype)


# -- what each kernel needs -----------------------------------------------------------------------


def _needs(
    name: str, devices: tuple[str, ...], dtypes: tuple[torch.dtype, ...] | None, max_head_dim: int | None
) -> Callable[[torch.Tensor], str | None]:
    def refuses(q: torch.Tensor) -> str | None:
        if not installed(name):
            return f"{PACKAGES[name]} is not installed"
        if q.device.type not in devices:
            return f"runs on {'/'.join(devices)}, not {q.device.type}"
        if dtypes is not None and q.dtype not in dtypes:
            return f"needs {'/'.join(str(d).removeprefix('torch.') for d in dtypes)}, not {q.dtype}"
        if max_head_dim is not None and q.shape[-1] > max_head_dim:
            return f"head dim ≤ {max_head_dim}, not {q.shape[-1]}"
        return None

    return refuses


def _sdpa_flash_refuses(q: torch.Tensor) -> str | None:
    if q.device.type == "cpu":  # PyTorch's CPU flash kernel takes any float dtype and head dim
        return None
    return _needs("sdpa_flash", ("cuda",), _HALF, 256)(q)


_ANYWHERE = ("cpu", "cuda", "mps", "xpu")
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("flash3", _flash3, _flash3_lse, _needs("flash3", ("cuda",), _HALF, 256)),
        Backend("flash2", _flash2, _flash2_lse, _needs("flash2", ("cuda",), _HALF, 256)),
        Backend("sage", _sage, _sage_lse, _needs("sage", ("cuda",), _HALF, 128)),
        Backend("sdpa", _sdpa(None), None, _needs("sdpa", _ANYWHERE, None, None)),
        Backend("sdpa_cudnn", _sdpa(SDPBackend.CUDNN_ATTENTION), _sdpa_cudnn_lse,
                _needs("sdpa_cudnn", ("cuda",), _HALF, 128)),
        Backend("sdpa_flash", _sdpa(SDPBackend.FLASH_ATTENTION), _sdpa_flash_lse, _sdpa_flash_refuses),
        Backend("sdpa_efficient", _sdpa(SDPBackend.EFFICIENT_ATTENTION), _sdpa_efficient_lse,
                _needs("sdpa_efficient", ("cuda",), None, None)),
        Backend("sdpa_math", _sdpa(SDPBackend.MATH), None, _needs("sdpa_math", _ANYWHERE, None, None)),
        Backend("chunked", _chunked, chunked_with_lse, _needs("chunked", _ANYWHERE, None, None)),
    )
}
