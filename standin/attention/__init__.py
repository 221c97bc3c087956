"""One attention entry point with interchangeable kernels, for every attention in the model.

Layout everywhere is [B, S, H, D] (FlashAttention's), so sequence-parallel code can split S or
H without transposes. `attention` is plain softmax attention; `attention_with_lse` also returns
the log-sum-exp, which `merge` uses to combine attentions over disjoint key blocks exactly (ring
attention's blocks, and the identity block of `restricted_attention` when split-KV is on).

| backend          | runs on                         | kernel                                    | LSE |
|------------------|---------------------------------|-------------------------------------------|-----|
| `flash3`         | CUDA fp16/bf16, D ≤ 256         | FlashAttention-3 (`flash_attn_interface`) | yes |
| `flash2`         | CUDA fp16/bf16, D ≤ 256         | FlashAttention-2 (`flash_attn`)           | yes |
| `sage`           | CUDA fp16/bf16, D ≤ 128         | SageAttention `sageattn` (INT8 Q·K)       | yes |
| `sdpa`           | anywhere                        | PyTorch SDPA, PyTorch picks the kernel    | no  |
| `sdpa_cudnn`     | CUDA fp16/bf16, D ≤ 128         | SDPA's cuDNN kernel                       | yes |
| `sdpa_flash`     | CUDA fp16/bf16 D ≤ 256; any CPU | SDPA's FlashAttention-2 kernel / CPU flash | yes |
| `sdpa_efficient` | CUDA, any float dtype           | SDPA's memory-efficient kernel            | yes |
| `sdpa_math`      | anywhere                        | SDPA's reference math                     | no  |
| `chunked`        | anywhere                        | exact math over query chunks (≤ 256 MiB)  | yes |

Choice rules:
- The setting: `configure_attention(name)` (a server calls it at replica start), else the
  `STANDIN_ATTENTION` environment variable, else "auto". Names outside the table, or whose
  package is not installed, raise ValueError listing the choices.
- "auto": CUDA fp16/bf16 → flash3, flash2, sdpa_flash, sdpa_efficient (first that is installed
  and takes the head dim); CUDA fp32/fp64 → sdpa_efficient; CPU → sdpa_flash. `sage` (quantised,
  so not exact) and `sdpa_cudnn` run only when named.
- A named backend that cannot run an input (device, dtype, head dim, or no LSE where one is
  needed) gives way to the "auto" choice for it, with one warning.
- A fused kernel that raises on an input is not tried again: plain calls go to `sdpa`, LSE calls
  to `chunked` (one warning).
- The first call of each backend per device and dtype is logged once per process, e.g.
  "attention: flash3 (bf16, cuda:0)"; `BACKEND_CALLS` counts eager calls ("<name>+lse" for LSE).
- The identity block: concatenated to the video K/V (one kernel call) unless the backend's
  `split_kv` says to merge it by LSE (or the caller passes split_kv=True). Every backend has
  `split_kv=False`: on CPU neither path wins consistently, and by traffic arithmetic the merge
  moves more bytes than the copy on a GPU (benchmarks/attention.py,
  benchmarks/results/attention_cpu.json).
"""

from standin.attention.backends import BACKENDS, Backend, BlockResult
from standin.attention.dispatch import attention, attention_with_lse, merge, restricted_attention
from standin.attention.selection import (
    AUTO,
    BACKEND_CALLS,
    CHOICES,
    ENV_VAR,
    configure_attention,
    configured_setting,
    select_backend,
    select_lse_backend,
)

__all__ = [
    "AUTO",
    "BACKENDS",
    "BACKEND_CALLS",
    "CHOICES",
    "ENV_VAR",
    "Backend",
    "BlockResult",
    "attention",
    "attention_with_lse",
    "configure_attention",
    "configured_setting",
    "merge",
    "restricted_attention",
    "select_backend",
    "select_lse_backend",
]

