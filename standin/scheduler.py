"""Flow-matching Euler sampler with a shifted sigma schedule, as Stand-In samples Wan2.1.

Stand-In's official pipeline uses the flow-matching formulation ``x_t = (1 - s) x_0 + s noise``
where the DiT predicts the velocity ``v = noise - x_0``. The schedule it samples with is:

    u_i   = linspace(s_start, 0, num_steps + 1)[i]           for i = 0 .. num_steps - 1
    s_i   = shift * u_i / (1 + (shift - 1) * u_i)            (shift = 5.0 by default)
    t_i   = 1000 * s_i                                       (the timestep the DiT sees)

with ``s_start = denoising_strength`` (1.0 for text-to-video), and one Euler step per ``s_i``
that ends at ``s = 0``. The official code computes this in float32; so do we by default, so that
our timesteps are bit-identical to theirs.

A :class:`FlowMatchSchedule` belongs to one request: it holds no reference to a model and no
mutable state, so concurrent requests each build their own.

Wan2.1's UniPC multistep solver (its own default) is not implemented: Stand-In samples with Euler.
"""

from __future__ import annotations

import math

import torch

from standin.errors import InvalidRequestError

__all__ = ["FlowMatchSchedule"]

DEFAULT_SHIFT = 5.0
NUM_TRAIN_TIMESTEPS = 1000


class FlowMatchSchedule:
    """The sigmas and timesteps of one sampling run, and its Euler update.

    Attributes:
        sigmas: ``[num_steps + 1]`` noise levels, decreasing from ``sigma_start`` to exactly 0.
            ``sigmas[i]`` is the level at step ``i``; ``sigmas[num_steps]`` is the clean end.
        timesteps: ``[num_steps]`` the DiT's timestep input at each step, ``sigmas[:-1] * 1000``.
    """

    def __init__(
        self,
        num_steps: int,
        shift: float = DEFAULT_SHIFT,
        denoising_strength: float = 1.0,
        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Build the schedule.

        Args:
            num_steps: number of denoising steps (DiT evaluations per CFG branch), >= 1.
            shift: sigma shift; > 1 spends more steps at high noise. Stand-In uses 5.0.
            denoising_strength: in (0, 1]; 1.0 starts from pure noise, less starts from a
                noised input latent (see :meth:`add_noise`).
            num_train_timesteps: scale from sigma to the DiT's timestep (1000 for Wan).
            dtype: floating dtype of ``sigmas``/``timesteps``; float32 matches the official code.
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise InvalidRequestError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        if not _is_real(shift) or not math.isfinite(shift) or shift <= 0:
            raise InvalidRequestError(f"shift must be a finite number > 0, got {shift!r}")
        if (
            not _is_real(denoising_strength)
            or not math.isfinite(denoising_strength)
            or not 0 < denoising_strength <= 1
        ):
            raise InvalidRequestError(f"denoising_strength must be in (0, 1], got {denoising_strength!r}")
        if (
            isinstance(num_train_timesteps, bool)
            or not isinstance(num_train_timesteps, int)
            or num_train_timesteps < 1
        ):
            raise InvalidRequestError(
                f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}"
            )
        if not dtype.is_floating_point:
            raise InvalidRequestError(f"dtype must be a floating dtype, got {dtype}")

        self.num_steps = num_steps
        self.shift = float(shift)
        self.denoising_strength = float(denoising_strength)
        self.num_train_timesteps = num_train_timesteps

        # num_steps + 1 evenly spaced points down to 0; the shift maps 0 to 0 and 1 to 1.
        unshifted = torch.linspace(self.denoising_strength, 0.0, num_steps + 1, dtype=dtype)
        sigmas = self.shift * unshifted / (1 + (self.shift - 1) * unshifted)
        sigmas[-1] = 0.0  # exact, whatever the rounding above
        self.sigmas: torch.Tensor = sigmas
        self.timesteps: torch.Tensor = sigmas[:-1] * num_train_timesteps

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        return (
            f"FlowMatchSchedule(num_steps={self.num_steps}, shift={self.shift}, "
            f"denoising_strength={self.denoising_strength})"
        )

    def timestep(self, index: int) -> torch.Tensor:
        """The DiT timestep at step ``index``, shape ``[1]`` (cast it to the model's dtype)."""
        self._check_index(index)
        return self.timesteps[index : index + 1].clone()

    def step(self, velocity: torch.Tensor, index: int, latents: torch.Tensor) -> torch.Tensor:
        """One Euler step from ``sigmas[index]`` to ``sigmas[index + 1]``.

        Args:
            velocity: the (CFG-combined) model prediction ``noise - x_0``, same shape as latents.
            index: step number, 0 <= index < num_steps.
            latents: current sample, any shape, e.g. ``[B, 16, F, H, W]``.

        Returns:
            ``latents + (sigmas[index + 1] - sigmas[index]) * velocity``, shape and dtype of
            ``latents``'s promotion with ``velocity``.
        """
        self._check_index(index)
        if velocity.shape != latents.shape:
            raise InvalidRequestError(
                f"velocity shape {tuple(velocity.shape)} != latents shape {tuple(latents.shape)}"
            )
        # A 0-dim tensor does not change the result dtype (bf16 latents stay bf16), as upstream.
        delta = self.sigmas[index + 1] - self.sigmas[index]
        return latents + velocity * delta.to(velocity.device)

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise a clean latent to the schedule's start level ``sigmas[0]``.

        Only needed when ``denoising_strength < 1`` (video-to-video); with strength 1 it returns
        ``noise`` unchanged.

        Args:
            clean: ``x_0``, any shape, e.g. ``[B, 16, F, H, W]``.
            noise: standard normal noise, same shape as ``clean``.

        Returns:
            ``(1 - sigmas[0]) * clean + sigmas[0] * noise``, same shape.
        """
        if clean.shape != noise.shape:
            raise InvalidRequestError(f"noise shape {tuple(noise.shape)} != clean shape {tuple(clean.shape)}")
        sigma = self.sigmas[0].to(clean.device)
        return (1 - sigma) * clean + sigma * noise

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int):
            raise InvalidRequestError(f"step index must be an int, got {index!r}")
        if not 0 <= index < self.num_steps:
            raise InvalidRequestError(f"step index {index} out of range for a {self.num_steps}-step schedule")


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
