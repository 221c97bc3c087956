"""Single-process generation: prompt + reference face → video frames.

The stages follow the data: encode (prompts with umT5, the face with the VAE) → denoise
(flow-matching Euler with classifier-free guidance over the Stand-In DiT) → decode (VAE).
The identity cache is built once per request and reused for every step and for both CFG
passes; it lives in `denoise`'s frame, never on the model, so concurrent requests through
one pipeline cannot see each other's faces.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from standin.checkpoints import load_wan_dit, shard_files
from standin.dit import IdentityCache, WanDiT
from standin.errors import CancelledError, CheckpointError, InvalidRequestError
from standin.experts import HIGH, ExpertRun, ExpertSet, Residency
from standin.forward_plan import LOCAL, LinearAdapters
from standin.guidance import guided_velocity
from standin.presets import (
    DIT_SHARDS,
    STANDIN_FILE,
    T5_FILE,
    TOKENIZER_FILE,
    VAE_FILE,
    ModelPreset,
    get_preset,
)
from standin.scheduler import FlowMatchSchedule
from standin.step_cache import FirstBlockCache, StepCache, make_step_cache
from standin.text_encoder import TextEncoder
from standin.tiny_weights import TINY_WEIGHTS, load_tiny_weights
from standin.vace import TINY_VACE_WEIGHTS, VaceBranch, VaceInputs, load_tiny_vace, load_vace_dit, vace_call
from standin.vae import WanVAE, load_wan_vae
from standin.wan22 import load_two_experts, standin_paths, tiny_two_experts

log = logging.getLogger(__name__)

# Wan2.1's standard negative prompt (the official Stand-In default).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
MAX_SIDE = 2048
MAX_FRAMES = 257
MAX_STEPS = 200
MAX_PROMPT_CHARS = 20_000

# step index (1-based), total steps
ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]
# (latents [B, 16, F', H', W'] after step i, i) → the latents the next step starts from
AfterStep = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class GenerationParams:
    """One request's settings. Defaults are the official Stand-In / Wan2.1 ones."""

    prompt: str
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    width: int = 832
    height: int = 480
    num_frames: int = 81
    num_steps: int = 20
    guidance_scale: float = 5.0
    shift: float = 5.0
    # two-expert models (Wan2.2 A14B): the low-noise expert's scale (None: guidance_scale, which
    # is then the high-noise expert's); ignored by one-DiT models
    guidance_scale_low: float | None = None
    seed: int = 0
    # "separate": two DiT passes per step (positive, negative); "batched": one pass of batch 2.
    cfg_mode: Literal["separate", "batched"] = "separate"
    # opt-in step caching (standin/step_cache.py), e.g. StepCache("first_block", 0.05); None: off
    cache: StepCache | None = None

    def validate(self) -> None:
        """Raise `InvalidRequestError` naming the first bad parameter."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidRequestError("prompt must be a non-empty string")
        for name in ("prompt", "negative_prompt"):
            text = getattr(self, name)
            if not isinstance(text, str):
                raise InvalidRequestError(f"{name} must be a string")
            if len(text) > MAX_PROMPT_CHARS:
                raise InvalidRequestError(
                    f"{name} is {len(text)} characters, the limit is {MAX_PROMPT_CHARS}"
                )
        for name in ("width", "height"):
            v = getattr(self, name)
            if not _is_int(v) or not 16 <= v <= MAX_SIDE or v % 16:
                raise InvalidRequestError(f"{name} must be a multiple of 16 in [16, {MAX_SIDE}], got {v!r}")
        f = self.num_frames
        if not _is_int(f) or not 1 <= f <= MAX_FRAMES or (f - 1) % 4:
            raise InvalidRequestError(f"num_frames must be 4k+1 in [1, {MAX_FRAMES}] (e.g. 81), got {f!r}")
        if not _is_int(self.num_steps) or not 1 <= self.num_steps <= MAX_STEPS:
            raise InvalidRequestError(
                f"num_steps must be an integer in [1, {MAX_STEPS}], got {self.num_steps!r}"
            )
        g = self.guidance_scale
        if not _is_real(g) or not 0 <= g <= 50:
            raise InvalidRequestError(f"guidance_scale must be a number in [0, 50], got {g!r}")
        g = self.guidance_scale_low
        if g is not None and (not _is_real(g) or not 0 <= g <= 50):
            raise InvalidRequestError(f"guidance_scale_low must be a number in [0, 50], got {g!r}")
        if not _is_real(self.shift) or not 0 < self.shift <= 100:
            raise InvalidRequestError(f"shift must be a number in (0, 100], got {self.shift!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise InvalidRequestError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if self.cfg_mode not in ("separate", "batched"):
            raise InvalidRequestError(f"cfg_mode must be 'separate' or 'batched', got {self.cfg_mode!r}")
        if self.cache is not None:
            if not isinstance(self.cache, StepCache):
                raise InvalidRequestError(f"cache must be a StepCache or None, got {self.cache!r}")
            self.cache.validate()

    @property
    def uses_guidance(self) -> bool:
        """Whether any step runs a negative pass (a two-expert model's low scale counts too)."""
        return self.guidance_scale != 1.0 or self.guidance_scale_low not in (None, 1.0)

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        """[1, 16, F', H/8, W/8] of the video latents."""
        return (1, 16, (self.num_frames - 1) // 4 + 1, self.height // 8, self.width // 8)


def _is_int(v: object) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, int | float | np.floating) and not isinstance(v, bool) and math.isfinite(v)


def initial_noise(params: GenerationParams) -> torch.Tensor:
    """Seeded Gaussian latents, drawn on the CPU in float32 (as the official pipeline) so a
    seed gives the same start on every device."""
    generator = torch.Generator("cpu").manual_seed(params.seed)
    return torch.randn(params.latent_shape, generator=generator, dtype=torch.float32)


def image_to_video_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] RGB → [1, 3, 1, H, W] in [-1, 1] (a 1-frame video for the VAE)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise InvalidRequestError(
            f"identity image must be uint8 [H, W, 3] RGB, got {arr.dtype} {tuple(arr.shape)}"
        )
    if arr.shape[0] % 16 or arr.shape[1] % 16 or min(arr.shape[:2]) < 16:
        raise InvalidRequestError(
            f"identity image sides must be multiples of 16 (512×512 after preprocessing), got {arr.shape[:2]}"
        )
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return t[None, :, None]


