"""Mixture-of-experts sampling (Wan2.2 A14B): which DiT runs each step, and a request's expert state.

Wan2.2-T2V-A14B denoises with two DiTs of the Wan2.1-14B architecture: the **high-noise expert**
while the timestep is at or above `boundary · 1000` (boundary 0.875), the **low-noise expert**
once `t < boundary · 1000`. With Stand-In each expert carries its own rank-128 identity LoRA, so
each has its own identity cache: the face is given again at the switch.

This module is the one place that rule lives. The single-process pipeline
(`StandInPipeline.denoise`) and the sequence-parallel runner (`parallel.SPRunner`) both ask an
`ExpertRun` — one request's view of an `ExpertSet` — for the expert of each step. A model with one
DiT is an `ExpertSet` of one expert ("base"), so there is one sampling loop for both kinds.

Identity caches are built **lazily**, when an expert first runs, and the high expert's cache is
dropped at the switch (timesteps only decrease, so it never runs again in that request): one
cache is alive at a time, and under `expert_residency: offload` the low expert's cache can only be
built once its weights are on the device anyway. Building both up front costs the same identity
passes (measured on CPU, README "Wan2.2 A14B") and holds both caches for the whole request.

Where the weights live is an `ExpertResidency`:

- `ResidentExperts`: both DiTs on the device (when both fit: cluster/README.md, memory table);
- `OffloadedExperts`: one device copy of the architecture (the *slot*) and both experts' weights
  in (pinned) host memory; switching copies the needed expert's weights into the slot with
  non-blocking host-to-device copies on a side CUDA stream that the compute stream waits for
  before the first use. The swap back to the high expert is issued when a request ends, so it
  overlaps the decode and the next request's encoding. One request at a time uses the slot
  (`ExpertSet.request()` holds a lock), so no request sees another's expert.

Nothing here holds request state across requests: an `ExpertRun` lives in one request's frame.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import torch

from standin.dit import IdentityCache, WanDiT
from standin.errors import InvalidRequestError
from standin.forward_plan import LinearAdapters
from standin.scheduler import NUM_TRAIN_TIMESTEPS, FlowMatchSchedule

__all__ = [
    "BASE",
    "EXPERT_RESIDENCIES",
    "HIGH",
    "LOW",
    "SAMPLING_OPTIONS",
    "WAN22_BOUNDARY",
    "ExpertAdapters",
    "ExpertLayout",
    "ExpertResidency",
    "ExpertRun",
    "ExpertSet",
    "ExpertStep",
    "OffloadedExperts",
    "Residency",
    "ResidentExperts",
    "SamplingOption",
    "expert_adapters",
    "expert_for_timestep",
    "expert_per_step",
    "expert_timestep_range",
]

log = logging.getLogger(__name__)

HIGH, LOW, BASE = "high", "low", "base"
WAN22_BOUNDARY = 0.875
EXPERT_RESIDENCIES = ("resident", "offload")
Residency = Literal["resident", "offload"]

# One adapters object for every expert, or one per expert name (a style's high/low pair).
ExpertAdapters = LinearAdapters | Mapping[str, LinearAdapters | None] | None

M = TypeVar("M")


@dataclass(frozen=True)
class SamplingOption:
    """Defaults of a named sampling option for a two-expert model."""

    num_steps: int
    shift: float
    guidance_high: float
    guidance_low: float


SAMPLING_OPTIONS: dict[str, SamplingOption] = {
    # Stand-In samples Wan2.2 with its usual Wan2.1 defaults, the same guidance for both experts.
    "standin": SamplingOption(num_steps=20, shift=5.0, guidance_high=5.0, guidance_low=5.0),
    # Wan2.2's own T2V-A14B defaults (wan/configs/wan_t2v_A14B.py): guidance (low, high) = (3, 4).
    "wan2.2": SamplingOption(num_steps=40, shift=12.0, guidance_high=4.0, guidance_low=3.0),
}


@dataclass(frozen=True)
class ExpertLayout:
    """Where a two-expert model keeps its experts, and when each runs.

    `dirs[name]`: the expert's folder in the official layout, then in the diffusers layout;
    `standin_files[name]`: its Stand-In identity LoRA file (looked up in the checkpoint dir).
    """

    boundary: float = WAN22_BOUNDARY
    high_dirs: tuple[str, str] = ("high_noise_model", "transformer")
    low_dirs: tuple[str, str] = ("low_noise_model", "transformer_2")
    high_standin: str = "Stand-In_wan2.2_T2V_A14B_high.ckpt"
    low_standin: str = "Stand-In_wan2.2_T2V_A14B_low.ckpt"

    @property
    def names(self) -> tuple[str, str]:
        return (HIGH, LOW)

    def dirs(self, name: str) -> tuple[str, str]:
        return {HIGH: self.high_dirs, LOW: self.low_dirs}[name]

    def standin_file(self, name: str) -> str:
        return {HIGH: self.high_standin, LOW: self.low_standin}[name]


# -- the rule ---------------------------------------------------------------------------------


def expert_for_timestep(t: float, boundary: float | None) -> str:
    """The expert of DiT timestep t (0…1000): low once t < boundary · 1000, else high.

    `boundary` None: a one-expert model ("base")."""
    if boundary is None:
        return BASE
    return LOW if float(t) < boundary * NUM_TRAIN_TIMESTEPS else HIGH


def expert_per_step(schedule: FlowMatchSchedule, boundary: float | None) -> list[str]:
    """The expert of every step of a schedule (e.g. 20 steps, shift 5: 9 × high, then 11 × low)."""
    return [expert_for_timestep(float(t), boundary) for t in schedule.timesteps]


def expert_timestep_range(name: str, boundary: float) -> tuple[float, float]:
    """[low, high) of the DiT timesteps an expert serves (training draws its timesteps there)."""
    edge = boundary * NUM_TRAIN_TIMESTEPS
    if name == HIGH:
        return (edge, float(NUM_TRAIN_TIMESTEPS) + 1.0)
    if name == LOW:
        return (0.0, edge)
    raise ValueError(f"unknown expert {name!r}; choose {HIGH!r} or {LOW!r}")


# -- where the weights live ---------------------------------------------------------------


class ExpertResidency:
    """Gives the DiT of an expert, on the device, ready to run (see the module docstring)."""

    names: tuple[str, ...]

    def activate(self, name: str) -> WanDiT:
        """The expert's DiT with its weights usable by work queued after this call."""
        raise NotImplementedError

    def prefetch(self, name: str) -> None:
        """Start bringing `name` onto the device if it is not there (no-op when resident)."""

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Exclusive use for one request (only a shared device slot needs it)."""
        yield


class ResidentExperts(ExpertResidency):
    """Every expert's DiT stays on the device."""

    def __init__(self, models: Mapping[str, WanDiT]) -> None:
        self.models = dict(models)
        self.names = tuple(self.models)

    def activate(self, name: str) -> WanDiT:
        return self.models[name]


