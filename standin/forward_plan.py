"""How one DiT forward is executed, passed into `WanDiT` rather than subclassed or copied.

`WanDiT.forward` and `WanDiT.identity_cache` are the only forwards of the model. What differs
between inference on one device, sequence parallelism, training and the features built on them
enters through a `ForwardPlan`:

- `sharding`: which video tokens this process holds, how their outputs are gathered, and which
  attention runs on them (`parallel/` supplies a sequence-parallel one; the default is the whole
  sequence with `restricted_attention`);
- `run_block`: how a block is called (training passes activation checkpointing;
  `compiled_blocks()` runs each block through `torch.compile`);
- `after_block`: a per-call hook after every block (VACE hints, step caching); it may return
  `SkipRest` to end the block loop early.

Per-request changes of the weights themselves (style LoRAs) are `LinearAdapters`, passed with
the request. Nothing here holds request state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.fx.experimental._config as fx_config  # noqa: PLC2701 - the only duck-sizing switch
from torch.utils.checkpoint import checkpoint

from standin.attention import restricted_attention

__all__ = [
    "LOCAL",
    "WHOLE_SEQUENCE",
    "BlockHook",
    "ForwardPlan",
    "LinearAdapters",
    "SkipRest",
    "TokenSharding",
    "VideoAttention",
    "WholeSequence",
    "checkpointed_blocks",
    "compiled_blocks",
]

# Video self-attention kernel: (q, k, v [B, S, H, D], identity (k, v) or None) -> [B, S, H, D].
VideoAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "tuple[torch.Tensor, torch.Tensor] | None"],
    torch.Tensor,
]


class LinearAdapters(Protocol):
    """Per-request additions to the base linear layers (e.g. style LoRAs), never merged.

    Called after every base `nn.Linear` of the DiT with the layer's parameter prefix
    (`blocks.3.self_attn.q`, `blocks.3.ffn.0`, `head.head`, …), its input x [..., in] and the
    base output y [..., out]; returns y plus the adapters' contribution.
    """

    def linear(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class TokenSharding(Protocol):
    """Which of the S video tokens this process computes, for one forward."""

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] → this process's tokens [B, S_loc, ...]."""
        ...

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """This process's outputs [B, S_loc, ...] → every token's [B, S, ...]."""
        ...

    @property
    def attention(self) -> VideoAttention: ...


class ShardingFactory(Protocol):
    """Makes the sharding of a forward over `num_tokens` video tokens."""

    def __call__(self, num_tokens: int) -> TokenSharding: ...

    @property
    def head_range(self) -> tuple[int, int] | None:
        """The attention heads [start, stop) this process keeps of the identity cache (None: all)."""
        ...


class WholeSequence:
    """Every token on this process and `restricted_attention` on all heads (its own factory)."""

    head_range = None

    def __call__(self, num_tokens: int) -> WholeSequence:
        return self

    @property
    def attention(self) -> VideoAttention:
        return restricted_attention

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x


WHOLE_SEQUENCE = WholeSequence()


@dataclass(frozen=True)
class SkipRest:
    """Returned by an `after_block` hook: stop the block loop, continue with `x` (step caching)."""

    x: torch.Tensor


# (block index, video tokens after that block [B, S_loc, C] float32) → new tokens, or SkipRest.
BlockHook = Callable[[int, torch.Tensor], "torch.Tensor | SkipRest"]


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def checkpointed_blocks(fn: Callable[..., Any], *args: Any) -> Any:
    """A `run_block` that recomputes the block in the backward pass (saves activation memory)."""
    return checkpoint(fn, *args, use_reentrant=False)


def compiled_blocks(dynamic: bool = True) -> Callable[..., Any]:
    """A `run_block` that runs every block through `torch.compile` (regional compilation).

    The block's method (`DiTBlock.forward`, `DiTBlock.identity_forward`) is compiled once, as a
    function of (block, inputs): with torch's inlined nn modules every block of the model reuses
    that one graph (the weights are inputs, not constants), and `dynamic=True` keeps it across
    token counts (video sizes). What runs between blocks — the `after_block` hook, step caching's
    decision — stays eager. Under sequence parallelism the attention (parallel/'s
    `SequenceParallelAttention`, with its collectives and their gates) is excluded from the graph
    with `torch.compiler.disable`: one graph break per block, the collectives run eagerly in the
    same order on every rank (tests/test_compiled_sp.py). The first call compiles (≈ 20–30 s for
    the test model on one CPU thread; `standin.warmup.warm_up` pays it at replica start); the
    compiled functions live in the returned closure, never on the model.

    Compiling without "duck sizing": otherwise a first call where two sizes happen to be equal
    (tokens per rank = head_dim, say) compiles a graph guarded on that equality, and the next
    video size compiles again. Sizes of 1 are still specialised (batch 1 stays batch 1).
    """
    compiled: dict[Any, Callable[..., Any]] = {}

    def run_block(fn: Callable[..., Any], *args: Any) -> Any:
        if isinstance(fn, torch.nn.Module):
            fn = fn.forward
        func, owner = getattr(fn, "__func__", fn), getattr(fn, "__self__", None)
        if func not in compiled:
            compiled[func] = torch.compile(func, dynamic=dynamic)
        args = (owner, *args) if owner is not None else args
        duck_shape = fx_config.use_duck_shape  # read when a (re)compilation builds its shape env
        fx_config.use_duck_shape = False
        try:
            return compiled[func](*args)
        finally:
            fx_config.use_duck_shape = duck_shape

    return run_block


@dataclass(frozen=True)
class ForwardPlan:
    """How one forward runs (see the module docstring); the default runs on one process."""

    sharding: ShardingFactory = WHOLE_SEQUENCE
    run_block: Callable[..., Any] = _call
    after_block: BlockHook | None = None


LOCAL = ForwardPlan()
