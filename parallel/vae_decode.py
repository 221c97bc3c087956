"""Exact parallel VAE decode: every rank of a replica decodes one horizontal band of latent rows.

The Wan2.1 decoder (standin/vae.py) is convolutions, per-pixel norms and activations, nearest
upsampling, and one attention block over whole frames. Cut the frame into bands of rows, one
per rank; then before every layer with spatial extent (3x3 convs, 3x3x3 causal convs, the
upsampling convs) a rank exchanges one edge row with each neighbouring band (`halo`; the frame's
top and bottom get zero rows, which is the conv's own zero padding), and the middle attention
block gathers the keys and values of every band (`gather_rows`) so each band's queries see the
whole frame. Nothing is approximated: the bands, stacked, are the single-process decode up to
floating-point summation order.

The causal time cache needs no extra care: each rank caches its own band's frames, and a conv
takes its halo before its cache keeps them, so a cached frame carries the halo of that same
frame. A rank needs at least one latent row (every halo is one row deep, at every scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parallel.collectives import Collectives
from standin.errors import InvalidRequestError
from standin.vae import WanVAE

__all__ = ["BandExchange", "RowBands", "decode_bands", "gather_bands"]


@dataclass(frozen=True)
class RowBands:
    """`rows` latent rows cut into `bands` contiguous bands; the first `rows % bands` bands get
    one row more (60 rows over 8 ranks: 8, 8, 8, 8, 7, 7, 7, 7)."""

    rows: int
    bands: int

    def __post_init__(self) -> None:
        if self.bands < 1:
            raise InvalidRequestError(f"a decode needs at least one band, got {self.bands}")
        if self.rows < self.bands:
            raise InvalidRequestError(
                f"the latents have {self.rows} rows, fewer than the {self.bands} ranks decoding "
                f"them: each rank needs at least one latent row (8 pixel rows)"
            )

    @property
    def sizes(self) -> list[int]:
        base, extra = divmod(self.rows, self.bands)
        return [base + (i < extra) for i in range(self.bands)]

    def bounds(self, i: int) -> tuple[int, int]:
        """[start, stop) latent rows of band i."""
        sizes = self.sizes
        start = sum(sizes[:i])
        return start, start + sizes[i]


class BandExchange:
    """standin.vae.SpatialSplit over the world group of a mesh: band i is world rank i.

    Per call (one decode); it holds no tensors between calls.
    """

    def __init__(self, comm: Collectives, bands: RowBands) -> None:
        mesh = comm.mesh
        if bands.bands != mesh.world_size:
            raise ValueError(f"{bands.bands} bands for a world of {mesh.world_size} ranks")
        self.comm = comm
        self.bands = bands
        self.index = mesh.rank
        self.group = mesh.world_group
        self.prev = self.index - 1 if self.index > 0 else None
        self.next = self.index + 1 if self.index + 1 < bands.bands else None

    def halo(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """x: [B, C, T, h, W] → [B, C, T, rows + h + rows, W] (see standin.vae.SpatialSplit)."""
        if rows > x.shape[-2]:
            raise ValueError(f"a halo of {rows} rows from a band of {x.shape[-2]}")
        top, bottom = x[..., :rows, :], x[..., -rows:, :]
        above, below = self.comm.neighbour_exchange(top, bottom, self.prev, self.next, self.group)
        # The neighbours' edges, or zero rows at the frame's edges (the conv's zero padding).
        above = torch.zeros_like(top) if above is None else above
        below = torch.zeros_like(bottom) if below is None else below
        return torch.cat([above, x, below], dim=-2)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, h, W] this band → [N, C, H, W] all bands in row order."""
        return _gather_rows(x, self.comm, self.bands, self.index)


def _padded(x: torch.Tensor, bands: RowBands, index: int) -> tuple[torch.Tensor, list[int]]:
    """Band `index`'s rows (dim -2) padded to the tallest band's (collectives need equal shapes),
    and every band's height at x's scale."""
    scale, rest = divmod(x.shape[-2], bands.sizes[index])
    if rest:
        raise ValueError(f"{x.shape[-2]} rows are no multiple of the band's {bands.sizes[index]} latent rows")
    heights = [n * scale for n in bands.sizes]
    return F.pad(x, (0, 0, 0, max(heights) - x.shape[-2])), heights


def _joined(chunks: torch.Tensor, heights: list[int]) -> torch.Tensor:
    """[N, ..., tallest, W] padded bands → their rows, trimmed and stacked in band order."""
    return torch.cat([chunk[..., :h, :] for chunk, h in zip(chunks, heights, strict=True)], dim=-2)


def _gather_rows(x: torch.Tensor, comm: Collectives, bands: RowBands, index: int) -> torch.Tensor:
    """Every band's rows (dim -2) on every rank, in band order."""
    padded, heights = _padded(x, bands, index)
    return _joined(comm.all_gather(padded, comm.mesh.world_group, bands.bands), heights)


def gather_bands(band: torch.Tensor, comm: Collectives, bands: RowBands) -> torch.Tensor:
    """band: [B, 3, F, 8 h_i, 8w] this rank's pixel rows → the whole video [B, 3, F, 8h, 8w]
    on every rank."""
    return _gather_rows(band, comm, bands, comm.mesh.rank)


def gather_bands_to(band: torch.Tensor, comm: Collectives, bands: RowBands, root: int) -> torch.Tensor:
    """Like `gather_bands`, but only global rank `root` receives the whole video (each band is
    sent once, and no other rank holds a copy); the others get their own band back."""
    padded, heights = _padded(band, bands, comm.mesh.rank)
    chunks = comm.gather(padded, root)
    return band if chunks is None else _joined(chunks, heights)


@torch.no_grad()
def decode_bands(
    vae: WanVAE,
    latents: torch.Tensor,
    comm: Collectives,
    gather: bool = True,
    root: int | None = None,
) -> torch.Tensor:
    """latents: [B, 16, T, h, w] normalized, the same on every rank of `comm`'s world →
    video [B, 3, 1 + 4(T-1), 8h, 8w] float32 in [-1, 1] (gather=True: on every rank, or with
    `root` only on that global rank) or this rank's band of 8·h_i pixel rows of it (gather=False,
    and on the ranks other than `root`; `RowBands(h, world).bounds(rank)`).

    Every rank of the world must call this with the same latents shape and arguments. Raises
    InvalidRequestError when h < world size.
    """
    bands = RowBands(latents.shape[-2], comm.mesh.world_size)
    start, stop = bands.bounds(comm.mesh.rank)
    band = vae.decode_frames(latents[..., start:stop, :], split=BandExchange(comm, bands))
    if not gather:
        return band
    return gather_bands(band, comm, bands) if root is None else gather_bands_to(band, comm, bands, root)
