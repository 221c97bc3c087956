"""SDEdit sampling from an input video's latents, and the background-consistency step.

Face swap (issue 14) denoises the VAE latents of the pasted input video rather than pure noise,
as the official ``WanVideoPipeline`` does for video-to-video:

- schedule: :class:`~standin.scheduler.FlowMatchSchedule` with ``denoising_strength`` ``s`` in
  (0, 1] (default 0.85): ``u = linspace(s, 0, N + 1)``, ``σ = shift·u / (1 + (shift − 1)·u)``;
  all N steps run, from ``σ_0`` down to ``σ_N = 0``;
- start: ``latents = (1 − σ_0)·x_0 + σ_0·noise`` (:func:`sdedit_start_latents`), with the
  request's seeded noise;
- background consistency (optional, off by default as in the official script): after every
  Euler step ``i``, outside the hard face mask the latents are replaced by the input latents
  noised to the level the step ended at, ``(1 − σ_{i+1})·x_0 + σ_{i+1}·noise`` with the same
  noise tensor, and by the clean ``x_0`` after the last step (:class:`BackgroundConsistency`).
  So the final latents equal the input latents exactly outside the mask.

The hard mask is the official one: the mask video (uint8, 255 = face), channel 0, mapped to
[-1, 1] and resized to the latent grid ``[F', H/8, W/8]`` with nearest-exact interpolation,
then ``> 0.5``, i.e. pixels ``>= 192`` (:func:`hard_latent_mask`).

Nothing here keeps state between requests: a :class:`BackgroundConsistency` belongs to one.
"""

from __future__ import annotations

import numpy as np
import torch

from standin.errors import InvalidRequestError
from standin.scheduler import DEFAULT_SHIFT, FlowMatchSchedule

__all__ = [
    "DEFAULT_DENOISING_STRENGTH",
    "HARD_MASK_MIN_PIXEL",
    "BackgroundConsistency",
    "hard_latent_mask",
    "sdedit_schedule",
    "sdedit_start_latents",
]

DEFAULT_DENOISING_STRENGTH = 0.85  # the official face-swap default
# (p · 2/255 − 1) > 0.5  ⇔  p > 191.25: the smallest uint8 mask value counted as face.
HARD_MASK_MIN_PIXEL = 192


def sdedit_schedule(
    num_steps: int,
    denoising_strength: float = DEFAULT_DENOISING_STRENGTH,
    shift: float = DEFAULT_SHIFT,
) -> FlowMatchSchedule:
    """The schedule of an SDEdit run: N steps from ``σ_0 = shift·s / (1 + (shift − 1)·s)`` to 0.

    Raises:
        InvalidRequestError: ``denoising_strength`` outside (0, 1], or bad steps / shift.
    """
    return FlowMatchSchedule(num_steps, shift=shift, denoising_strength=denoising_strength)


def sdedit_start_latents(
    schedule: FlowMatchSchedule, input_latents: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """``(1 − σ_0)·x_0 + σ_0·noise``: the input video's latents noised to the first level.

    Args:
        schedule: the request's schedule (:func:`sdedit_schedule`).
        input_latents: ``x_0``, the VAE latents of the (pasted) input video ``[B, 16, F', H', W']``.
        noise: the request's seeded standard normal noise, same shape.

    Returns:
        ``[B, 16, F', H', W']``.
    """
    return schedule.add_noise(input_latents, noise)


def hard_latent_mask(mask: np.ndarray | torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The official hard face mask on the latent grid.

    Args:
        mask: the mask video, uint8 ``[F, H, W]`` or ``[F, H, W, C]`` (channel 0 is used; 255 =
            face), or bool ``[F, H, W]`` already hard.
        latent_shape: the latents' shape ``[B, C, F', H', W']`` (only the last three are used).

    Returns:
        float32 ``[1, 1, F', H', W']`` of 0 and 1: 1 where the nearest-exact sample of the mask
        is ``>= 192`` (True for a bool mask).
    """
    m = torch.as_tensor(np.asarray(mask)) if isinstance(mask, np.ndarray) else mask
    if m.ndim == 4:
        m = m[..., 0]
    if m.ndim != 3:
        raise InvalidRequestError(
            f"a mask video must be shaped [F, H, W] or [F, H, W, C], got {list(m.shape)}"
        )
    if m.dtype == torch.bool:
        hard = m
    elif m.dtype == torch.uint8:
        hard = m >= HARD_MASK_MIN_PIXEL
    else:
        raise InvalidRequestError(f"a mask video must be uint8 (0..255) or bool, got {m.dtype}")
    if len(latent_shape) < 3:
        raise InvalidRequestError(f"latent_shape must end with [F', H', W'], got {list(latent_shape)}")
    size = tuple(int(n) for n in latent_shape[-3:])
    # Nearest sampling commutes with the threshold, so thresholding first equals the official
    # "resize the [-1, 1] mask, then > 0.5".
    grid = torch.nn.functional.interpolate(
        hard.to(torch.float32)[None, None].cpu(), size=size, mode="nearest-exact"
    )
    return grid


class BackgroundConsistency:
    """Re-imposes the input video outside the face after every denoising step.

    Args:
        schedule: the request's schedule.
        input_latents: ``x_0`` ``[B, 16, F', H', W']``, the latents the run started from.
        noise: the noise tensor the start latents were made with, same shape.
        hard_mask: ``[1, 1, F', H', W']`` (or broadcastable) of 0/1 from :func:`hard_latent_mask`.
    """

    def __init__(
        self,
        schedule: FlowMatchSchedule,
        input_latents: torch.Tensor,
        noise: torch.Tensor,
        hard_mask: torch.Tensor,
    ) -> None:
        if input_latents.shape != noise.shape:
            raise InvalidRequestError(
                f"noise shape {tuple(noise.shape)} != input latents shape {tuple(input_latents.shape)}"
            )
        try:
            torch.broadcast_shapes(hard_mask.shape, input_latents.shape)
        except RuntimeError as e:
            raise InvalidRequestError(
                f"mask shape {tuple(hard_mask.shape)} does not fit latents {tuple(input_latents.shape)}"
            ) from e
        self.schedule = schedule
        self.input_latents = input_latents
        self.noise = noise
        self.face = hard_mask.to(device=input_latents.device) > 0.5

    def background(self, index: int) -> torch.Tensor:
        """The input latents at the level step ``index`` ends at: ``σ_{index+1}``-noised, or clean
        after the last step. Shape of the input latents."""
        if not 0 <= index < self.schedule.num_steps:
            raise InvalidRequestError(
                f"step index {index} out of range for a {self.schedule.num_steps}-step schedule"
            )
        if index == self.schedule.num_steps - 1:
            return self.input_latents
        sigma = self.schedule.sigmas[index + 1].to(self.input_latents.device)
        return (1 - sigma) * self.input_latents + sigma * self.noise

    def apply(self, latents: torch.Tensor, index: int) -> torch.Tensor:
        """After Euler step ``index``: face region from ``latents``, the rest from :meth:`background`.

        Args:
            latents: ``[B, 16, F', H', W']`` the step's output.

        Returns:
            Same shape and dtype as ``latents``.
        """
        background = self.background(index).to(latents.dtype)
        return torch.where(self.face, latents, background)
