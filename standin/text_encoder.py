"""The umT5-XXL encoder Wan2.1 conditions on, in plain PyTorch.

Parameter names equal those of the official `models_t5_umt5-xxl-enc-bf16.pth`, so the file
loads unchanged. The architecture is T5 v1.1 with umT5's per-layer relative position bias:
pre-norm blocks (RMSNorm without mean subtraction, variance in fp32), attention without the
1/sqrt(d) scale, a gated-GELU (tanh) feed-forward, no biases anywhere.

`TextEncoder` is what the pipeline uses: prompts → context [B, text_len, dim] holding each
prompt's token embeddings followed by zeros, which is what Wan's DiT sees after it zero-pads the
trimmed encoder output to `text_len`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from standin.checkpoints import load_strict, read_torch_pickle
from standin.tokenizer import ByteTokenizer, HFTokenizer, PromptTokenizer

log = logging.getLogger(__name__)

UMT5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
UMT5_TOKENIZER_DIR = "google/umt5-xxl"


@dataclass(frozen=True)
class TextEncoderConfig:
    """Sizes of the encoder; defaults are the official umT5-XXL encoder."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    shared_pos: bool = False  # umT5: every layer has its own relative position table
    text_len: int = 512
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} not divisible by {self.num_heads} heads")
        if self.num_buckets % 2:
            raise ValueError(f"num_buckets must be even (bidirectional), got {self.num_buckets}")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads


UMT5_XXL = TextEncoderConfig()
# Same architecture at CPU-test size; vocab fits ByteTokenizer (256 bytes + pad + eos).
TINY = replace(
    UMT5_XXL,
    vocab=ByteTokenizer.vocab_size,
    dim=32,
    dim_attn=32,
    dim_ffn=64,
    num_heads=4,
    num_layers=2,
)


