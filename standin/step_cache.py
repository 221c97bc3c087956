"""Opt-in step caching (first-block cache), per request.

Consecutive denoising steps often change the DiT's output little. A first-block cache runs block 0
of every DiT call and compares its residual (output − input of block 0) with the residual of the
last call that ran every block. If the relative L1 distance

    rel = Σ|r₀ − r₀_ref| / Σ|r₀_ref|

is below the request's `threshold`, the remaining blocks are skipped: the call continues with
`x₀ + R`, where R is the residual of blocks 1…N−1 stored by that last full call (the head still
runs). Otherwise every block runs and r₀_ref, R are replaced. The reference moves only on full
calls, so a run of skips cannot drift away from it unnoticed. Threshold 0 never skips (`rel < 0`
is false): the output is bit-identical to no cache. The first call of a stream always runs.

Everything lives in a `FirstBlockCache` made for one request (`make_step_cache`), never on the
model, and enters the one forward through its `ForwardPlan` (`run_block` records block inputs,
`after_block` decides after block 0 and returns `SkipRest`):

- **CFG**: each call of a step takes the next *slot* (positive pass, then negative pass; batched
  CFG is one call of batch 2), and every slot keeps its own reference, residual and decision:
  the two passes decide separately. Under CFG-parallel each mesh half makes one call per step, so
  each half's slot 0 is its own pass.
- **Identity cache**: the identity K/V are exact and per request already; a skipped call reads
  none of them, a full call reads them as usual.
- **Two experts (Wan2.2)**: `begin_step(i, expert)` drops every slot when the expert changes, so
  the low-noise expert never reuses the high-noise expert's residuals.
- **Sequence parallelism**: the statistic is reduced per token to two numbers (Σ|r₀ − r₀_ref|,
  Σ|r₀_ref| over channels), gathered over the SP group with the forward's own `sharding.gather`
  (padding dropped) and summed; every rank sums the same gathered tensor in the same order, so
  every rank takes the same decision, and it equals the one-process decision up to rounding.
- **VACE** (a control video) already uses the `after_block` seam: a cached request with a control
  video is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from standin.errors import InvalidRequestError
from standin.forward_plan import LOCAL, ForwardPlan, LinearAdapters, SkipRest, TokenSharding

__all__ = [
    "CACHE_KINDS",
    "MAX_THRESHOLD",
    "FirstBlockCache",
    "StepCache",
    "make_step_cache",
    "parse_step_cache",
]

CACHE_KINDS = ("first_block",)
MAX_THRESHOLD = 1.0


@dataclass(frozen=True)
class StepCache:
    """A request's step-caching setting: the method and its relative-L1 threshold."""

    kind: str = "first_block"
    threshold: float = 0.05

    def validate(self) -> None:
        """Raise `InvalidRequestError` for an unknown kind or a threshold outside [0, MAX_THRESHOLD]."""
        if self.kind not in CACHE_KINDS:
            raise InvalidRequestError(f"cache kind must be one of {list(CACHE_KINDS)}, got {self.kind!r}")
        t = self.threshold
        if (
            isinstance(t, bool)
            or not isinstance(t, int | float)
            or not math.isfinite(t)
            or not 0 <= t <= MAX_THRESHOLD
        ):
            raise InvalidRequestError(f"cache threshold must be a number in [0, {MAX_THRESHOLD}], got {t!r}")

    def as_tuple(self) -> tuple[str, float]:
        return (self.kind, float(self.threshold))


def parse_step_cache(text: str) -> StepCache:
    """`first_block:0.05` (or `first_block`, threshold 0.05) → a validated `StepCache`."""
    kind, _, value = text.partition(":")
    try:
        cache = StepCache(kind.strip(), float(value) if value else StepCache.threshold)
    except ValueError:
        raise InvalidRequestError(f"cache threshold must be a number, got {value!r}") from None
    cache.validate()
    return cache


@dataclass
class _Slot:
    """One stream of calls (e.g. the positive pass) of one request."""

    reference: torch.Tensor | None = None  # block-0 residual of the last full call [B, S_loc, C]
    rest: torch.Tensor | None = None  # blocks 1..N-1 residual of that call [B, S_loc, C]


@dataclass
class _Call:
    """What one DiT call's hooks remember while it runs."""

    slot: _Slot
    last_block: int
    sharding: Any = None
    block_input: torch.Tensor | None = None
    after_first: torch.Tensor | None = None
    residual: torch.Tensor | None = None


