"""An independent float64 Stand-In + VACE forward, written from the official formulation.

Like tests/reference_dit.py (whose float64 primitives it uses): video and identity tokens are
one concatenated sequence with an explicit restricted-attention mask and complex RoPE, nothing
is cached. The VACE part follows Wan2.1's `forward_vace` eagerly: every hint is computed before
the main loop (c = before_proj(patchify(vace_context)) + x, then each VACE block on c, hint =
after_proj(c)), on the video tokens only; after main block `layers[j]`, x += scale · hint_j.
The mask folding is written with explicit loops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from standin.config import DiTConfig
from tests.reference_dit import D, _attend, _freq_table, _gelu_tanh, _lin, _ln, _rms, _rope, _sinusoid


def fold_mask_reference(mask: torch.Tensor, latent_frames: int, block: int = 8) -> torch.Tensor:
    """mask [T, H, W] → [block², latent_frames, H/block, W/block]: channel p·block + q holds
    pixel (row·block + p, column·block + q); latent frame i takes pixel frame
    floor((i + 0.5) · T / latent_frames) (nearest-exact)."""
    t, h, w = mask.shape
    out = torch.zeros(block * block, latent_frames, h // block, w // block, dtype=mask.dtype)
    for i in range(latent_frames):
        src = min(math.floor((i + 0.5) * t / latent_frames), t - 1)
        for p in range(block):
            for q in range(block):
                out[p * block + q, i] = mask[src, p::block, q::block]
    return out


def _block(sd, p, x, e, ctx, freqs, heads, eps, mask, n_video, lora_rows):
    """One Wan block on x [B, n, C]; cross-attention for the first n_video tokens only;
    e [B, n, 6, C] per-token modulation; LoRA added to rows ≥ n_video when lora_rows."""
    sh_a, sc_a, g_a, sh_f, sc_f, g_f = e.unbind(2)
    hin = _ln(x, eps) * (1 + sc_a) + sh_a
    q, k, v = (_lin(sd, p + f"self_attn.{m}", hin) for m in "qkv")
    if lora_rows and f"{p}self_attn.q_loras.down.weight" in sd:
        for name, t in (("q", q), ("k", k), ("v", v)):
            down = _lin(sd, p + f"self_attn.{name}_loras.down", hin)
            lora = _lin(sd, p + f"self_attn.{name}_loras.up", down)
            t[:, n_video:] += lora[:, n_video:]
    q = _rope(_rms(sd, p + "self_attn.norm_q", q, eps), freqs, heads)
    k = _rope(_rms(sd, p + "self_attn.norm_k", k, eps), freqs, heads)
    x = x + _lin(sd, p + "self_attn.o", _attend(q, k, v, heads, mask)) * g_a
    xv = x[:, :n_video]
    normed = _ln(xv, eps, sd[p + "norm3.weight"], sd[p + "norm3.bias"])
    cq = _rms(sd, p + "cross_attn.norm_q", _lin(sd, p + "cross_attn.q", normed), eps)
    ck = _rms(sd, p + "cross_attn.norm_k", _lin(sd, p + "cross_attn.k", ctx), eps)
    cv = _lin(sd, p + "cross_attn.v", ctx)
    xv = xv + _lin(sd, p + "cross_attn.o", _attend(cq, ck, cv, heads))
    x = torch.cat([xv, x[:, n_video:]], 1)
    hin = _ln(x, eps) * (1 + sc_f) + sh_f
    return x + _lin(sd, p + "ffn.2", _gelu_tanh(_lin(sd, p + "ffn.0", hin))) * g_f


def reference_vace_forward(
    sd: dict,
    cfg: DiTConfig,
    layers: tuple[int, ...],
    latents: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    vace_context: torch.Tensor,
    scale: float,
    identity_latents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Returns (velocity [B, C, F, H, W], the hints [B, S, C] in VACE block order).

    `sd` holds the DiT's and the VACE branch's tensors under their official keys.
    """
    heads, hd, eps = cfg.num_heads, cfg.head_dim, cfg.eps
    pt, ph, pw = cfg.patch_size

    def patch(x, name):
        y = F.conv3d(x.to(D), sd[f"{name}.weight"].to(D), sd[f"{name}.bias"].to(D), stride=cfg.patch_size)
        return y.flatten(2).transpose(1, 2), y.shape[2:]

    x, (f, h, w) = patch(latents, "patch_embedding")
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

    video_freqs = freqs_for(torch.arange(f), torch.arange(h), torch.arange(w))

    def tmod(t):
        e = _lin(sd, "time_embedding.2", F.silu(_lin(sd, "time_embedding.0", _sinusoid(cfg.freq_dim, t))))
        return e, _lin(sd, "time_projection.1", F.silu(e)).reshape(-1, 6, cfg.dim)

    t_emb, e_video = tmod(timestep)
    _, e_id = tmod(torch.zeros_like(timestep))
    ctx = _lin(sd, "text_embedding.2", _gelu_tanh(_lin(sd, "text_embedding.0", context.to(D))))

    # VACE: all hints first, on video tokens only (no identity, full attention).
    vc = vace_context.to(D).expand(bsz, *vace_context.shape[1:])
    c, _ = patch(vc, "vace_patch_embedding")
    c = _lin(sd, "vace_blocks.0.before_proj", c) + x
    hints = []
    full = torch.ones(n_video, n_video, dtype=torch.bool)
    for j in range(len(layers)):
        p = f"vace_blocks.{j}."
        e = (sd[p + "modulation"].to(D) + e_video)[:, None].expand(bsz, n_video, 6, cfg.dim)
        c = _block(sd, p, c, e, ctx, video_freqs, heads, eps, full, n_video, lora_rows=False)
        hints.append(_lin(sd, p + "after_proj", c))

    freqs = video_freqs
    n_id = 0
    if identity_latents is not None:
        x_id, (_, hi, wi) = patch(identity_latents, "patch_embedding")
        n_id = x_id.shape[1]
        id_freqs = freqs_for(torch.tensor([-1]), torch.arange(h, h + hi), torch.arange(w, w + wi))
        freqs = torch.cat([freqs, id_freqs])
        x = torch.cat([x, x_id.expand(bsz, -1, -1)], 1)
    n = n_video + n_id
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[n_video:, :n_video] = False
    is_id = torch.zeros(n, dtype=torch.bool)
    is_id[n_video:] = True
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        mod = sd[p + "modulation"].to(D)
        e = torch.where(is_id[None, :, None, None], (mod + e_id)[:, None], (mod + e_video)[:, None])
        x = _block(sd, p, x, e, ctx, freqs, heads, eps, mask, n_video, lora_rows=True)
        if i in layers:
            hint = hints[layers.index(i)]
            x = torch.cat([x[:, :n_video] + scale * hint, x[:, n_video:]], 1)
    xv = x[:, :n_video]
    shift, sc = (sd["head.modulation"].to(D) + t_emb[:, None]).unbind(1)
    out = _lin(sd, "head.head", _ln(xv, eps) * (1 + sc[:, None]) + shift[:, None])
    out = out.reshape(bsz, f, h, w, pt, ph, pw, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return out.reshape(bsz, cfg.out_dim, f * pt, h * ph, w * pw), hints