def relative_position_buckets(
    q_len: int,
    k_len: int,
    *,
    num_buckets: int = 32,
    max_distance: int = 128,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bidirectional T5 relative-position bucket of every (query, key) pair → [q_len, k_len] int64.

    Half the buckets are for keys after the query. Within a half, distances below
    `num_buckets // 4` get a bucket each, larger ones share log-spaced buckets up to
    `max_distance`, beyond which everything lands in the last bucket.
    """
    rel = torch.arange(k_len, device=device)[None, :] - torch.arange(q_len, device=device)[:, None]
    half = num_buckets // 2
    max_exact = half // 2
    offset = (rel > 0).long() * half
    dist = rel.abs()
    # clamp only keeps log() finite where the exact branch is taken anyway; the float32 order of
    # operations is the one the checkpoint was trained with (bucket edges depend on it)
    far = (
        max_exact
        + (
            torch.log(dist.clamp(min=max_exact).float() / max_exact)
            / math.log(max_distance / max_exact)
            * (half - max_exact)
        ).long()
    )
    far = far.clamp(max=half - 1)
    return offset + torch.where(dist < max_exact, dist, far)


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    # fp16 overflows in T5's residual stream; clip infs to just below the max (bf16/fp32 untouched)
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(x.dtype).max - 1000
        x = x.clamp(-limit, limit)
    return x


class T5RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x²) + eps), statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * y.to(self.weight.dtype)


class RelativePositionBias(nn.Module):
    """A learned [num_buckets, num_heads] table: bucket ids [Lq, Lk] → bias [1, H, Lq, Lk]."""

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    """Multi-head self-attention with an additive bias and no 1/sqrt(d) scaling (T5)."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: [B, L, C]; bias: [B, H, L, L] added to the logits (padding already filled in)."""
        b, n, _ = x.shape
        q, k, v = (
            proj(x).view(b, n, self.num_heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class T5GatedFeedForward(nn.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x))); `gate` is a Sequential so its key is `gate.0.weight`."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5EncoderBlock(nn.Module):
    """Pre-norm self-attention + feed-forward, each with a residual."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        c = config
        self.norm1 = T5RMSNorm(c.dim, c.eps)
        self.attn = T5Attention(c.dim, c.dim_attn, c.num_heads)
        self.norm2 = T5RMSNorm(c.dim, c.eps)
        self.ffn = T5GatedFeedForward(c.dim, c.dim_ffn)
        self.pos_embedding = None if c.shared_pos else RelativePositionBias(c.num_buckets, c.num_heads)

    def forward(
        self,
        x: torch.Tensor,
        buckets: torch.Tensor,
        key_pad: torch.Tensor | None,
        shared_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """x: [B, L, C]; buckets: [L, L]; key_pad: [B, L] bool (True = padding) or None."""
        bias = shared_bias if self.pos_embedding is None else self.pos_embedding(buckets)
        bias = bias.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        if key_pad is not None:
            bias = bias.masked_fill(key_pad[:, None, None, :], torch.finfo(x.dtype).min)
        x = _clamp_fp16(x + self.attn(self.norm1(x), bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """The umT5 encoder stack; `state_dict()` keys equal the official checkpoint's."""

    def __init__(self, config: TextEncoderConfig = UMT5_XXL) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab, config.dim)
        if config.shared_pos:
            self.pos_embedding = RelativePositionBias(config.num_buckets, config.num_heads)
        self.blocks = nn.ModuleList(T5EncoderBlock(config) for _ in range(config.num_layers))
        self.norm = T5RMSNorm(config.dim, config.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids: [B, L] int64; mask: [B, L] (nonzero = real token) or None → hidden [B, L, dim].

        Outputs at padded positions are computed (they attend to the real tokens) but are not
        meaningful; `TextEncoder` zeroes them.
        """
        c = self.config
        x = self.token_embedding(ids)
        n = ids.shape[1]
        buckets = relative_position_buckets(
            n, n, num_buckets=c.num_buckets, max_distance=c.max_distance, device=ids.device
        )
        shared_bias = self.pos_embedding(buckets) if c.shared_pos else None
        key_pad = None if mask is None else mask.to(ids.device) == 0
        for block in self.blocks:
            x = block(x, buckets, key_pad, shared_bias)
        return self.norm(x)

    def init_random_(self, seed: int = 0) -> UMT5Encoder:
        """Fill every parameter from a seeded generator (T5-like scales); for the tiny preset."""
        gen = torch.Generator().manual_seed(seed)
        c = self.config
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "norm" in name:
                    std = None
                elif name == "token_embedding.weight":
                    std = 1.0
                elif "pos_embedding" in name:
                    std = (2 * c.num_buckets * c.num_heads) ** -0.5
                else:
                    std = p.shape[1] ** -0.5  # Linear: fan-in
                if std is None:
                    p.copy_(torch.ones(p.shape))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        return self


def load_umt5(
    path: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    config: TextEncoderConfig = UMT5_XXL,
) -> UMT5Encoder:
    """Build the encoder on the meta device and load `path` (a torch pickle) into it strictly.

    Raises `CheckpointError` naming the key and file on any missing, unexpected or mis-shaped key.
    """
    path = Path(path)
    with torch.device("meta"):
        model = UMT5Encoder(config)
    tensors = read_torch_pickle(path, dtype=dtype, device=device)
    load_strict(model, tensors, path.name)
    log.info("loaded umT5 encoder from %s (%s, %s)", path, dtype, device)
    return model.eval().requires_grad_(False)


class TextEncoder:
    """Tokenizer + encoder: prompts → context [B, text_len, dim], zero past each prompt's end."""

    def __init__(self, model: UMT5Encoder, tokenizer: PromptTokenizer) -> None:
        if tokenizer.text_len != model.config.text_len:
            raise ValueError(
                f"tokenizer text_len {tokenizer.text_len} != encoder text_len {model.config.text_len}"
            )
        if tokenizer.vocab_size > model.config.vocab:
            raise ValueError(
                f"tokenizer vocab {tokenizer.vocab_size} exceeds encoder vocab {model.config.vocab}"
            )
        self.model = model
        self.tokenizer = tokenizer

    @property
    def dim(self) -> int:
        return self.model.config.dim

    @property
    def text_len(self) -> int:
        return self.model.config.text_len

    @classmethod
    def from_checkpoint_dir(
        cls,
        checkpoint_dir: Path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        config: TextEncoderConfig = UMT5_XXL,
    ) -> TextEncoder:
        """The official umT5-XXL from a Wan2.1 checkpoint directory.

        Reads `models_t5_umt5-xxl-enc-bf16.pth` and `google/umt5-xxl/tokenizer.json`.
        """
        checkpoint_dir = Path(checkpoint_dir)
        tokenizer = HFTokenizer(checkpoint_dir / UMT5_TOKENIZER_DIR, config.text_len)
        model = load_umt5(checkpoint_dir / UMT5_CHECKPOINT, dtype=dtype, device=device, config=config)
        return cls(model, tokenizer)

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        config: TextEncoderConfig = TINY,
    ) -> TextEncoder:
        """The tiny preset: deterministic random weights and the byte tokenizer."""
        model = UMT5Encoder(config).init_random_(seed)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return cls(model, ByteTokenizer(config.text_len))

    @torch.inference_mode()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask: [B, L] (mask a prefix of ones) → [B, L, dim], zero at and past each length."""
        device = self.model.token_embedding.weight.device
        ids, mask = ids.to(device), mask.to(device)
        out = self.model(ids, mask)
        lengths = mask.gt(0).sum(dim=1)
        past_end = torch.arange(ids.shape[1], device=device)[None, :] >= lengths[:, None]
        return out.masked_fill(past_end[..., None], 0.0)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """B prompts → context [B, text_len, dim] in the encoder's dtype and device."""
        ids, mask = self.tokenizer(prompts)
        return self.encode(ids, mask)
