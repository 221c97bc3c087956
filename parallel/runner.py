"""The SPMD runner: every rank executes the same whole request in lockstep.

Rank 0 calls `generate(request)`; every other rank sits in `serve_forever()`. Per request:

1. rank 0 validates the request (errors raise there, nobody else is involved yet) and
   broadcasts a header (shapes, dtypes, scalars) over the long-timeout control group, then the
   tensors;
2. setup phase: every rank builds the schedule and its own head slice of the identity cache;
3. one phase per step: CFG passes (sequential, or on the two mesh halves with one exchange),
   Euler step on the replicated latents; the end-of-step agreement carries rank 0's cancel flag;
4. with `decode`, one more phase: every rank of the world decodes a band of latent rows of the
   final latents with the VAE (parallel/vae_decode.py) and the bands are gathered to rank 0.

Each phase ends in an agreement: a failure on any rank becomes `RequestFailedError` on every
rank (with every failing rank's message) and the group serves the next request. A collective
that fails or times out raises `CollectiveError`: the group is then unusable (`broken`) and must
be rebuilt by the owner (the Serve replica replaces its whole group).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from parallel.collectives import Collectives
from parallel.errors import CollectiveError, PeerFailedError, RequestFailedError
from parallel.sharded_dit import ShardedDiT
from parallel.styles import (
    StyleRef,
    StyleResolver,
    check_refs,
    resolve_styles,
    style_refs_from_header,
    styles_digest,
)
from parallel.vae_decode import RowBands, decode_bands
from standin.dit import IdentityCache, WanDiT
from standin.errors import CancelledError, InvalidRequestError
from standin.experts import ExpertRun, ExpertSet
from standin.guidance import combine_guidance, guided_velocity
from standin.scheduler import DEFAULT_SHIFT, FlowMatchSchedule
from standin.sdedit import BackgroundConsistency
from standin.step_cache import FirstBlockCache, StepCache, make_step_cache
from standin.vace import DEFAULT_VACE_SCALE, VaceBranch, VaceInputs, vace_call
from standin.vae import WanVAE

__all__ = ["DenoiseRequest", "SPRunner"]

log = logging.getLogger(__name__)

T = TypeVar("T")
ProgressCallback = Callable[[int, int], None]  # (steps done, total steps)

_TENSOR_FIELDS = (
    "latents",
    "context",
    "negative_context",
    "identity_latents",
    "background_latents",
    "background_noise",
    "background_mask",
    "vace_context",
)
_BACKGROUND_FIELDS = ("background_latents", "background_noise", "background_mask")


@dataclass
class DenoiseRequest:
    """What the DiT stage of one job needs (given to rank 0 only).

    latents: [B, C_in, F, H, W] initial noise; context: [B, L, text_dim] prompt embeddings;
    negative_context: [B, L', text_dim], required when guidance != 1;
    identity_latents: [1 or B, C_in, 1, h, w] VAE latent of the face, or None (plain Wan2.1).

    Video-to-video (face swap, SDEdit): `latents` are the start latents and
    `denoising_strength` < 1 starts the schedule there; background consistency needs all three
    of background_latents ([B, C_in, F, H, W] the input video's latents x0), background_noise
    (the noise the start latents were made with, same shape) and background_mask
    ([1, 1, F, H, W] 0/1, 1 = face): after every step the latents outside the mask are replaced
    by the input noised to that step's level (`standin.sdedit.BackgroundConsistency`), on every
    rank, on the replicated latents.
    """

    latents: torch.Tensor
    context: torch.Tensor
    num_steps: int
    negative_context: torch.Tensor | None = None
    identity_latents: torch.Tensor | None = None
    guidance: float = 5.0
    shift: float = DEFAULT_SHIFT
    denoising_strength: float = 1.0
    # two-expert models (the runner's ExpertSet): the low-noise expert's guidance (None: guidance)
    guidance_low: float | None = None
    background_latents: torch.Tensor | None = None
    background_noise: torch.Tensor | None = None
    background_mask: torch.Tensor | None = None
    # Wan2.1-VACE (standin/vace.py): the control context [1 or B, 96, F, H, W] and its scale;
    # every rank shards the context tokens like the video tokens and keeps its own hints.
    vace_context: torch.Tensor | None = None
    vace_scale: float = DEFAULT_VACE_SCALE
    # style LoRAs (parallel/styles.py): sent as references; every rank resolves its own adapters
    styles: tuple[StyleRef, ...] = ()
    # opt-in step caching (standin/step_cache.py); every rank keeps its own state of the request
    # and takes the same skip decisions (the statistic is gathered over the SP group)
    cache: StepCache | None = None
    # decode the final latents on every rank of the replica, a band of latent rows each (the
    # runner needs a vae): `generate` then returns the video [B, 3, 1 + 4(F-1), 8H, 8W] float32
    # in [-1, 1] instead of the latents
    decode: bool = False
    # leading latent frames that are conditioning, not video (VACE's first-frame reference):
    # dropped before decoding, as the official pipeline decodes only the video's latents
    decode_skip: int = 0


class SPRunner:
    """Runs whole requests over a mesh. Rank 0: `generate`; other ranks: `serve_forever`."""

    def __init__(
        self,
        model: WanDiT,
        comm: Collectives,
        experts: ExpertSet | None = None,
        vace: VaceBranch | None = None,
        styles: StyleResolver | None = None,
        run_block: Callable[..., Any] | None = None,
        vae: WanVAE | None = None,
    ) -> None:
        """`experts`: a two-expert model's DiTs (standin/experts.py; `model` is then the
        high-noise one, or the offload slot); every rank must be given the same set.
        `vace`: the VACE branch of a Wan2.1-VACE model (the same weights on every rank).
        `run_block`: how every expert's blocks run (e.g. `compiled_blocks()`; None: eager).
        `vae`: the VAE for requests with `decode` (the same weights on every rank, on the
        mesh's device; it decodes in its own dtype, float32 as the official Wan runs it)."""
        self.vae = vae
        self.run_block = run_block
        self.vace = vace
        self.styles = styles  # this rank's style LoRA resolver (its own loaded-LoRA cache)
        self.model = model
        self.comm = comm
        self.mesh = comm.mesh
        self.dit = ShardedDiT(model, comm, run_block=run_block)
        self.experts = experts or ExpertSet.single(model)
        self.broken = False
        # Workers: how the last request ended (None: completed), for logs and health checks.
        self.last_error: Exception | None = None

    # -- rank 0 ---------------------------------------------------------------------------

    def generate(
        self,
        request: DenoiseRequest,
        progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Denoise on every rank; returns the final latents [B, C_out, F, H, W] (rank 0 only),
        or with `request.decode` the video [B, 3, 1 + 4(F-1), 8H, 8W] float32 in [-1, 1]
        decoded by every rank of the world.

        Raises InvalidRequestError (nothing sent), RequestFailedError (failed on some rank, the
        group is fine), CancelledError (should_cancel said so between two steps) or
        CollectiveError (the group is broken).
        """
        if self.mesh.rank != 0:
            raise RuntimeError("generate() runs on rank 0; other ranks call serve_forever()")
        self._check_usable()
        self._validate(request)
        header = {
            "op": "run",
            "num_steps": request.num_steps,
            "guidance": float(request.guidance),
            "shift": float(request.shift),
            "denoising_strength": float(request.denoising_strength),
            "guidance_low": None if request.guidance_low is None else float(request.guidance_low),
            "vace_scale": float(request.vace_scale),
            "styles": [r.as_tuple() for r in request.styles],
            "styles_hash": styles_digest(request.styles),
            "cache": None if request.cache is None else request.cache.as_tuple(),
            "decode": request.decode,
            "decode_skip": request.decode_skip,
            "tensors": {
                name: (tuple(t.shape), t.dtype) if t is not None else None
                for name in _TENSOR_FIELDS
                for t in [getattr(request, name)]
            },
        }
        # Staged on the device before the header goes out: a failure here involves nobody else.
        tensors = {
            name: None if t is None else t.to(self.mesh.device).contiguous()
            for name in _TENSOR_FIELDS
            for t in [getattr(request, name)]
        }
        self._guarded(self.comm.broadcast_object, header)
        return self._run(header, tensors, progress, should_cancel)

    def shutdown(self) -> None:
        """Release the workers from `serve_forever` (rank 0)."""
        if self.mesh.world_size > 1 and not self.broken:
            self._guarded(self.comm.broadcast_object, {"op": "stop"})

    # -- ranks 1..N-1 ---------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run requests as rank 0 sends them until `shutdown`. Request errors are logged and
        the loop goes on; a CollectiveError (broken group) ends it by raising."""
        while self.serve_one():
            pass

    def serve_one(self) -> bool:
        """Take part in one request; False when rank 0 said stop."""
        self._check_usable()
        header = self._guarded(self.comm.broadcast_object, None)
        if header["op"] == "stop":
            return False
        self.last_error = None
        try:
            self._run(header, None, None, None)
        except (RequestFailedError, CancelledError) as exc:
            log.info("rank %d: request ended: %s", self.mesh.rank, exc)
            self.last_error = exc
        return True

    # -- the request, on every rank -------------------------------------------------------

    def _run(
        self,
        header: dict[str, Any],
        tensors: dict[str, torch.Tensor | None] | None,
        progress: ProgressCallback | None,
        should_cancel: Callable[[], bool] | None,
    ) -> torch.Tensor:
        device = self.mesh.device
        received: dict[str, torch.Tensor | None] = {}
        for name in _TENSOR_FIELDS:
            spec = header["tensors"][name]
            if spec is None:
                received[name] = None
                continue
            shape, dtype = spec
            buf = tensors[name] if tensors else torch.empty(shape, dtype=dtype, device=device)
            received[name] = self._guarded(self.comm.broadcast, buf)
        latents = received["latents"]

        def setup() -> tuple[FlowMatchSchedule, ExpertRun[ShardedDiT], BackgroundConsistency | None]:
            strength = header.get("denoising_strength", 1.0)
            schedule = FlowMatchSchedule(
                header["num_steps"], shift=header["shift"], denoising_strength=strength
            )
            ident = received["identity_latents"]
            adapters = resolve_styles(self.styles, style_refs_from_header(header))

            def build_identity(dit: ShardedDiT, adapters: Any) -> IdentityCache | None:
                return dit.identity_cache(ident, latents.shape, adapters) if ident is not None else None

            # The expert of every step (the same rule as the pipeline's), each with its own cache.
            run = ExpertRun(
                self.experts,
                schedule,
                build_identity,
                guidance=header["guidance"],
                guidance_low=header.get("guidance_low"),
                adapters=adapters,
                wrap=lambda m: self.dit if m is self.model else ShardedDiT(m, self.comm, self.run_block),
            )
            run.step(0)  # the first expert's identity cache, built here
            keeper = None
            if received["background_latents"] is not None:
                x0, noise, mask = (received[name] for name in _BACKGROUND_FIELDS)
                keeper = BackgroundConsistency(schedule, x0, noise, mask)
            return schedule, run, keeper

        schedule, run, keeper = self._phase(setup)
        cache_setting = header.get("cache")
        step_cache = make_step_cache(StepCache(*cache_setting) if cache_setting else None)
        for i in range(schedule.num_steps):
            vace_scale = header.get("vace_scale")
            step = functools.partial(self._step, schedule, i, latents, received, run, vace_scale, step_cache)
            if keeper is not None:
                step = functools.partial(_then_keep_background, step, keeper, i)
            latents = self._phase(step, should_cancel)
            if progress is not None:
                try:
                    progress(i + 1, schedule.num_steps)
                except Exception:  # reporting must not desynchronise rank 0 from the others
                    log.exception("progress callback failed")
        run.finish()
        if header.get("decode"):
            video_latents = latents[:, :, header.get("decode_skip", 0) :]
            return self._phase(functools.partial(self._decode, video_latents))
        return latents

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents [B, 16, F, H, W], the same on every rank → the video, every rank
        decoding a band of rows (world ranks: the CFG halves too)."""
        if self.vae is None:
            raise InvalidRequestError(f"rank {self.mesh.rank} has no VAE to decode with")
        return decode_bands(self.vae, latents, self.comm, root=0)  # only rank 0 returns the video

    def _step(
        self,
        schedule: FlowMatchSchedule,
        i: int,
        latents: torch.Tensor,
        received: dict[str, torch.Tensor | None],
        run: ExpertRun[ShardedDiT],
        vace_scale: float | None = None,
        step_cache: FirstBlockCache | None = None,
    ) -> torch.Tensor:
        """One denoising step on every rank with the step's expert: latents [B, C, F, H, W] →
        the next latents. The expert's first step builds its identity cache (a switch)."""
        vace_ctx = received.get("vace_context")
        vace = None if vace_ctx is None else VaceInputs(vace_ctx, vace_scale)
        t = schedule.timestep(i).to(latents.device).expand(latents.shape[0])
        expert = run.step(i)
        if step_cache is not None:
            step_cache.begin_step(i, expert.name)
        ctx, neg = received["context"], received["negative_context"]
        velocity = self._velocity(
            latents, t, ctx, neg, expert.identity, expert.guidance, expert.model, vace, expert.adapters,
            step_cache,
        )
        return schedule.step(velocity, i, latents)

    def _velocity(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        negative: torch.Tensor | None,
        identity: IdentityCache | None,
        guidance: float,
        dit: ShardedDiT | None = None,
        vace: VaceInputs | None = None,
        adapters: Any = None,
        step_cache: FirstBlockCache | None = None,
    ) -> torch.Tensor:
        """CFG-combined velocity [B, C_out, F, H, W], the same on every rank (`dit`: the step's
        expert, default the runner's one DiT; `vace`: the request's control, hints per call;
        `step_cache`: the request's step-cache state, each call taking its next slot)."""
        dit = dit or self.dit
        if step_cache is not None:
            if vace is not None:
                raise InvalidRequestError("step caching is not available with a control video (VACE)")
            call = step_cache.call(dit.model, identity, adapters, base=dit.plan)
        elif vace is None:
            call = functools.partial(dit, identity=identity, adapters=adapters)
        else:
            if self.vace is None:
                raise InvalidRequestError("this model has no VACE branch: a control video needs one")
            call = vace_call(dit.model, self.vace, vace, identity, adapters, plan=dit.plan)
        if self.mesh.config.cfg == 2:
            # Half 0 runs the positive pass, half 1 the negative; one exchange combines them.
            ctx = context if self.mesh.cfg_index == 0 or negative is None else negative
            mine = call(latents, t, ctx)
            pos, neg = self.comm.all_gather(mine, self.mesh.cfg_group, 2).unbind(0)
            return pos if guidance == 1.0 else combine_guidance(pos, neg, guidance)
        return guided_velocity(call, latents, t, context, negative, guidance)

    # -- agreement --------------------------------------------------------------------------

    def _phase(self, fn: Callable[[], T], should_cancel: Callable[[], bool] | None = None) -> T:
        """Run fn on every rank, then agree: all ranks succeed, or all raise the same error."""
        error: BaseException | None = None
        result: Any = None
        peer_failed = False
        cancel = False
        try:
            result = fn()
            # Inside the try: a raising cancel check is an agreed failure, not a lone exit.
            if should_cancel is not None:
                cancel = bool(should_cancel())
        except PeerFailedError:
            peer_failed = True  # the failure was already agreed at a gate inside fn
        except CollectiveError:
            self.broken = True
            raise
        except Exception as exc:
            log.exception("rank %d: request failed", self.mesh.rank)
            error = exc
        if not peer_failed:
            agreement = self._guarded(self.comm.agree, error is not None, cancel)
            failed = agreement.failed
        else:
            failed, agreement = True, None
        if failed:
            message = None if error is None else f"{type(error).__name__}: {error}"
            messages = self._guarded(self.comm.all_gather_object, message)
            failures = {r: m for r, m in enumerate(messages) if m is not None}
            raise RequestFailedError(failures) from error
        if agreement is not None and agreement.cancelled:
            raise CancelledError("generation cancelled by the caller")
        return result

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except CollectiveError:
            self.broken = True
            raise

    def _check_usable(self) -> None:
        if self.broken:
            raise CollectiveError("a collective failed or timed out earlier: rebuild the process group")

    def _validate(self, request: DenoiseRequest) -> None:
        """Reject a bad request on rank 0, before any other rank hears of it."""
        lat, ctx = request.latents, request.context
        cfg = self.model.config
        if not isinstance(lat, torch.Tensor) or lat.ndim != 5 or lat.shape[1] != cfg.in_dim:
            raise InvalidRequestError(f"latents must be [B, {cfg.in_dim}, F, H, W], got {_shape(lat)}")
        try:
            self.model.token_grid(lat.shape)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        b = lat.shape[0]
        for name in ("context", "negative_context"):
            c = getattr(request, name)
            if c is None:
                continue
            if (
                not isinstance(c, torch.Tensor)
                or c.ndim != 3
                or c.shape[0] != b
                or c.shape[2] != cfg.text_dim
            ):
                raise InvalidRequestError(f"{name} must be [{b}, L, {cfg.text_dim}], got {_shape(c)}")
        if ctx is None:
            raise InvalidRequestError("context is required")
        ident = request.identity_latents
        if ident is not None and (
            not isinstance(ident, torch.Tensor)
            or ident.ndim != 5
            or ident.shape[0] not in (1, b)
            or ident.shape[1] != cfg.in_dim
            or ident.shape[2] != 1
        ):
            raise InvalidRequestError(
                f"identity_latents must be [1 or {b}, {cfg.in_dim}, 1, h, w], got {_shape(ident)}"
            )
        if ident is not None:
            try:
                self.model.token_grid(ident.shape)
            except ValueError as exc:
                raise InvalidRequestError(f"identity_latents: {exc}") from None
        if (
            isinstance(request.guidance, bool)
            or not isinstance(request.guidance, (int, float))
            or (not math.isfinite(request.guidance))
        ):
            raise InvalidRequestError(f"guidance must be a finite number, got {request.guidance!r}")
        if request.guidance != 1.0 and request.negative_context is None:
            raise InvalidRequestError("guidance != 1 needs a negative_context")
        low = request.guidance_low
        bad_low = isinstance(low, bool) or not isinstance(low, (int, float)) or not math.isfinite(low)
        if low is not None and bad_low:
            raise InvalidRequestError(f"guidance_low must be a finite number, got {low!r}")
        if low not in (None, 1.0) and request.negative_context is None:
            raise InvalidRequestError("guidance_low != 1 needs a negative_context")
        if request.cache is not None:
            if not isinstance(request.cache, StepCache):
                raise InvalidRequestError(f"cache must be a StepCache or None, got {request.cache!r}")
            request.cache.validate()
            if request.vace_context is not None:
                raise InvalidRequestError("step caching is not available with a control video (VACE)")
        if request.vace_context is not None:
            if self.vace is None:
                raise InvalidRequestError("this model has no VACE branch: a control video needs one")
            VaceInputs(request.vace_context, request.vace_scale).validate(self.vace.config.in_dim, lat.shape)
        if not isinstance(request.decode, bool):
            raise InvalidRequestError(f"decode must be True or False, got {request.decode!r}")
        if request.decode:
            if self.vae is None:
                raise InvalidRequestError("decode needs a runner built with a vae (SPRunner(..., vae=...))")
            if self.vae.config.z_dim != cfg.out_dim:
                raise InvalidRequestError(
                    f"the VAE decodes {self.vae.config.z_dim} latent channels, the DiT makes {cfg.out_dim}"
                )
            RowBands(lat.shape[-2], self.mesh.world_size)  # raises when rows < ranks
        skip = request.decode_skip
        if not isinstance(skip, int) or isinstance(skip, bool) or not 0 <= skip < lat.shape[2]:
            raise InvalidRequestError(
                f"decode_skip must be an int in [0, {lat.shape[2]}) (latent frames), got {skip!r}"
            )
        # styles: references only; rank 0 loads its own first (a missing or bad file fails here)
        resolve_styles(self.styles, check_refs(request.styles))
        # Raises InvalidRequestError for bad num_steps / shift / strength.
        schedule = FlowMatchSchedule(
            request.num_steps, shift=request.shift, denoising_strength=request.denoising_strength
        )
        background = [getattr(request, name) for name in _BACKGROUND_FIELDS]
        if any(t is not None for t in background):
            if any(not isinstance(t, torch.Tensor) for t in background):
                raise InvalidRequestError(
                    "background consistency needs background_latents, background_noise and background_mask"
                )
            x0, noise, mask = background
            if x0.shape != lat.shape:
                raise InvalidRequestError(
                    f"background_latents must be shaped like latents {_shape(lat)}, got {_shape(x0)}"
                )
            BackgroundConsistency(schedule, x0, noise, mask)  # raises for bad shapes


def _then_keep_background(
    step: Callable[[], torch.Tensor], keeper: BackgroundConsistency, i: int
) -> torch.Tensor:
    """`step()`, then the input video re-imposed outside the face (latents [B, C, F, H, W])."""
    return keeper.apply(step(), i)


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
