"""Every collective parallel/ issues goes through `Collectives`.

One place to (1) count calls and bytes (benchmarks read `stats`), (2) turn any backend
failure or timeout into `CollectiveError` (the group is dead, rebuild it), and (3) gate each
data collective with an agreement all-reduce, so that a rank that failed between two
collectives tells the others at the next gate instead of leaving them blocked in a collective.

Gating protocol (every rank runs the same sequence of gates, SPMD):
- before each data collective, `gate()` all-reduces "did anyone fail?" over `cpu_group`;
  if someone did, it raises `PeerFailedError` on the healthy ranks;
- a rank whose local code raised calls `agree(failed=True)` exactly once; that call matches the
  healthy ranks' next gate (or the runner's end-of-step agreement).
The gates run on a gloo group with CPU tensors, so they never wait for a GPU stream.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel.errors import CollectiveError, PeerFailedError
from parallel.mesh import DeviceMesh

__all__ = ["Agreement", "Collectives", "CommStats", "PendingShift"]


@dataclass
class CommStats:
    """Calls and payload bytes this rank sent, per kind of collective.

    Bytes are what this rank must put on the wire with the usual algorithms: all-to-all
    (N−1)/N of its buffer, all-gather (N−1)× its chunk, ring shift its buffer, neighbour
    exchange what it sends to each side, broadcast (N−1)× the tensor at the root. Agreement
    all-reduces are counted under "agree".
    """

    calls: Counter = field(default_factory=Counter)
    bytes_sent: Counter = field(default_factory=Counter)

    def record(self, kind: str, nbytes: float) -> None:
        self.calls[kind] += 1
        self.bytes_sent[kind] += int(nbytes)

    def reset(self) -> None:
        self.calls.clear()
        self.bytes_sent.clear()


@dataclass(frozen=True)
class Agreement:
    failed: bool
    cancelled: bool


@contextlib.contextmanager
def _backend_errors(what: str) -> Iterator[None]:
    try:
        yield
    except (PeerFailedError, CollectiveError):
        raise
    except Exception as exc:  # gloo raises plain RuntimeError on timeouts and closed pairs
        raise CollectiveError(f"{what} failed: {exc}") from exc


class PendingShift:
    """A ring shift in flight: call `wait()` for the tensor received from the previous rank."""

    def __init__(self, works: list[dist.Work], sent: torch.Tensor, received: torch.Tensor) -> None:
        self._works = works
        self._sent = sent  # the send buffer must outlive the send
        self._received = received

    def wait(self) -> torch.Tensor:
        with _backend_errors("ring shift"):
            for work in self._works:
                work.wait()
        return self._received


class Collectives:
    """The collectives of one mesh. `gated=False` drops the per-collective gates: faster, but a
    failure inside a forward then ends in a timeout (CollectiveError) instead of an agreed error."""

    def __init__(self, mesh: DeviceMesh, gated: bool = True) -> None:
        self.mesh = mesh
        self.gated = gated and mesh.world_size > 1
        self.stats = CommStats()

    # -- agreement ------------------------------------------------------------------------

    def agree(self, failed: bool = False, cancel: bool = False) -> Agreement:
        """All ranks learn whether any rank failed or asked to cancel (one tiny all-reduce)."""
        if self.mesh.world_size == 1:
            return Agreement(failed, cancel)
        flags = torch.tensor([int(failed), int(cancel)], dtype=torch.int64)
        with _backend_errors("agreement all-reduce"):
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.mesh.cpu_group)
        self.stats.record("agree", flags.nbytes)
        return Agreement(bool(flags[0]), bool(flags[1]))

    def gate(self) -> None:
        """Raise PeerFailedError if another rank reported a failure (no-op when not gated)."""
        if self.gated and self.agree().failed:
            raise PeerFailedError("another rank failed during this step")

    def all_gather_object(self, obj: object) -> list[object]:
        """Small Python objects (error messages) from every rank, in rank order."""
        if self.mesh.world_size == 1:
            return [obj]
        out: list[object] = [None] * self.mesh.world_size
        with _backend_errors("all_gather_object"):
            dist.all_gather_object(out, obj, group=self.mesh.cpu_group)
        return out

    # -- request distribution -------------------------------------------------------------

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        """Rank `src`'s object on every rank, over the long-timeout control group."""
        if self.mesh.world_size == 1:
            return obj
        box = [obj]
        with _backend_errors("request header broadcast"):
            dist.broadcast_object_list(box, src=src, group=self.mesh.control_group)
        return box[0]

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcast in place (the tensor must already have the right shape on every rank)."""
        if self.mesh.world_size == 1:
            return tensor
        with _backend_errors("broadcast"):
            dist.broadcast(tensor, src=src, group=self.mesh.world_group)
        if self.mesh.rank == src:
            self.stats.record("broadcast", tensor.nbytes * (self.mesh.world_size - 1))
        return tensor

    # -- data collectives (gated) ---------------------------------------------------------

    def all_to_all(self, x: torch.Tensor, group: dist.ProcessGroup | None, size: int) -> torch.Tensor:
        """x [N, ...]: chunk i goes to group rank i → [N, ...] where chunk i came from group rank i."""
        if size == 1:
            return x
        x = x.contiguous()
        out = torch.empty_like(x)
        self.gate()
        with _backend_errors("all_to_all"):
            dist.all_to_all_single(out, x, group=group)
        self.stats.record("all_to_all", x.nbytes * (size - 1) / size)
        return out

    def all_gather(self, x: torch.Tensor, group: dist.ProcessGroup | None, size: int) -> torch.Tensor:
        """x [...] on each of N ranks → [N, ...] in group-rank order."""
        if size == 1:
            return x[None]
        x = x.contiguous()
        chunks = [torch.empty_like(x) for _ in range(size)]
        self.gate()
        with _backend_errors("all_gather"):
            dist.all_gather(chunks, x, group=group)
        self.stats.record("all_gather", x.nbytes * (size - 1))
        return torch.stack(chunks)

    def gather(self, x: torch.Tensor, dst: int) -> torch.Tensor | None:
        """x [...] on every world rank → [N, ...] in rank order on global rank `dst`, None on the
        others (each rank sends its chunk once; only `dst` receives)."""
        size = self.mesh.world_size
        if size == 1:
            return x[None]
        x = x.contiguous()
        chunks = [torch.empty_like(x) for _ in range(size)] if self.mesh.rank == dst else None
        self.gate()
        with _backend_errors("gather"):
            dist.gather(x, chunks, dst=dst, group=self.mesh.world_group)
        if self.mesh.rank != dst:
            self.stats.record("gather", x.nbytes)
        return None if chunks is None else torch.stack(chunks)

    def ring_shift(self, x: torch.Tensor) -> PendingShift:
        """Send x to the next rank of this rank's ring, receive the previous rank's (async,
        grouped with `batch_isend_irecv`)."""
        mesh = self.mesh
        ring = mesh.ring_ranks
        nxt = ring[(mesh.ring_index + 1) % len(ring)]
        prev = ring[(mesh.ring_index - 1) % len(ring)]
        x = x.contiguous()
        received = torch.empty_like(x)
        self.gate()
        # One grouped send + receive: NCCL posts both in one group call, so a ring of any size
        # cannot deadlock on the order of separate sends and receives (gloo runs them as is).
        ops = [
            dist.P2POp(dist.isend, x, nxt, mesh.ring_group),
            dist.P2POp(dist.irecv, received, prev, mesh.ring_group),
        ]
        with _backend_errors("ring shift"):
            works = dist.batch_isend_irecv(ops)
        self.stats.record("ring_shift", x.nbytes)
        return PendingShift(works, x, received)

    def neighbour_exchange(
        self,
        to_prev: torch.Tensor,
        to_next: torch.Tensor,
        prev: int | None,
        nxt: int | None,
        group: dist.ProcessGroup | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Send `to_prev` to global rank `prev` and `to_next` to `nxt` (None: no neighbour on
        that side, as at the ends of a line of ranks); receive what they send back, shaped like
        what went to them → (from prev, from next). One grouped send + receive, like
        `ring_shift`, waited for."""
        sides = [(t.contiguous(), peer) for t, peer in ((to_prev, prev), (to_next, nxt))]
        received = [None if peer is None else torch.empty_like(t) for t, peer in sides]
        self.gate()
        ops = []
        for (sent, peer), buf in zip(sides, received, strict=True):
            if peer is not None:
                ops += [dist.P2POp(dist.isend, sent, peer, group), dist.P2POp(dist.irecv, buf, peer, group)]
        if not ops:
            return None, None
        with _backend_errors("neighbour exchange"):
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        self.stats.record("neighbour_exchange", sum(t.nbytes for t, peer in sides if peer is not None))
        return received[0], received[1]
