"""Fit the tiny VAE so that decode inverts encode on the synthetic data.

A random VAE does not invert, so a DiT trained on its latents would decode to noise. Trained
end to end as an autoencoder, the Wan2.1 architecture at dim 8 learns too slowly on a 2-core CPU
(its latents start almost independent of the input). So the tiny VAE is fitted against a fixed,
documented latent code instead, which makes both halves plain supervised regressions:

    latent frame 0 ← video frame 0, latent frame k ← frames 4k-3 … 4k (the VAE's grouping);
    per 8×8 pixel block and latent frame, 16 channels (× `CODE_SCALE`, for about unit variance):
      0-11  the mean RGB of the block's four 4×4 quadrants, averaged over the group's frames
      12-15 the mean luminance of the whole block in each frame of the group (frame 0 repeated)

The encoder learns x ↦ code(x); the decoder learns code(x) (+ a little noise) ↦ x, i.e. to draw
sharp frames from the coarse colours and per-frame motion cues. The real presets use the
official Wan2.1 VAE and never run this.

Fitting runs `WanVAE.encode_latents` / `decode_frames` (unclamped) with autograd on: the same
chunking in time, causal caches and normalisation as inference.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from standin.vae import WanVAE

log = logging.getLogger(__name__)

CODE_SCALE = 2.0
_LUMA = (0.299, 0.587, 0.114)


def latent_code(video: torch.Tensor, block: int = 8) -> torch.Tensor:
    """The fixed code the tiny VAE is fitted to: [B, 3, F, H, W] → [B, 16, 1 + (F-1)/4, H/8, W/8]."""
    groups = [video[:, :, :1]]
    if video.shape[2] > 1:
        groups += list(video[:, :, 1:].split(4, dim=2))
    luma = torch.tensor(_LUMA, dtype=video.dtype, device=video.device).view(1, 3, 1, 1, 1)
    out = []
    for g in groups:
        quads = F.avg_pool3d(g, (1, block // 2, block // 2)).mean(dim=2)  # [B, 3, 2h, 2w]
        b, c, hh, ww = quads.shape
        # [B, 3, h, 2, w, 2] → [B, 12, h, w], channel = 3 * quadrant + colour
        quads = (
            quads.reshape(b, c, hh // 2, 2, ww // 2, 2)
            .permute(0, 3, 5, 1, 2, 4)
            .reshape(b, 12, hh // 2, ww // 2)
        )
        lum = F.avg_pool3d((g * luma).sum(1, keepdim=True), (1, block, block))[:, 0]  # [B, f, h, w]
        idx = torch.arange(4).clamp(max=g.shape[2] - 1)
        out.append(torch.cat([quads, lum[:, idx]], dim=1))
    return CODE_SCALE * torch.stack(out, dim=2)


def to_video_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] → float [B, 3, F, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def fit_vae(
    vae: WanVAE,
    videos: np.ndarray,
    references: np.ndarray,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    latent_noise: float = 0.05,
) -> dict[str, float]:
    """Train `vae` in place on uint8 videos [N, F, H, W, 3] and references [M, R, R, 3].

    Returns the last step's losses: the encoder's code regression MSE (`*_code`) and the
    decoder's reconstruction MSE in [-1, 1] units (from the code and from the encoder's output).
    """
    gen = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    vids, refs = to_video_tensor(videos), to_video_tensor(references[:, None])
    started, stats = time.perf_counter(), {}
    for step in range(steps):
        losses = {}
        for name, data in (("video", vids), ("reference", refs)):
            x = data[torch.randint(len(data), (batch_size,), generator=gen)]
            code = latent_code(x)
            encoded = vae.encode_latents(x)
            losses[name + "_code"] = (encoded - code).pow(2).mean()
            # The decoder learns from the code and from what the encoder really gives (detached,
            # so the code alone pins the encoder): DiT samples land near the latter.
            both = torch.cat([code, encoded.detach()])
            noisy = both + latent_noise * torch.randn(both.shape, generator=gen)
            losses[name] = (vae.decode_frames(noisy, clamp=False) - torch.cat([x, x])).pow(2).mean()
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        stats = {k: v.item() for k, v in losses.items()}
        if step % 100 == 0 or step == steps - 1:
            log.info(
                "vae step %d/%d  decode mse video %.4f ref %.4f  code mse %.4f  (%.0fs)",
                step + 1,
                steps,
                stats["video"],
                stats["reference"],
                stats["video_code"],
                time.perf_counter() - started,
            )
    vae.eval().requires_grad_(False)
    return stats