class _RecordingSharding:
    """Wraps a plan's sharding factory and keeps the `TokenSharding` of the call."""

    def __init__(self, factory: Any, call: _Call) -> None:
        self.factory = factory
        self.call = call

    def __call__(self, num_tokens: int) -> TokenSharding:
        self.call.sharding = self.factory(num_tokens)
        return self.call.sharding

    @property
    def head_range(self) -> tuple[int, int] | None:
        return self.factory.head_range


@dataclass
class FirstBlockCache:
    """One request's first-block cache state (see the module docstring). Not thread-safe; one
    request's calls are sequential.

    `decisions[i]`: per step i, one bool per call (True = the call skipped blocks 1..N−1).
    """

    threshold: float
    slots: list[_Slot] = field(default_factory=list)
    decisions: list[list[bool]] = field(default_factory=list)
    distances: list[list[float]] = field(default_factory=list)
    _expert: str | None = None
    _next_slot: int = 0

    @property
    def calls(self) -> int:
        return sum(len(d) for d in self.decisions)

    @property
    def skipped(self) -> int:
        return sum(sum(d) for d in self.decisions)

    def begin_step(self, i: int, expert: str = "base") -> None:
        """Start step i (calls then take slots 0, 1, … in order); a new expert drops every slot."""
        if expert != self._expert:
            self.slots.clear()
            self._expert = expert
        self._next_slot = 0
        self.decisions.append([])
        self.distances.append([])

    def plan(self, num_blocks: int, base: ForwardPlan = LOCAL) -> ForwardPlan:
        """The plan of the next DiT call (a model of `num_blocks` blocks): `base` with this
        cache's block recorder and hook."""
        if base.after_block is not None:
            raise InvalidRequestError("step caching cannot be combined with another after_block hook (VACE)")
        if not self.decisions:
            self.begin_step(0)
        if self._next_slot == len(self.slots):
            self.slots.append(_Slot())
        call = _Call(self.slots[self._next_slot], last_block=num_blocks - 1)
        self._next_slot += 1
        inner_run = base.run_block

        def run_block(fn: Callable[..., Any], x: torch.Tensor, *args: Any) -> Any:
            call.block_input = x
            return inner_run(fn, x, *args)

        def after_block(i: int, x: torch.Tensor) -> torch.Tensor | SkipRest:
            return self._after_block(call, i, x)

        sharding = _RecordingSharding(base.sharding, call)
        return replace(base, sharding=sharding, run_block=run_block, after_block=after_block)

    def call(
        self,
        dit: Any,
        identity: Any = None,
        adapters: LinearAdapters | None = None,
        base: ForwardPlan = LOCAL,
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """A `standin.guidance.ModelCall` running `dit` (a `WanDiT`) with this cache, each call
        taking the next slot of the current step."""

        def run(latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            plan = self.plan(dit.config.num_layers, base)
            return dit(latents, timestep, context, identity, adapters, plan)

        return run

    # -- the hook ---------------------------------------------------------------------------

    def _after_block(self, call: _Call, i: int, x: torch.Tensor) -> torch.Tensor | SkipRest:
        slot = call.slot
        if i == 0:
            call.after_first = x
            call.residual = x - call.block_input
            skip = False
            distance = math.inf
            if slot.reference is not None and slot.rest is not None and call.last_block > 0:
                distance = self._distance(call, call.residual, slot.reference)
                skip = distance < self.threshold
            self.decisions[-1].append(skip)
            self.distances[-1].append(distance)
            if skip:
                return SkipRest(x + slot.rest)
            slot.reference = call.residual
            return x
        if i == call.last_block:  # a full call: keep the residual of blocks 1..N-1
            slot.rest = x - call.after_first
        return x

    def _distance(self, call: _Call, residual: torch.Tensor, reference: torch.Tensor) -> float:
        """Σ|r − ref| / Σ|ref| over every token of the SP group (the same value on every rank)."""
        per_token = torch.stack(
            [(residual - reference).abs().sum(-1), reference.abs().sum(-1)], dim=-1
        ).double()  # [B, S_loc, 2]
        everyone = call.sharding.gather(per_token) if call.sharding is not None else per_token
        diff, ref = everyone.sum(dim=(0, 1)).tolist()
        return diff / ref if ref > 0 else math.inf


def make_step_cache(setting: StepCache | None) -> FirstBlockCache | None:
    """A request's fresh cache state for its setting (None: caching off)."""
    if setting is None:
        return None
    setting.validate()
    return FirstBlockCache(float(setting.threshold))
