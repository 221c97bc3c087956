"""The Wan2.1 causal 3D VAE: video [B, 3, F, H, W] <-> latents [B, 16, 1 + (F-1)/4, H/8, W/8].

Every temporal convolution is causal (padded with zeros in front, never behind), so a latent
frame depends only on the video frames up to it and the other way round. That lets encode and
decode run chunk by chunk in time: each causal layer keeps the last frames it saw in a
`CausalCache` that lives for one call only (never on the module, so calls may interleave).
The first frame is special: it is compressed alone (a single image is a 1-frame video), and
every later group of 4 video frames maps to one latent frame.

Parameter names and shapes match the official `Wan2.1_VAE.pth` state dict, so that file loads
strictly with `load_wan_vae`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from standin.checkpoints import load_strict, read_torch_pickle
from standin.errors import InvalidRequestError

log = logging.getLogger(__name__)

# Per-channel statistics of Wan2.1 latents: the DiT sees (mu - mean) / std.
WAN21_LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# Video frames per encoder chunk after the first frame (one latent frame each).
ENCODE_CHUNK_FRAMES = 4


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of the VAE; the defaults are the official Wan2.1 VAE."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # One entry per downsampling stage: does it also halve time?
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs {len(self.dim_mult) - 1} entries (one per "
                f"downsampling stage), got {len(self.temporal_downsample)}"
            )
        if self.z_dim != len(WAN21_LATENT_MEAN):
            raise ValueError(
                f"z_dim must be {len(WAN21_LATENT_MEAN)} (the Wan latent statistics have that "
                f"many channels), got {self.z_dim}"
            )
        if sum(self.temporal_downsample) != 2:
            # Encoding groups frames by 4 after the first one: exactly two temporal halvings.
            raise ValueError("temporal_downsample must halve time exactly twice (4x)")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)


# The official Wan2.1 VAE, and the same architecture at CPU-test size (presets: standin/presets.py).
WAN21_VAE = VAEConfig()
TINY_VAE = VAEConfig(dim=8)


class SpatialSplit(Protocol):
    """How one band of a frame's rows reaches the other bands, for a decode cut into horizontal
    bands of latent rows, one band per rank (implemented over torch.distributed in
    parallel/vae_decode.py). Every band runs the same layers in the same order, so each call
    below is matched by the same call on every other band.
    """

    def halo(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """x: [B, C, T, h, W] this band -> [B, C, T, rows + h + rows, W] with the neighbouring
        bands' edge rows of the same frames around it (zeros above the frame's first row and
        below its last, which is the conv's zero padding)."""
        ...

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, h, W] this band of every image -> [N, C, H, W] the whole images (all
        bands in row order)."""
        ...


class CausalCache:
    """The frames each causal layer saw at the end of the previous chunks of one call.

    `split`: set when this call decodes one band of rows (per call, like the cache itself);
    the layers with spatial extent then take their edge rows from the neighbouring bands.
    """

    def __init__(self, split: SpatialSplit | None = None) -> None:
        self._tails: dict[nn.Module, torch.Tensor] = {}
        self._started: set[nn.Module] = set()
        self.split = split

    def tail(self, layer: nn.Module) -> torch.Tensor | None:
        return self._tails.get(layer)

    def keep(self, layer: nn.Module, frames: torch.Tensor) -> None:
        # clone: a slice would keep the whole chunk's activation alive
        self._tails[layer] = frames.clone()

    def first_chunk(self, layer: nn.Module) -> bool:
        """True the first time `layer` asks, False afterwards."""
        if layer in self._started:
            return False
        self._started.add(layer)
        return True


def _split_of(cache: CausalCache | None) -> SpatialSplit | None:
    return None if cache is None else cache.split


def _per_frame(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to every frame of `x: [B, C, T, H, W]`."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class CausalConv3d(nn.Conv3d):
    """A Conv3d whose time padding is all in front (2 * padding_t zero frames), none behind.

    With a cache, the frames kept from the previous chunk replace that many zero frames.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad = 2 * pt
        self.space_pad = (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """x: [B, C, T, H, W] -> [B, C_out, T', H', W']."""
        front = self.time_pad
        space_pad = self.space_pad
        split = _split_of(cache)
        if split is not None and space_pad[2] > 0:
            # Before the cache keeps its frames: the halo of a cached frame is the neighbours'
            # rows of that same frame, so the tail is kept with its halo.
            x = split.halo(x, space_pad[2])
            space_pad = (*space_pad[:2], 0, 0)
        if cache is not None and self.time_pad > 0:
            tail = cache.tail(self)
            if tail is not None:
                x = torch.cat([tail, x], dim=2)
                front -= tail.shape[2]
            cache.keep(self, x[:, :, -self.time_pad :])
        x = F.pad(x, (*space_pad, front, 0))
        return super().forward(x)


class RMSNorm(nn.Module):
    """Normalize over channels (dim 1) to unit RMS, then scale per channel."""

    def __init__(self, dim: int, spatial_dims: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class Upsample2x(nn.Module):
    """Nearest-neighbour 2x upsampling of H and W (no parameters; works in any dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        # Indices are part of the checkpoint key names (residual.2.weight, residual.6.weight).
        self.residual = nn.Sequential(
            RMSNorm(in_dim, 3),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, 3),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """x: [B, C_in, T, H, W] -> [B, C_out, T, H, W]."""
        return self.shortcut(x) + _run(self.residual, x, cache)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (frames do not mix)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        # As in the official training init: the block starts as the identity.
        nn.init.zeros_(self.proj.weight)

    def _frames(self, x: torch.Tensor, split: SpatialSplit | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x))  # [N, 3C, h, W]
        q = qkv[:, :c].flatten(2).transpose(1, 2)  # [N, h*W, C]
        kv = qkv[:, c:]
        if split is not None:
            # A band's queries attend to the keys of the whole frame.
            kv = split.gather_rows(kv.contiguous())
        k, v = kv.flatten(2).transpose(1, 2).chunk(2, dim=-1)
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None]).squeeze(1)  # [N, h*W, C]
        return self.proj(y.transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """x: [B, C, T, H, W] -> same shape."""
        split = _split_of(cache)
        return x + _per_frame(lambda frames: self._frames(frames, split), x)


class Resample(nn.Module):
    """Halve or double H and W, and optionally time (modes `{up,down}sample{2d,3d}`).

    In time the first frame passes through alone; only the frames after it are merged in
    pairs (down) or split in two (up), so 1 + 4k video frames <-> 1 + k latent frames.
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            # Pad right/bottom only, so a stride-2 conv maps H to exactly H/2.
            self.resample = nn.Sequential(
                nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2)
            )
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            # Each frame's two successors are stacked along channels: C -> 2C.
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """x: [B, C, T, H, W] -> [B, C', T', 2H, 2W] (up) or [B, C, T', H/2, W/2] (down)."""
        if self.mode == "upsample3d":
            x = self._double_time(x, cache)
        split = _split_of(cache)
        if split is None:
            x = _per_frame(self.resample, x)
        elif self.mode.startswith("upsample"):
            x = _per_frame(self._upsample_band, split.halo(x, 1))
        else:
            raise ValueError("a spatial split runs the decoder only (no downsampling)")
        if self.mode == "downsample3d":
            x = self._halve_time(x, cache)
        return x

    def _double_time(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        # The frames after the first form their own causal sequence (zero history at its
        # start); in a chunked call the first chunk holds the first frame.
        if cache is not None and not cache.first_chunk(self):
            return self._split_channels(self.time_conv(x, cache))
        if x.shape[2] == 1:
            return x
        rest = self._split_channels(self.time_conv(x[:, :, 1:], cache))
        return torch.cat([x[:, :, :1], rest], dim=2)

    def _upsample_band(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, 1 + h + 1, W] a band with one halo row each side -> [N, C/2, 2h, 2W].

        Upsampled, the halo rows become two rows each; the 3x3 conv needs only the nearer one.
        """
        upsample, conv = self.resample
        x = upsample(x)[..., 1:-1, :]
        return F.conv2d(x, conv.weight, conv.bias, padding=(0, 1))

    @staticmethod
    def _split_channels(y: torch.Tensor) -> torch.Tensor:
        """[B, 2C, T, H, W] -> [B, C, 2T, H, W]: channel half j becomes frame 2t + j."""
        b, c2, t, h, w = y.shape
        return y.unflatten(1, (2, c2 // 2)).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)

    def _halve_time(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        # Frame 0 stays; output frame j >= 1 merges input frames 2j-2, 2j-1, 2j. Chunks after
        # the first have an even length and need the previous chunk's last frame.
        if cache is not None and not cache.first_chunk(self):
            tail = cache.tail(self)
            cache.keep(self, x[:, :, -1:])
            return self.time_conv(torch.cat([tail, x], dim=2))
        if cache is not None:
            cache.keep(self, x[:, :, -1:])
        if x.shape[2] == 1:
            return x
        return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)


_CAUSAL_LAYERS = (CausalConv3d, ResidualBlock, AttentionBlock, Resample)


def _run(layers: nn.Sequential, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, _CAUSAL_LAYERS) else layer(x)
    return x


class Encoder3d(nn.Module):
    """Video [B, 3, T, H, W] -> [B, 2 * z_dim, 1 + (T-1)/4, H/8, W/8] (mean and log-variance)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim] + [cfg.dim * m for m in cfg.dim_mult]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        last = len(cfg.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(itertools.pairwise(dims)):
            for j in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim, cfg.dropout))
            if i != last:
                time = cfg.temporal_downsample[i]
                blocks.append(Resample(out_dim, "downsample3d" if time else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        top = dims[-1]
        self.middle = nn.Sequential(
            ResidualBlock(top, top, cfg.dropout),
            AttentionBlock(top),
            ResidualBlock(top, top, cfg.dropout),
        )
        self.head = nn.Sequential(
            RMSNorm(top, 3), nn.SiLU(), CausalConv3d(top, 2 * cfg.z_dim, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        for seq in (self.downsamples, self.middle, self.head):
            x = _run(seq, x, cache)
        return x


class Decoder3d(nn.Module):
    """Latents [B, z_dim, T, h, w] -> video [B, 3, 1 + 4(T-1), 8h, 8w] (not clamped)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        mults = cfg.dim_mult[::-1]
        dims = [cfg.dim * mults[0]] + [cfg.dim * m for m in mults]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], cfg.dropout),
            AttentionBlock(dims[0]),
            ResidualBlock(dims[0], dims[0], cfg.dropout),
        )
        blocks: list[nn.Module] = []
        last = len(cfg.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(itertools.pairwise(dims)):
            # Every upsampling conv halves the channels, so later stages start from half.
            stage_in = in_dim // 2 if i > 0 else in_dim
            for j in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(stage_in if j == 0 else out_dim, out_dim, cfg.dropout))
            if i != last:
                time = temporal_upsample[i]
                blocks.append(Resample(out_dim, "upsample3d" if time else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            RMSNorm(dims[-1], 3), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        for seq in (self.middle, self.upsamples, self.head):
            x = _run(seq, x, cache)
        return x


class WanVAE(nn.Module):
    """The Wan2.1 video VAE. State-dict keys: `encoder.*`, `conv1.*`, `conv2.*`, `decoder.*`.

    Inference only: `encode` and `decode` run without autograd, chunk by chunk in time.
    """

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or VAEConfig()
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(WAN21_LATENT_MEAN, dtype=torch.float32, device=device)
        std = torch.tensor(WAN21_LATENT_STD, dtype=torch.float32, device=device)
        return mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)

    def _param_dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def _check_video(self, video: torch.Tensor) -> None:
        s = self.config.spatial_factor
        tf = self.config.temporal_factor
        if not isinstance(video, torch.Tensor) or video.ndim != 5 or video.shape[1] != 3:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise InvalidRequestError(f"video must be a [B, 3, F, H, W] tensor, got {shape}")
        if not video.is_floating_point():
            raise InvalidRequestError(f"video must be floating point in [-1, 1], got {video.dtype}")
        _, _, f, h, w = video.shape
        if f < 1 or (f - 1) % tf:
            raise InvalidRequestError(f"video frame count must be 1 + {tf}k (1, 5, ..., 81), got {f}")
        if h < s or w < s or h % s or w % s:
            raise InvalidRequestError(
                f"video height and width must be positive multiples of {s}, got {h}x{w}"
            )

    def _check_latents(self, latents: torch.Tensor) -> None:
        z = self.config.z_dim
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[1] != z:
            shape = (
                tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            )
            raise InvalidRequestError(f"latents must be a [B, {z}, T, h, w] tensor, got {shape}")
        if not latents.is_floating_point():
            raise InvalidRequestError(f"latents must be floating point, got {latents.dtype}")
        if min(latents.shape[2:]) < 1:
            raise InvalidRequestError(f"latents must not be empty, got {tuple(latents.shape)}")

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video: [B, 3, F, H, W] in [-1, 1], F = 1 + 4k -> latents [B, 16, 1 + k, H/8, W/8].

        Returns the normalized posterior mean, (mu - mean) / std, in float32.
        """
        self._check_video(video)
        return self.encode_latents(video)

    def encode_latents(self, video: torch.Tensor) -> torch.Tensor:
        """`encode` without its input checks and with autograd as the caller has it (training)."""
        x = video.to(self._param_dtype())
        cache = CausalCache()
        chunks = [x[:, :, :1]]
        if x.shape[2] > 1:  # split() of an empty tensor would yield one empty chunk
            chunks += x[:, :, 1:].split(ENCODE_CHUNK_FRAMES, dim=2)
        h = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        mu = self.conv1(h)[:, : self.config.z_dim].float()
        mean, std = self._stats(mu.device)
        return (mu - mean) / std

    @torch.no_grad()
    def decode(
        self,
        latents: torch.Tensor,
        *,
        tile_size: int | None = None,
        tile_overlap: int = 8,
    ) -> torch.Tensor:
        """latents: [B, 16, T, h, w] (normalized) -> video [B, 3, 1 + 4(T-1), 8h, 8w] in [-1, 1].

        Decodes one latent frame at a time. With `tile_size` (in latent pixels), the frame is
        also cut into overlapping square tiles (`tile_overlap` latent pixels shared between
        neighbours) that are decoded one after another and blended linearly: less memory,
        slightly different output (the middle attention sees one tile instead of the frame).
        Returns float32.
        """
        self._check_latents(latents)
        if tile_size is not None and not 0 <= tile_overlap < tile_size:
            raise InvalidRequestError(
                f"tile_overlap must be in [0, tile_size), got overlap {tile_overlap} "
                f"with tile_size {tile_size}"
            )
        if tile_size is None or max(latents.shape[-2:]) <= tile_size:
            return self.decode_frames(latents)
        z = self._unnormalize(latents)
        b, _, _, h, w = z.shape
        s = self.config.spatial_factor
        out = torch.zeros(b, 3, self._num_frames(z), h * s, w * s, device=z.device)
        weight = torch.zeros(1, 1, 1, h * s, w * s, device=z.device)
        rows = _tile_spans(h, tile_size, tile_overlap)
        cols = _tile_spans(w, tile_size, tile_overlap)
        for r, (r0, r1) in enumerate(rows):
            for c, (c0, c1) in enumerate(cols):
                tile = self._decode_frames(z[:, :, :, r0:r1, c0:c1])
                mask = _blend_mask(rows, r, s, z.device)[:, None] * _blend_mask(cols, c, s, z.device)
                out[..., r0 * s : r1 * s, c0 * s : c1 * s] += tile * mask
                weight[..., r0 * s : r1 * s, c0 * s : c1 * s] += mask
        return out / weight

    def decode_frames(
        self, latents: torch.Tensor, clamp: bool = True, split: SpatialSplit | None = None
    ) -> torch.Tensor:
        """Normalized latents [B, 16, T, h, w] → float32 video, one latent frame at a time, untiled,
        with autograd as the caller has it (training decodes with clamp=False).

        With `split`, `latents` are one band of latent rows and the result is that band's
        8x as many pixel rows of the whole frame's decode (parallel/vae_decode.py)."""
        return self._decode_frames(self._unnormalize(latents), clamp, split)

    def _unnormalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents.device)
        return (latents.float() * std + mean).to(self._param_dtype())

    def _num_frames(self, z: torch.Tensor) -> int:
        return 1 + self.config.temporal_factor * (z.shape[2] - 1)

    def _decode_frames(
        self, z: torch.Tensor, clamp: bool = True, split: SpatialSplit | None = None
    ) -> torch.Tensor:
        """Unnormalized z: [B, 16, T, h, w] -> float32 video, one latent frame at a time."""
        s, tf = self.config.spatial_factor, self.config.temporal_factor
        b, _, t, h, w = z.shape
        x = self.conv2(z)
        out = torch.empty(b, 3, self._num_frames(z), h * s, w * s, device=z.device)
        cache = CausalCache(split)
        for i in range(t):
            frames = self.decoder(x[:, :, i : i + 1], cache).float()
            if clamp:
                frames = frames.clamp(-1.0, 1.0)
            start = 0 if i == 0 else 1 + tf * (i - 1)
            out[:, :, start : start + frames.shape[2]] = frames
        return out


def _tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) of tiles covering `size`, neighbours sharing at least `overlap`."""
    if size <= tile:
        return [(0, size)]
    stride = tile - overlap
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return [(a, a + tile) for a in starts]


def _blend_mask(
    spans: list[tuple[int, int]], i: int, scale: int, device: torch.device
) -> torch.Tensor:
    """1D weights (pixels) of tile i: ramps up over the overlap with the previous tile and
    down over the overlap with the next one; 1 elsewhere."""
    a, b = spans[i]
    mask = torch.ones((b - a) * scale, device=device)
    if i > 0:
        n = (spans[i - 1][1] - a) * scale
        mask[:n] = (torch.arange(n, device=device) + 0.5) / n
    if i + 1 < len(spans):
        n = (b - spans[i + 1][0]) * scale
        mask[len(mask) - n :] = torch.minimum(
            mask[len(mask) - n :], (n - torch.arange(n, device=device) - 0.5) / n
        )
    return mask


def load_wan_vae(
    path: Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: VAEConfig | None = None,
) -> WanVAE:
    """Load `Wan2.1_VAE.pth` (a plain state dict) strictly, without a second copy in memory.

    Raises `CheckpointError` naming the key and file for any missing, unexpected or
    mis-shaped tensor.
    """
    path = Path(path)
    with torch.device("meta"):
        model = WanVAE(config)
    tensors = read_torch_pickle(path, dtype=dtype, device=device)
    load_strict(model, tensors, path.name)
    log.info("loaded VAE from %s (%s, %s)", path, dtype, device)
    return model.eval().requires_grad_(False)
