"""An independent float64 Stand-In forward, written from the paper's equations.

It follows the official formulation rather than ours: video and identity tokens are one
concatenated sequence, restricted attention is an explicit boolean mask (identity rows may
not see video columns), RoPE is complex multiplication with tables that start at position
−1, and nothing is cached. Weights come from a state dict with the official key names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from standin.config import DiTConfig

D = torch.float64


def _lin(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    w = sd[f"{name}.weight"].to(D)
    b = sd.get(f"{name}.bias")
    return x @ w.T + (b.to(D) if b is not None else 0)


def _rms(sd: dict, name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * sd[f"{name}.weight"].to(D)


def _ln(x: torch.Tensor, eps: float, w=None, b=None) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y * w.to(D) + b.to(D) if w is not None else y


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _freq_table(dim: int, max_pos: int) -> torch.Tensor:
    """Complex table indexed by position + 1 (row 0 is position −1)."""
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=D) / dim))
    pos = torch.arange(-1, max_pos, dtype=D)
    return torch.polar(torch.ones(len(pos), len(inv), dtype=D), torch.outer(pos, inv))


def _rope(x: torch.Tensor, freqs: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, c = x.shape
    xc = torch.view_as_complex(x.reshape(b, s, heads, -1, 2).contiguous())
    return torch.view_as_real(xc * freqs[None, :, None, :]).reshape(b, s, c)


def _attend(q, k, v, heads, mask=None):
    b, s, c = q.shape
    q, k, v = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(c // heads)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, c)


def _sinusoid(dim: int, t: torch.Tensor) -> torch.Tensor:
    half = dim // 2
    ang = torch.outer(t.to(D), 10000 ** (-torch.arange(half, dtype=D) / half))
    return torch.cat([ang.cos(), ang.sin()], 1)


def reference_forward(
    sd: dict,
    cfg: DiTConfig,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    identity_latents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Returns (velocity [B, C, F, H, W], per-layer identity (K, V) as [B, S_id, dim])."""
    heads, hd, eps = cfg.num_heads, cfg.head_dim, cfg.eps
    pt, ph, pw = cfg.patch_size

    def patch(x):
        y = F.conv3d(x.to(D), sd["patch_embedding.weight"].to(D), sd["patch_embedding.bias"].to(D),
                     stride=cfg.patch_size)
        return y.flatten(2).transpose(1, 2), y.shape[2:]

    x, (f, h, w) = patch(latents)
    bsz, n_video = x.shape[0], x.shape[1]
    c_half = hd // 2
    split = [c_half - 2 * (c_half // 3), c_half // 3, c_half // 3]
    tables = [_freq_table(2 * n, 256) for n in split]

    def freqs_for(fr, rows, cols):
        parts = [
            tables[0][fr + 1][:, None, None, :].expand(len(fr), len(rows), len(cols), -1),
            tables[1][rows + 1][None, :, None, :].expand(len(fr), len(rows), len(cols), -1),
            tables[2][cols + 1][None, None, :, :].expand(len(fr), len(rows), len(cols), -1),
        ]
        return torch.cat(parts, -1).reshape(-1, c_half)

    freqs = freqs_for(torch.arange(f), torch.arange(h), torch.arange(w))
    n_id = 0
    if identity_latents is not None:
        x_id, (_, hi, wi) = patch(identity_latents)
        x_id = x_id.expand(bsz, -1, -1)
        n_id = x_id.shape[1]
        freqs = torch.cat([freqs, freqs_for(torch.tensor([-1]), torch.arange(h, h + hi),
                                            torch.arange(w, w + wi))])
        x = torch.cat([x, x_id], 1)
    # Restricted attention: identity queries see identity keys only.
    n = n_video + n_id
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[n_video:, :n_video] = False

    def tmod(t):
        e = _lin(sd, "time_embedding.2", F.silu(_lin(sd, "time_embedding.0", _sinusoid(cfg.freq_dim, t))))
        return e, _lin(sd, "time_projection.1", F.silu(e)).reshape(-1, 6, cfg.dim)

    t_emb, e_video = tmod(timestep)
    _, e_id = tmod(torch.zeros_like(timestep))
    ctx = _lin(sd, "text_embedding.2", _gelu_tanh(_lin(sd, "text_embedding.0", context.to(D))))
    is_id = torch.zeros(n, dtype=torch.bool)
    is_id[n_video:] = True
    id_kv = []
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        mod = sd[p + "modulation"].to(D)
        ev, ei = mod + e_video, mod + e_id  # [B, 6, dim]
        e = torch.where(is_id[None, :, None, None], ei[:, None], ev[:, None])  # [B, n, 6, dim]
        sh_a, sc_a, g_a, sh_f, sc_f, g_f = e.unbind(2)
        hin = _ln(x, eps) * (1 + sc_a) + sh_a
        q, k, v = (_lin(sd, p + f"self_attn.{m}", hin) for m in "qkv")
        if identity_latents is not None and f"{p}self_attn.q_loras.down.weight" in sd:
            for name, t in (("q", q), ("k", k), ("v", v)):
                lora = _lin(sd, p + f"self_attn.{name}_loras.up",
                            _lin(sd, p + f"self_attn.{name}_loras.down", hin))
                t[:, n_video:] += lora[:, n_video:]
        q = _rope(_rms(sd, p + "self_attn.norm_q", q, eps), freqs, heads)
        k = _rope(_rms(sd, p + "self_attn.norm_k", k, eps), freqs, heads)
        id_kv.append((k[:, n_video:], v[:, n_video:]))
        x = x + _lin(sd, p + "self_attn.o", _attend(q, k, v, heads, mask)) * g_a
        # Cross-attention for video tokens only.
        xv = x[:, :n_video]
        cq = _rms(sd, p + "cross_attn.norm_q",
                  _lin(sd, p + "cross_attn.q", _ln(xv, eps, sd[p + "norm3.weight"], sd[p + "norm3.bias"])),
                  eps)
        ck = _rms(sd, p + "cross_attn.norm_k", _lin(sd, p + "cross_attn.k", ctx), eps)
        cv = _lin(sd, p + "cross_attn.v", ctx)
        xv = xv + _lin(sd, p + "cross_attn.o", _attend(cq, ck, cv, heads))
        x = torch.cat([xv, x[:, n_video:]], 1)
        hin = _ln(x, eps) * (1 + sc_f) + sh_f
        x = x + _lin(sd, p + "ffn.2", _gelu_tanh(_lin(sd, p + "ffn.0", hin))) * g_f
    xv = x[:, :n_video]
    shift, scale = (sd["head.modulation"].to(D) + t_emb[:, None]).unbind(1)
    out = _lin(sd, "head.head", _ln(xv, eps) * (1 + scale[:, None]) + shift[:, None])
    out = out.reshape(bsz, f, h, w, pt, ph, pw, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return out.reshape(bsz, cfg.out_dim, f * pt, h * ph, w * pw), id_kv
