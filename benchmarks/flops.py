"""FLOP count of a Stand-In DiT forward, to turn measured step times into achieved TFLOP/s.

One multiply-add is 2 FLOPs. Counted: every matmul (linear layers, the patch-embedding
convolution, LoRA) and both attention matmuls (QKᵀ and PV). Not counted: elementwise work
(norms, RoPE, adaLN modulation, softmax, GELU, biases), which is < 1 % at real sizes.

With C = dim, F = ffn_dim, S video tokens, S_id identity tokens, L text tokens, P = prod(patch),
r = LoRA rank, N layers:

    video forward (identity cached)
      patch embedding     2·S·(C_in·P)·C
      text embedding      2·L·(text_dim·C + C²)
      time embedding      2·(freq_dim·C + C² + C·6C)
      per layer           8·S·C²              self-attn q, k, v, o
                          4·S·(S + S_id)·C    self-attn QKᵀ + PV; video queries see [video; identity] keys
                          4·S·C² + 4·L·C²     cross-attn q, o (video) and k, v (text)
                          4·S·L·C             cross-attn QKᵀ + PV
                          4·S·C·F             FFN
      head                2·S·C·(C_out·P)

    identity cache build (once per request; in every forward without the cache)
      patch embedding     2·S_id·(C_in·P)·C
      time embedding      as above (timestep 0)
      per layer           6·S_id·C² + 12·S_id·C·r    q, k, v + their LoRA (down and up)
      all but the last    4·S_id²·C + 2·S_id·C² + 4·S_id·C·F   attention (identity only), o, FFN

The formula is checked against torch's FlopCounterMode on a real forward in the tests.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from standin.config import DiTConfig


@dataclass(frozen=True)
class Tokens:
    """How many tokens one forward processes."""

    video: int
    identity: int
    text: int


def token_counts(
    config: DiTConfig, latent_shape: tuple[int, ...], identity_shape: tuple[int, ...] | None, text_len: int
) -> Tokens:
    """Tokens for video latents [..., F, H, W] and identity latents [..., 1, h, w] (or None)."""

    def grid(shape: tuple[int, ...]) -> int:
        f, h, w = shape[-3:]
        pt, ph, pw = config.patch_size
        return (f // pt) * (h // ph) * (w // pw)

    return Tokens(grid(latent_shape), grid(identity_shape) if identity_shape else 0, text_len)


@dataclass(frozen=True)
class ForwardFlops:
    """FLOPs of one DiT forward (batch 1), split where the identity branch adds work."""

    video_linear: int  # every matmul on video/text/time tokens except attention
    video_attention: int  # self- and cross-attention QKᵀ + PV
    identity_build: int  # the identity cache: once per request (or per forward, uncached)

    @property
    def forward(self) -> int:
        """A forward with a cached identity (or plain Wan2.1 when there is no identity)."""
        return self.video_linear + self.video_attention

    @property
    def forward_uncached(self) -> int:
        """A forward that rebuilds the identity K/V."""
        return self.forward + self.identity_build

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "forward": self.forward, "forward_uncached": self.forward_uncached}


def _time_embedding(c: DiTConfig) -> int:
    return 2 * (c.freq_dim * c.dim + c.dim * c.dim + c.dim * 6 * c.dim)


def dit_forward_flops(config: DiTConfig, tokens: Tokens) -> ForwardFlops:
    """FLOPs of one forward (see the module docstring for the formula)."""
    c = config
    C, F, N, r = c.dim, c.ffn_dim, c.num_layers, c.lora_rank
    S, S_id, L = tokens.video, tokens.identity, tokens.text
    P = math.prod(c.patch_size)

    linear = 2 * S * c.in_dim * P * C + 2 * L * (c.text_dim * C + C * C) + _time_embedding(c)
    linear += N * (8 * S * C * C + 4 * S * C * C + 4 * L * C * C + 4 * S * C * F)
    linear += 2 * S * C * c.out_dim * P
    attention = N * (4 * S * (S + S_id) * C + 4 * S * L * C)

    identity = 0
    if S_id:
        identity = 2 * S_id * c.in_dim * P * C + _time_embedding(c)
        identity += N * (6 * S_id * C * C + 12 * S_id * C * r)
        identity += (N - 1) * (4 * S_id * S_id * C + 2 * S_id * C * C + 4 * S_id * C * F)
    return ForwardFlops(linear, attention, identity)


def tflops(flops: float, seconds: float) -> float:
    """Achieved TFLOP/s."""
    return flops / seconds / 1e12