def reference_video(image: np.ndarray, size: int) -> torch.Tensor:
    """`image_to_video_tensor`, resized to size×size when it is not already (the reference size
    the preset's identity branch was trained on)."""
    video = image_to_video_tensor(image)
    if video.shape[-2:] != (size, size):
        frame = torch.nn.functional.interpolate(
            video[:, :, 0], size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        video = frame.clamp(-1, 1)[:, :, None]
    return video


@dataclass
class DenoiseInputs:
    """What the denoising loop needs; all tensors already encoded."""

    noise: torch.Tensor  # [B, 16, F', H', W'] float32
    context: torch.Tensor  # [B, L, text_dim] positive prompt
    negative_context: torch.Tensor | None  # [B, L, text_dim]; None when guidance is off
    identity_latents: torch.Tensor | None  # [B or 1, 16, 1, h, w]
    schedule: FlowMatchSchedule
    guidance_scale: float
    cfg_mode: str = "separate"
    # two-expert models: the low-noise expert's guidance (None: guidance_scale)
    guidance_low: float | None = None
    # the request's style LoRAs (a `standin.styles.StyleSet`), applied unmerged in every DiT call
    # and in the identity cache; None: the base model
    adapters: LinearAdapters | None = None
    # Video-to-video (face swap, SDEdit): the latents the loop starts from instead of `noise`
    # ([B, 16, F', H', W'], e.g. `sdedit_start_latents`), and a function applied to the latents
    # after every step i (e.g. `BackgroundConsistency.apply`). None: text-to-video.
    start_latents: torch.Tensor | None = None
    after_step: AfterStep | None = None
    # Wan2.1-VACE: the request's control context and scale (standin/vace_conditioning.py); the
    # pipeline's `vace` branch adds its hints in every DiT call. None: no control video.
    vace: VaceInputs | None = None
    # opt-in step caching: the setting; `denoise` makes the request's own state from it
    cache: StepCache | None = None

    @classmethod
    def for_request(
        cls,
        params: GenerationParams,
        context: torch.Tensor,
        negative_context: torch.Tensor | None,
        identity_latents: torch.Tensor | None,
        adapters: LinearAdapters | None = None,
    ) -> DenoiseInputs:
        """The request's seeded noise and schedule around its encoded prompts, face and styles."""
        return cls(
            noise=initial_noise(params),
            context=context,
            negative_context=negative_context,
            identity_latents=identity_latents,
            schedule=FlowMatchSchedule(params.num_steps, shift=params.shift),
            guidance_scale=params.guidance_scale,
            cfg_mode=params.cfg_mode,
            guidance_low=params.guidance_scale_low,
            adapters=adapters,
            cache=params.cache,
        )


class StandInPipeline:
    """DiT + VAE + text encoder on one device. Holds weights only; every call is independent."""

    def __init__(
        self,
        dit: WanDiT,
        vae: WanVAE,
        text_encoder: TextEncoder,
        preset: ModelPreset,
        experts: ExpertSet | None = None,
        vace: VaceBranch | None = None,
    ) -> None:
        # experts: a two-expert model's DiTs (standin/experts.py); `dit` is then the high-noise one
        self.dit = dit
        self.vae = vae
        self.text_encoder = text_encoder
        self.preset = preset
        self.experts = experts
        self.vace = vace  # the VACE branch of a Wan2.1-VACE model (standin/vace.py), or None
        # How every DiT call runs; `ForwardPlan(run_block=compiled_blocks())` compiles the blocks
        # (`standin generate --compile`). Configuration, like the weights: no request state.
        self.plan = LOCAL

    @property
    def device(self) -> torch.device:
        return self.dit.patch_embedding.weight.device

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_preset(
        cls,
        name: str | ModelPreset,
        checkpoint_dir: Path | None = None,
        *,
        standin_checkpoint: Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        standin_low_checkpoint: Path | None = None,
        expert_residency: Residency = "resident",
    ) -> StandInPipeline:
        """Build a pipeline. `tiny` loads the trained weights shipped in the package; real
        presets load a Wan2.1 checkpoint directory (+ Stand-In's LoRA file, looked up there by
        default). Two-expert presets (Wan2.2 A14B): `standin_checkpoint` is the high-noise
        expert's file, `standin_low_checkpoint` the low-noise one's; `expert_residency` keeps
        both on the device or the idle one in host memory (standin/experts.py).
        Defaults: CUDA and bf16 when a GPU is present, else CPU and float32 (VAE stays float32)."""
        preset = name if isinstance(name, ModelPreset) else get_preset(name)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if preset.experts is not None:
            standin = (standin_checkpoint, standin_low_checkpoint)
            return cls._two_experts(preset, checkpoint_dir, standin, device, dtype, expert_residency)
        if not preset.needs_checkpoint:
            return cls._shipped(preset, device, dtype)
        if checkpoint_dir is None:
            raise CheckpointError(
                f"preset {preset.name} needs --checkpoint-dir (a Wan2.1 checkpoint directory)"
            )
        checkpoint_dir = Path(checkpoint_dir)
        standin_checkpoint = Path(standin_checkpoint or checkpoint_dir / STANDIN_FILE)
        check_checkpoint_dir(checkpoint_dir, standin_checkpoint)
        vace = None
        if preset.vace is not None:  # Wan2.1-VACE: DiT and VACE branch from the same shards
            dit, vace = load_vace_dit(
                checkpoint_dir, preset.dit, preset.vace, lora_path=standin_checkpoint, dtype=dtype,
                device=device,
            )
        else:
            dit = load_wan_dit(
                checkpoint_dir, preset.dit, lora_path=standin_checkpoint, dtype=dtype, device=device
            )
        vae = load_wan_vae(checkpoint_dir / VAE_FILE, dtype=torch.float32, device=device, config=preset.vae)
        text = TextEncoder.from_checkpoint_dir(checkpoint_dir, dtype=dtype, device=device, config=preset.text)
        return cls(dit, vae, text, preset, vace=vace)

    @classmethod
    def _shipped(
        cls, preset: ModelPreset, device: torch.device, dtype: torch.dtype
    ) -> StandInPipeline:
        """The tiny preset's trained weights (standin/weights/tiny.safetensors, `standin train`)."""
        dit, vae, meta = load_tiny_weights(TINY_WEIGHTS, preset)
        dit = dit.to(device=device).to_inference_dtype(dtype)  # float32 where the official keeps it
        vae = vae.to(device=device)
        seed = meta.get("text_encoder_seed", 0)
        text = TextEncoder.tiny(seed, dtype=dtype, device=device, config=preset.text)
        vace = None
        if preset.vace is not None and TINY_VACE_WEIGHTS.exists():  # `standin train --recipe vace`
            vace = load_tiny_vace(TINY_VACE_WEIGHTS, preset.dit, preset.vace)[0]
            vace = vace.to(device=device, dtype=dtype)
        return cls(dit, vae, text, preset, vace=vace)

    @classmethod
    def _two_experts(
        cls,
        preset: ModelPreset,
        checkpoint_dir: Path | None,
        standin: tuple[Path | None, Path | None],
        device: torch.device,
        dtype: torch.dtype,
        residency: Residency,
    ) -> StandInPipeline:
        """A two-expert preset: tiny-a14b from the shipped weights, Wan2.2 from its directory."""
        if not preset.needs_checkpoint:
            experts, vae, meta = tiny_two_experts(preset, device, dtype, residency)
            seed = meta.get("text_encoder_seed", 0)
            text = TextEncoder.tiny(seed, dtype=dtype, device=device, config=preset.text)
        else:
            if checkpoint_dir is None:
                raise CheckpointError(
                    f"preset {preset.name} needs --checkpoint-dir (a Wan2.2-T2V-A14B checkpoint directory)"
                )
            checkpoint_dir = Path(checkpoint_dir)
            files = standin_paths(checkpoint_dir, preset.experts, *standin)
            experts, vae, text = load_two_experts(
                checkpoint_dir, preset, standin=files, dtype=dtype, device=device, residency=residency
            )
        return cls(experts.residency.activate(HIGH), vae, text, preset, experts)

    # -- the stages ---------------------------------------------------------------------

    def encode_prompts(
        self, prompt: str, negative_prompt: str | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """→ context [1, 512, text_dim] for the prompt, and for the negative prompt (or None)."""
        prompts = [prompt] if negative_prompt is None else [prompt, negative_prompt]
        ctx = self.text_encoder.encode_prompts(prompts).to(self.device)
        return ctx[:1], (ctx[1:] if negative_prompt is not None else None)

    @torch.no_grad()
    def encode_identity(self, image: np.ndarray) -> torch.Tensor:
        """Preprocessed reference uint8 [512, 512, 3] → identity latents [1, 16, 1, 64, 64]
        (at the preset's `reference_size`: tiny was trained on 32² references)."""
        return self.vae.encode(reference_video(image, self.preset.reference_size).to(self.device))

    @torch.no_grad()
    def denoise(
        self,
        inputs: DenoiseInputs,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        reuse_identity_cache: bool = True,
    ) -> torch.Tensor:
        """Run every flow-matching step → clean latents, float32.

        `reuse_identity_cache=False` rebuilds the identity K/V at every DiT call, as an
        uncached implementation would (for tests and the identity-overhead benchmark).
        """
        start = inputs.noise if inputs.start_latents is None else inputs.start_latents
        latents = start.to(self.device, torch.float32)

        def make_cache(dit: WanDiT, adapters: LinearAdapters | None) -> IdentityCache | None:
            if inputs.identity_latents is None:
                return None
            ident = inputs.identity_latents.to(self.device)
            return dit.identity_cache(ident, latents.shape, adapters=adapters, plan=self.plan)

        schedule = inputs.schedule
        step_cache = make_step_cache(inputs.cache)  # this request's own state (None: off)
        # The expert of each step and its identity cache (one "base" expert for Wan2.1 models).
        experts = self.experts or ExpertSet.single(self.dit)
        with experts.request():
            run = ExpertRun(
                experts,
                schedule,
                make_cache if reuse_identity_cache else lambda dit, adapters: None,
                guidance=inputs.guidance_scale,
                guidance_low=inputs.guidance_low,
                adapters=inputs.adapters,
            )
            for i in range(len(schedule)):
                latents = self._step(
                    run, i, latents, inputs, should_cancel, reuse_identity_cache, make_cache, step_cache
                )
                if inputs.after_step is not None:
                    latents = inputs.after_step(latents, i)
                if progress is not None:
                    progress(i + 1, len(schedule))
        return latents

    def _step(
        self,
        run: ExpertRun[WanDiT],
        i: int,
        latents: torch.Tensor,
        inputs: DenoiseInputs,
        should_cancel: CancelCheck | None,
        reuse_identity_cache: bool,
        make_cache: Callable[[WanDiT, LinearAdapters | None], IdentityCache | None],
        step_cache: FirstBlockCache | None = None,
    ) -> torch.Tensor:
        """Step i of the request with its expert: latents [B, 16, F', H', W'] → the next latents."""
        schedule = inputs.schedule
        if should_cancel is not None and should_cancel():
            raise CancelledError(f"cancelled before step {i + 1} of {len(schedule)}")
        t = schedule.timestep(i).to(self.device).expand(latents.shape[0])
        expert = run.step(i)
        identity = expert.identity if reuse_identity_cache else make_cache(expert.model, expert.adapters)
        if step_cache is not None:
            if inputs.vace is not None:
                raise InvalidRequestError("step caching is not available with a control video (VACE)")
            step_cache.begin_step(i, expert.name)
            call = step_cache.call(expert.model, identity, expert.adapters, base=self.plan)
        elif inputs.vace is None:
            model, adapters = expert.model, expert.adapters
            call = functools.partial(model, identity=identity, adapters=adapters, plan=self.plan)
        else:
            vace = self._vace_branch()
            call = vace_call(expert.model, vace, inputs.vace, identity, expert.adapters, self.plan)
        ctx, neg = inputs.context, inputs.negative_context
        velocity = guided_velocity(call, latents, t, ctx, neg, expert.guidance, inputs.cfg_mode)
        return schedule.step(velocity, i, latents)

    def _vace_branch(self) -> VaceBranch:
        if self.vace is None:
            raise InvalidRequestError(
                f"preset {self.preset.name} has no VACE branch: a control video needs one"
            )
        return self.vace

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [1, 16, F', H', W'] → video [1, 3, F, H, W] in [-1, 1]."""
        return self.vae.decode(latents.to(self.device))

    # -- all of it ----------------------------------------------------------------------

    def generate(
        self,
        params: GenerationParams,
        identity_image: np.ndarray | None = None,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        styles: LinearAdapters | None = None,
    ) -> torch.Tensor:
        """Prompt (+ preprocessed 512² reference) → video [1, 3, F, H, W] in [-1, 1].

        Without `identity_image` this is plain Wan2.1 text-to-video. `styles`: the request's
        style LoRAs (`standin.styles.StyleSet`, on the model's device), applied unmerged.
        """
        params.validate()
        use_cfg = params.uses_guidance
        ctx, neg = self.encode_prompts(params.prompt, params.negative_prompt if use_cfg else None)
        identity = self.encode_identity(identity_image) if identity_image is not None else None
        inputs = DenoiseInputs.for_request(params, ctx, neg, identity, adapters=styles)
        latents = self.denoise(inputs, progress, should_cancel)
        return self.decode(latents)


def check_checkpoint_dir(checkpoint_dir: Path, standin_checkpoint: Path | None) -> None:
    """Raise one `CheckpointError` listing every file a Wan2.1 (+ Stand-In) directory lacks."""
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"checkpoint directory does not exist: {checkpoint_dir}")
    missing = [
        str(checkpoint_dir / rel)
        for rel in (VAE_FILE, T5_FILE, TOKENIZER_FILE)
        if not (checkpoint_dir / rel).is_file()
    ]
    try:
        shard_files(checkpoint_dir, DIT_SHARDS)
    except CheckpointError as e:
        missing.insert(0, str(e))
    if standin_checkpoint is not None and not standin_checkpoint.is_file():
        missing.append(str(standin_checkpoint))
    if missing:
        raise CheckpointError("missing checkpoint files:\n  " + "\n  ".join(missing))
