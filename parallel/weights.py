"""Weights read once per node: one rank reads the checkpoint, the others receive it.

Every rank of a DiT replica holds the whole model (sequence parallelism splits tokens, not
weights). Reading the official 14B checkpoint on each of 8 ranks means 8 × 57 GB of fp32
shards through one node's storage and 8 CPU conversions; here rank `src` reads and converts
once, the other ranks build the same module on their device without initialising it
(`build_empty`: on the meta device, then `to_empty`), and every parameter and buffer is
broadcast from `src` (NCCL: over NVLink, seconds for 29 GB).

    model, stats = load_once_per_node(
        load=lambda: load_dit(settings),                # runs on rank src only
        build_empty=lambda: WanDiT(config),             # built on the meta device elsewhere
        device=device,
    )
    log.info(stats)  # read s, broadcast s, bytes

Call it after `init_distributed`, on every rank of the group, in the same order as other
collectives. A failed read on `src` raises on every rank (with src's message).
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from standin.errors import CheckpointError

__all__ = ["WeightLoadStats", "broadcast_module", "load_once_per_node"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightLoadStats:
    """What loading cost this rank: reading (src only) and the broadcast."""

    rank: int
    read_s: float  # 0 on the ranks that did not read
    broadcast_s: float
    bytes: int
    tensors: int

    def __str__(self) -> str:
        return (
            f"rank {self.rank}: read {self.read_s:.1f} s, broadcast {self.bytes / 1e9:.2f} GB "
            f"({self.tensors} tensors) in {self.broadcast_s:.1f} s"
        )


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    # Buffers too, persistent or not: `to_empty` leaves every one of them uninitialised.
    return [*module.named_parameters(), *module.named_buffers()]


def _manifest(module: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return [(name, tuple(t.shape), str(t.dtype)) for name, t in _tensors(module)]


def broadcast_module(module: nn.Module, src: int = 0, group: dist.ProcessGroup | None = None) -> int:
    """Overwrite every parameter and buffer of `module` with those of rank `src` of `group`, in
    place. Returns the bytes broadcast. The modules must have the same tensors (names, shapes,
    dtypes) everywhere."""
    total = 0
    with torch.no_grad():
        for _, tensor in _tensors(module):
            if not tensor.is_contiguous():
                raise ValueError("broadcast_module needs contiguous parameters and buffers")
            dist.broadcast(tensor, group=group, group_src=src)
            total += tensor.numel() * tensor.element_size()
    return total


# How long the other ranks wait for src to read the checkpoint (57 GB of fp32 shards for 14B).
DEFAULT_LOAD_TIMEOUT = datetime.timedelta(hours=1)


def load_once_per_node(
    load: Callable[[], nn.Module],
    build_empty: Callable[[], nn.Module],
    device: torch.device | str,
    src: int = 0,
    group: dist.ProcessGroup | None = None,
    load_timeout: datetime.timedelta = DEFAULT_LOAD_TIMEOUT,
) -> tuple[nn.Module, WeightLoadStats]:
    """Rank src runs `load()` (the only rank that reads files); every other rank builds
    `build_empty()` on the meta device, allocates it on `device` in src's dtypes (so a float32
    builder receives a bfloat16 checkpoint as bfloat16) and receives the weights over `group`.

    The other ranks wait for src's read on a gloo group with `load_timeout` (the data group's
    collective timeout is sized for a denoising step, not a checkpoint read). Raises
    CheckpointError on every rank when src's load fails or a rank's module does not match src's
    (names, shapes).
    """
    rank = dist.get_rank(group)
    device = torch.device(device)
    members = dist.get_process_group_ranks(group) if group is not None else None
    waiting = dist.new_group(members, timeout=load_timeout, backend="gloo")
    read_s = 0.0
    model: nn.Module | None = None
    error: str | None = None
    if rank == src:
        start = time.perf_counter()
        try:
            model = load().to(device)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        read_s = time.perf_counter() - start
        box: list[object] = [error if error is not None else _manifest(model)]
    else:
        box = [None]
    global_src = src if group is None else dist.get_global_rank(group, src)
    dist.broadcast_object_list(box, src=global_src, group=waiting)
    if isinstance(box[0], str):
        raise CheckpointError(f"rank {src} could not load the weights: {box[0]}")
    expected = box[0]
    if rank != src:
        with torch.device("meta"):
            model = build_empty()
        _take_dtypes(model, expected)
        model = model.to_empty(device=device)
    mismatch = None if _manifest(model) == expected else _first_difference(_manifest(model), expected)
    mismatches: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(mismatches, mismatch, group=waiting)
    dist.destroy_process_group(waiting)
    bad = {r: m for r, m in enumerate(mismatches) if m is not None}
    if bad:
        detail = "; ".join(f"rank {r}: {m}" for r, m in bad.items())
        raise CheckpointError(f"the ranks' modules differ from rank {src}'s: {detail}")
    start = time.perf_counter()
    nbytes = broadcast_module(model, src, group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats = WeightLoadStats(rank, read_s, time.perf_counter() - start, nbytes, len(expected))
    log.info("weights: %s", stats)
    return model.eval().requires_grad_(False), stats


def _take_dtypes(module: nn.Module, expected: list[tuple[str, tuple[int, ...], str]]) -> None:
    """Give the meta module's tensors src's dtypes (shapes are checked afterwards)."""
    dtypes = {name: getattr(torch, dtype.removeprefix("torch.")) for name, _, dtype in expected}
    for prefix, owner in module.named_modules():
        for table in (owner._parameters, owner._buffers):
            for leaf, tensor in table.items():
                name = f"{prefix}.{leaf}" if prefix else leaf
                if tensor is None or name not in dtypes or tensor.dtype == dtypes[name]:
                    continue
                converted = tensor.to(dtypes[name])
                if table is owner._parameters:
                    converted = nn.Parameter(converted, requires_grad=False)
                table[leaf] = converted


def _first_difference(
    mine: list[tuple[str, tuple[int, ...], str]], theirs: list[tuple[str, tuple[int, ...], str]]
) -> str:
    for a, b in zip(mine, theirs, strict=False):
        if a != b:
            return f"{a[0]} {a[1]} {a[2]} where the loaded model has {b[0]} {b[1]} {b[2]}"
    return f"{len(mine)} tensors where the loaded model has {len(theirs)}"
