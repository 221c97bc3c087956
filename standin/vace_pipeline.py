"""Identity videos that follow a control video (pose, depth, silhouettes…): Stand-In + Wan2.1-VACE.

The stages of `StandInPipeline.generate` with the control added: the control video decides
size and frame count; its VACE context is encoded once per request; the denoising loop runs the
DiT with VACE hints on every call (`DenoiseInputs.vace`); a first-frame reference adds one
latent frame in front (its noise rotated in, as the official pipeline) that is dropped before
decoding.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from standin.errors import InvalidRequestError
from standin.forward_plan import LinearAdapters
from standin.pipeline import CancelCheck, DenoiseInputs, GenerationParams, ProgressCallback, StandInPipeline
from standin.vace import DEFAULT_VACE_SCALE, VaceInputs, check_vace_scale
from standin.vace_conditioning import ControlVideo, control_noise, encode_control

__all__ = ["controlled_params", "generate_with_control"]


def controlled_params(params: GenerationParams, control: ControlVideo) -> GenerationParams:
    """`params` with width, height and frame count taken from the control video."""
    return replace(params, width=control.width, height=control.height, num_frames=control.num_frames)


def generate_with_control(
    pipe: StandInPipeline,
    params: GenerationParams,
    control: ControlVideo,
    identity_image: np.ndarray | None = None,
    vace_scale: float = DEFAULT_VACE_SCALE,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    styles: LinearAdapters | None = None,
) -> torch.Tensor:
    """Prompt + control video (+ preprocessed reference face) → video [1, 3, F, H, W] in [-1, 1].

    F, H, W are the control video's (`controlled_params`); the prompt, seed, steps and guidance
    are `params`'. Raises `InvalidRequestError` when the pipeline has no VACE branch.
    """
    if pipe.vace is None:
        raise InvalidRequestError(
            f"preset {pipe.preset.name} has no VACE branch: a control video needs one"
        )
    params = controlled_params(params, control)
    params.validate()
    check_vace_scale(vace_scale)
    use_cfg = params.guidance_scale != 1.0
    ctx, neg = pipe.encode_prompts(params.prompt, params.negative_prompt if use_cfg else None)
    identity = pipe.encode_identity(identity_image) if identity_image is not None else None
    vace_context = encode_control(pipe.vae, control, pipe.device)
    with_first = control.first_frame is not None
    inputs = DenoiseInputs.for_request(params, ctx, neg, identity, adapters=styles)
    inputs.noise = control_noise(params.seed, params.latent_shape, with_first)
    inputs.vace = VaceInputs(vace_context, vace_scale)
    inputs.vace.validate(pipe.vace.config.in_dim, inputs.noise.shape)  # fail before the first step
    latents = pipe.denoise(inputs, progress, should_cancel)
    if with_first:
        latents = latents[:, :, 1:]  # the reference frame is conditioning, not output
    return pipe.decode(latents)