def _slot_like(model: WanDiT, device: torch.device) -> WanDiT:
    """An empty DiT of the same architecture (incl. its LoRA rank) and dtypes on `device`."""
    dtypes = {k: t.dtype for k, t in model.state_dict().items()}
    with torch.device("meta"):
        slot = WanDiT(model.config)
    for key, t in slot.state_dict(keep_vars=True).items():
        t.data = t.data.to(dtypes[key])  # on the meta device: nothing is allocated yet
    slot = slot.to_empty(device=device)
    return slot.eval().requires_grad_(False)


class OffloadedExperts(ExpertResidency):
    """One device slot; every expert's weights in host memory (pinned when CUDA is there).

    `activate(name)` returns the slot after queueing the copy of `name`'s weights into it (if it
    holds another expert): on CUDA the copies are non-blocking, from pinned memory, on a side
    stream that first waits for the work already queued on the slot, and the compute stream waits
    for them; on the CPU they are plain copies. The slot's weights are bit-identical to the
    expert's, so the output is bit-identical to `ResidentExperts`.
    """

    def __init__(self, models: Mapping[str, WanDiT], device: torch.device | str) -> None:
        if not models:
            raise ValueError("no experts")
        self.device = torch.device(device)
        self.names = tuple(models)
        first = models[self.names[0]]
        keys = {k: tuple(t.shape) for k, t in first.state_dict().items()}
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._host: dict[str, dict[str, torch.Tensor]] = {}
        for name, model in models.items():
            state = model.state_dict()
            shapes = {k: tuple(t.shape) for k, t in state.items()}
            if shapes != keys:
                raise ValueError(f"expert {name} does not have the architecture of {self.names[0]}")
            host = {}
            for k, t in state.items():
                t = t.detach().to("cpu")
                # An expert already in pinned host memory is used as it is (no second copy).
                host[k] = (t if t.is_pinned() else t.pin_memory()) if pin else t.clone()
            self._host[name] = host
        self.slot = _slot_like(first, self.device)
        self._slot_tensors = self.slot.state_dict(keep_vars=True)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._ready: torch.cuda.Event | None = None
        self._holds: str | None = None
        self._lock = threading.Lock()
        self.swaps = 0  # how many expert copies into the slot were issued (tests, metrics)
        self.prefetch(self.names[0])

    def prefetch(self, name: str) -> None:
        if name not in self._host:
            raise KeyError(f"unknown expert {name!r}; have {list(self._host)}")
        if self._holds == name:
            return
        source = self._host[name]
        self.swaps += 1
        log.debug("bringing the %s expert into the device slot", name)
        with torch.no_grad():
            if self._stream is None:
                for key, dst in self._slot_tensors.items():
                    dst.data.copy_(source[key])
            else:
                # The slot may still be read by work queued on the compute stream.
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._stream):
                    for key, dst in self._slot_tensors.items():
                        dst.data.copy_(source[key], non_blocking=True)
                    self._ready = torch.cuda.Event()
                    self._ready.record(self._stream)
        self._holds = name

    def activate(self, name: str) -> WanDiT:
        self.prefetch(name)
        if self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
        return self.slot

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        with self._lock:
            try:
                yield
            finally:
                # Start the swap back for the next request (it begins with the first expert).
                self.prefetch(self.names[0])


