"""Synthetic identities for the tiny preset: coloured glyph "faces" that move in short videos.

An identity is a body colour, a shape (circle, square, diamond, triangle), an eye colour and an
optional accessory band. A clip shows the glyph moving in one of four directions over one of
four backgrounds; the prompt names both (a small closed vocabulary the DiT learns to read). The
reference is the same glyph larger, centred, on white (as a whitened face crop), with the eyes
looking straight ahead, whereas in the video they look where the glyph moves: the reference
differs from the video in scale, position and "pose".

Everything is a pure function of integer seeds, so the train / held-out split and every clip are
reproducible on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "diamond", "triangle")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
BACKGROUNDS = {
    "black": (20, 20, 20),
    "gray": (110, 110, 110),
    "navy": (20, 30, 90),
    "olive": (80, 90, 30),
}
EYE_COLOURS = ((255, 255, 255), (0, 0, 0), (255, 220, 0), (0, 200, 255))
BAND_COLOURS = ((230, 30, 30), (30, 200, 60), (250, 250, 250), (150, 60, 220))


def prompt_for(direction: str, background: str) -> str:
    """The prompt of a clip; short enough for the tiny text encoder's 32 tokens."""
    return f"moves {direction} on {background}"


@dataclass(frozen=True)
class Identity:
    """One synthetic subject; `index` is its position in the identity list (the retrieval label)."""

    index: int
    colour: tuple[int, int, int]
    shape: str
    eyes: tuple[int, int, int]
    band: tuple[int, int, int] | None


def make_identities(count: int, seed: int = 0) -> list[Identity]:
    """`count` identities drawn from `seed`; bright saturated colours, far from the backgrounds."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        hue, sat, val = rng.uniform(0, 1), rng.uniform(0.55, 1.0), rng.uniform(0.7, 1.0)
        colour = tuple(int(c * 255) for c in _hsv_to_rgb(hue, sat, val))
        band = BAND_COLOURS[rng.integers(len(BAND_COLOURS))] if rng.uniform() < 0.5 else None
        out.append(Identity(i, colour, SHAPES[rng.integers(len(SHAPES))], EYE_COLOURS[rng.integers(4)], band))
    return out


def split_identities(identities: list[Identity], held_out: int) -> tuple[list[Identity], list[Identity]]:
    """(train, held-out): the last `held_out` identities are never trained on."""
    return identities[:-held_out], identities[-held_out:]


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def _glyph_mask(shape: str, size: int, cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean [size, size] mask of a shape of radius r centred at (cy, cx) (pixel centres)."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = y - cy, x - cx
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r * 1.15
    # triangle, apex up
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.62)


def draw_glyph(
    canvas: np.ndarray, ident: Identity, cy: float, cx: float, r: float, look: tuple[int, int]
) -> np.ndarray:
    """Draw `ident` on `canvas` [H, W, 3] uint8 in place; returns the glyph's mask [H, W]."""
    size = canvas.shape[0]
    body = _glyph_mask(ident.shape, size, cy, cx, r)
    canvas[body] = ident.colour
    if ident.band is not None:  # a hat band across the top third
        y = np.arange(size)[:, None] + 0.5
        band = body & (y >= cy - r * 0.75) & (y <= cy - r * 0.45)
        canvas[band] = ident.band
    eye_r = max(r * 0.2, 0.8)
    for side in (-1, 1):
        ey = cy - r * 0.05 + look[0] * r * 0.15
        ex = cx + side * r * 0.38 + look[1] * r * 0.15
        canvas[_glyph_mask("circle", size, ey, ex, eye_r) & body] = ident.eyes
    return body


@dataclass(frozen=True)
class Clip:
    """One training example: video, reference, subject mask and prompt (uint8 / bool arrays)."""

    identity: int
    video: np.ndarray  # [F, H, W, 3] uint8
    mask: np.ndarray  # [F, H, W] bool, where the subject is
    reference: np.ndarray  # [R, R, 3] uint8, subject on white
    prompt: str
    direction: str
    background: str


def render_clip(
    ident: Identity,
    seed: int,
    size: int = 32,
    num_frames: int = 5,
    reference_size: int = 32,
    direction: str | None = None,
    background: str | None = None,
) -> Clip:
    """A clip of `ident`: start position, direction and background drawn from `seed` unless given."""
    rng = np.random.default_rng([seed, ident.index])
    direction = direction or list(DIRECTIONS)[rng.integers(4)]
    background = background or list(BACKGROUNDS)[rng.integers(4)]
    dy, dx = DIRECTIONS[direction]
    r = size * rng.uniform(0.22, 0.28)
    speed = size * 0.06
    travel = speed * (num_frames - 1)
    # Start so that the whole path stays inside the frame.
    lo, hi = r + 1, size - r - 1
    cy = rng.uniform(lo + max(0, -dy) * travel, hi - max(0, dy) * travel)
    cx = rng.uniform(lo + max(0, -dx) * travel, hi - max(0, dx) * travel)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    masks = np.empty((num_frames, size, size), bool)
    for f in range(num_frames):
        frames[f] = BACKGROUNDS[background]
        masks[f] = draw_glyph(frames[f], ident, cy + dy * speed * f, cx + dx * speed * f, r, (dy, dx))
    return Clip(
        ident.index,
        frames,
        masks,
        render_reference(ident, reference_size),
        prompt_for(direction, background),
        direction,
        background,
    )


def render_reference(ident: Identity, size: int = 32) -> np.ndarray:
    """The identity's reference image: larger, centred, eyes ahead, on white."""
    ref = np.full((size, size, 3), 255, np.uint8)
    draw_glyph(ref, ident, size / 2, size / 2, size * 0.4, (0, 0))
    return ref
