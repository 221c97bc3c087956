"""3D rotary position embedding with Stand-In's conditional position mapping.

Positions are (frame, row, column) triples. Video tokens take frames 0…f−1, rows 0…h−1,
columns 0…w−1. Identity tokens take frame −1 and rows h…h+h_id−1, columns w…w+w_id−1,
a coordinate block disjoint from the video grid (paper §"Conditional Position Mapping").

Angles are computed in float64 once per forward (cheap: tokens × head_dim/2) and stored as
float32 cos/sin; applying them is real float32 arithmetic, never float64 complex maths.
"""

from __future__ import annotations

import torch

THETA = 10000.0


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to (frame, row, column), as Wan2.1 splits them."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def video_positions(f: int, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[f*h*w, 3] (frame, row, column) of video tokens in patchified (f, h, w) order."""
    grid = torch.meshgrid(
        torch.arange(f, device=device),
        torch.arange(h, device=device),
        torch.arange(w, device=device),
        indexing="ij",
    )
    return torch.stack(grid, dim=-1).reshape(-1, 3)


def identity_positions(
    h_id: int, w_id: int, video_h: int, video_w: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """[h_id*w_id, 3] positions of identity tokens: frame −1, rows/columns after the video grid."""
    pos = video_positions(1, h_id, w_id, device)
    return pos + torch.tensor([-1, video_h, video_w], device=device)


def rope_angles(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [S, head_dim/2] (float32) for integer positions [S, 3]."""
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(rope_split(head_dim)):
        inv_freq = THETA ** (
            -torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim
        )
        angle = positions[:, axis].to(torch.float64)[:, None] * inv_freq[None, :]
        cos_parts.append(angle.cos())
        sin_parts.append(angle.sin())
    return torch.cat(cos_parts, dim=1).float(), torch.cat(sin_parts, dim=1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [B, S, H, D] by angles [S, D/2]; keeps x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).to(x.dtype)