@dataclass
class ExpertSet:
    """The DiTs of one model, where they live, and the boundary that picks between them.

    `boundary` None: a single DiT (Wan2.1), named "base". Holds weights only, never request state.
    """

    residency: ExpertResidency
    boundary: float | None = None

    @classmethod
    def single(cls, dit: WanDiT) -> ExpertSet:
        return cls(ResidentExperts({BASE: dit}))

    @classmethod
    def two(
        cls,
        high: WanDiT,
        low: WanDiT,
        boundary: float,
        residency: Residency = "resident",
        device: torch.device | str | None = None,
    ) -> ExpertSet:
        """A high/low pair, both resident, or offloaded to host memory with one slot on `device`."""
        models = {HIGH: high, LOW: low}
        if residency == "resident":
            return cls(ResidentExperts(models), boundary)
        if residency == "offload":
            target = device if device is not None else high.patch_embedding.weight.device
            return cls(OffloadedExperts(models, target), boundary)
        raise ValueError(f"expert_residency must be one of {EXPERT_RESIDENCIES}, got {residency!r}")

    @property
    def names(self) -> tuple[str, ...]:
        return self.residency.names

    @property
    def is_pair(self) -> bool:
        return self.boundary is not None

    def request(self) -> contextlib.AbstractContextManager[None]:
        return self.residency.request()


# -- one request's experts ------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertStep(Generic[M]):
    """What one denoising step runs: the expert's model (as the caller wraps it), its identity
    cache for this request (None without a face), its adapters and its guidance scale."""

    name: str
    model: M
    identity: IdentityCache | None
    adapters: LinearAdapters | None
    guidance: float


class ExpertRun(Generic[M]):
    """One request's expert state: the expert of each step and each expert's identity cache.

    `build_identity(model, adapters)` builds an expert's cache with the caller's model (a
    `WanDiT`, or the runner's `ShardedDiT`); `wrap` turns an expert's `WanDiT` into that model.
    `guidance`: the request's scale (the high expert's, and the only one of a single DiT);
    `guidance_low`: the low expert's (None: the same). Lives in the request's frame only.
    """

    def __init__(
        self,
        experts: ExpertSet,
        schedule: FlowMatchSchedule,
        build_identity: Callable[[M, LinearAdapters | None], IdentityCache | None],
        *,
        guidance: float,
        guidance_low: float | None = None,
        adapters: ExpertAdapters = None,
        wrap: Callable[[WanDiT], M] = lambda m: m,  # type: ignore[assignment,return-value]
    ) -> None:
        self.experts = experts
        self.schedule = schedule
        self.plan = expert_per_step(schedule, experts.boundary)
        self._build = build_identity
        self._wrap = wrap
        low = guidance if guidance_low is None else guidance_low
        self._guidance = {HIGH: guidance, BASE: guidance, LOW: low}
        if isinstance(adapters, Mapping) and experts.boundary is None:
            raise InvalidRequestError(
                "styles for one expert (high/low) need a two-expert model (Wan2.2 A14B)"
            )
        self._adapters = adapters
        self._current: str | None = None
        self._model: Any = None
        self._identity: IdentityCache | None = None
        self.finished: list[str] = []  # experts this request is done with, in order
        self.identity_builds: list[str] = []

    def adapters_for(self, name: str) -> LinearAdapters | None:
        """The request's adapters of one expert (a per-expert mapping, or one object for all)."""
        a = self._adapters
        if isinstance(a, Mapping):
            return a.get(name)
        return a

    def step(self, i: int) -> ExpertStep[M]:
        """The expert of step i, activated, with its identity cache (built on its first step)."""
        name = self.plan[i]
        if name != self._current:
            if name in self.finished:
                raise InvalidRequestError(
                    f"step {i} goes back to the {name} expert: timesteps must not increase"
                )
            if self._current is not None:
                self.finished.append(self._current)
            # Drop the previous expert's cache before building the next (one alive at a time).
            self._identity = None
            self._model = self._wrap(self.experts.residency.activate(name))
            self._identity = self._build(self._model, self.adapters_for(name))
            self.identity_builds.append(name)
            self._current = name
        return ExpertStep(name, self._model, self._identity, self.adapters_for(name), self._guidance[name])

    def guidance_for(self, name: str) -> float:
        return self._guidance[name]

    def finish(self) -> None:
        """The request is done: drop its cache and start bringing the first expert back (offload),
        so the swap overlaps whatever happens before the next request."""
        self._identity = None
        self.experts.residency.prefetch(self.experts.names[0])


def expert_adapters(high: LinearAdapters | None, low: LinearAdapters | None) -> dict[str, Any]:
    """A style's high/low pair as `ExpertAdapters` (each expert gets its own object)."""
    return {HIGH: high, LOW: low}
