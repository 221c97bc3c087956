"""The entry points: plain attention, attention with its log-sum-exp, their exact merge, and
Stand-In's restricted attention (video queries over [video K/V; identity K/V])."""

from __future__ import annotations

import torch

from standin.attention.backends import BACKENDS, Backend, BlockResult
from standin.attention.selection import choose, note_call, note_failure

__all__ = ["attention", "attention_with_lse", "merge", "restricted_attention"]

# What a fused kernel raises on an input it does not take (head dim, alignment, GPU arch, …);
# SageAttention checks its inputs with assert.
_REFUSALS = (RuntimeError, ValueError, AssertionError)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention, no mask. q [B, Sq, H, D], k/v [B, Sk, H, D] → [B, Sq, H, D] in q's dtype."""
    backend = choose(q, lse=False)
    if torch.compiler.is_compiling():  # the graph holds the kernel; no Python fallback inside it
        return backend.plain(q, k, v)
    try:
        out = backend.plain(q, k, v)
    except _REFUSALS as exc:
        if backend.name == "sdpa":
            raise
        backend = note_failure(backend, lse=False, exc=exc)
        out = backend.plain(q, k, v)
    note_call(backend, q, lse=False)
    return out


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None
) -> BlockResult:
    """Softmax attention of q [B, Sq, H, D] over k/v [B, Sk, H, D] and its log-sum-exp.

    Returns out [B, Sq, H, D] and lse [B, Sq, H] (of the scaled scores), float32 (float64 for
    float64 inputs), for `merge`. backend None: the configured choice, and a fused kernel that
    raises falls back to `chunked` (logged once); a named backend is used as is.
    """
    if backend is not None:
        chosen = BACKENDS[backend]
        block = _with_lse(chosen, q, k, v)
        note_call(chosen, q, lse=True)
        return block
    chosen = choose(q, lse=True)
    try:
        block = _with_lse(chosen, q, k, v)
    except _REFUSALS as exc:
        if chosen.name == "chunked":
            raise
        chosen = note_failure(chosen, lse=True, exc=exc)
        block = _with_lse(chosen, q, k, v)
    note_call(chosen, q, lse=True)
    return block


def _with_lse(backend: Backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> BlockResult:
    if backend.with_lse is None:
        raise ValueError(f"attention backend {backend.name!r} returns no log-sum-exp")
    return backend.with_lse(q, k, v)


def merge(acc: BlockResult | None, block: BlockResult) -> BlockResult:
    """Combine partial attentions over disjoint key sets into the attention over their union.

    The union's softmax weighs block b by exp(lse_b − logaddexp(lse_a, lse_b)) = σ(lse_b − lse_a):
    one lerp, no S×S matrix.
    """
    if acc is None:
        return block
    out_a, lse_a = acc
    out_b, lse_b = block
    out = torch.lerp(out_a, out_b, torch.sigmoid(lse_b - lse_a).unsqueeze(-1))
    return out, torch.logaddexp(lse_a, lse_b)


def restricted_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    identity_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    split_kv: bool | None = None,
) -> torch.Tensor:
    """Stand-In's restricted self-attention for video queries.

    q/k/v [B, S, H, D] are the video tokens' (RoPE applied); identity_kv holds the identity
    tokens' K and V [B or 1, S_id, H, D] (broadcast over the batch, not copied). Video queries
    attend to [video K; identity K]: one call over the concatenation, or (split_kv) two calls
    with their log-sum-exp merged exactly. split_kv None: the backend's own `split_kv`. The
    identity tokens' own attention (identity → identity only) happens when their cache is built.
    """
    if identity_kv is None:
        return attention(q, k, v)
    b = q.shape[0]
    k_id, v_id = (t.to(q.dtype).expand(b, -1, -1, -1) for t in identity_kv)
    if split_kv is None:
        backend = choose(q, lse=False)
        split_kv = backend.split_kv and backend.with_lse is not None
    if split_kv:
        out, _ = merge(attention_with_lse(q, k, v), attention_with_lse(q, k_id, v_id))
        return out.to(q.dtype)
    return attention(q, torch.cat([k, k_id], dim=1), torch.cat([v, v_id], dim=1))
