"""The device mesh: Ulysses degree × ring degree × CFG degree over the world.

Rank layout (Ulysses innermost, so that the chattiest group is made of neighbouring ranks,
i.e. GPUs on one NVLink island):

    rank = cfg_index * (ring * ulysses) + ring_index * ulysses + ulysses_index

Ranks with the same `cfg_index` form one sequence-parallel (SP) group of `ring * ulysses`
ranks. Inside it, the video tokens are cut into `ring * ulysses` equal shards and rank
(ring_index, ulysses_index) holds shard `ring_index * ulysses + ulysses_index`; after the
Ulysses all-to-all a rank therefore holds the contiguous super-shard `ring_index` for its
head slice, which is what the ring passes around.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.errors import CollectiveError, ParallelConfigError

__all__ = ["DeviceMesh", "ParallelConfig", "init_distributed"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)
# Workers wait this long for the next request on the control group before giving up.
DEFAULT_IDLE_TIMEOUT = datetime.timedelta(days=7)
# The timeout init_distributed gave the default group: a mesh with the same timeout reuses that
# group (and its communicator) for its world-sized groups instead of creating an identical one.
_default_group_timeout: datetime.timedelta | None = None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of the mesh. Their product must equal the world size."""

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1

    @property
    def sp_degree(self) -> int:
        """Ranks sharing one forward pass (video tokens are cut into this many shards)."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.ulysses * self.ring * self.cfg

    def validate(self, num_heads: int, world_size: int | None = None) -> None:
        """Raise ParallelConfigError with the valid choices when the mesh does not fit."""
        for name in ("ulysses", "ring", "cfg"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParallelConfigError(f"{name} degree must be an integer >= 1, got {value!r}")
        if self.cfg not in (1, 2):
            raise ParallelConfigError(
                f"cfg degree must be 1 (both CFG passes on every rank) or 2 (positive and "
                f"negative pass on the two halves of the ranks), got {self.cfg}"
            )
        if num_heads % self.ulysses:
            valid = ", ".join(map(str, _divisors(num_heads)))
            suggestion = max(d for d in _divisors(self.ulysses) if num_heads % d == 0)
            raise ParallelConfigError(
                f"Ulysses degree {self.ulysses} does not divide the model's {num_heads} attention "
                f"heads; valid Ulysses degrees: {valid}. For {self.ulysses}-way sequence parallelism "
                f"combine Ulysses with ring attention: ulysses={suggestion}, "
                f"ring={self.ulysses // suggestion}"
            )
        if world_size is not None and self.world_size != world_size:
            raise ParallelConfigError(
                f"ulysses {self.ulysses} × ring {self.ring} × cfg {self.cfg} = {self.world_size} "
                f"ranks, but the world has {world_size}"
            )

    @classmethod
    def for_world(cls, world_size: int, num_heads: int, cfg: int = 1) -> ParallelConfig:
        """The widest Ulysses degree that divides the heads; ring attention takes the rest."""
        if world_size % cfg:
            raise ParallelConfigError(f"world size {world_size} does not divide by cfg degree {cfg}")
        sp = world_size // cfg
        ulysses = max(d for d in _divisors(sp) if num_heads % d == 0)
        config = cls(ulysses=ulysses, ring=sp // ulysses, cfg=cfg)
        config.validate(num_heads, world_size)
        return config


def init_distributed(
    rank: int,
    world_size: int,
    init_method: str,
    backend: str = "gloo",
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    device: torch.device | str | None = None,
) -> None:
    """Join the default process group; its collectives raise after `timeout` instead of hanging.

    NCCL: the process group is bound to `device` (default: the current CUDA device, which the
    caller set with `torch.cuda.set_device`), so its communicator is created now, on the right
    GPU, and the `TORCH_NCCL_*` failure settings (`parallel.failures.apply_nccl_environment`)
    are applied first unless the environment already sets them.
    """
    global _default_group_timeout
    device_id = None
    if backend == "nccl":
        from parallel.failures import apply_nccl_environment

        apply_nccl_environment(timeout.total_seconds())
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        device_id = torch.device(device)
        if device_id.index is None:
            raise ValueError(f"NCCL needs a device with an index (cuda:N), got {device_id}")
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=device_id,
    )
    _default_group_timeout = timeout


class DeviceMesh:
    """This rank's place in the mesh and the process groups it talks over.

    Groups of a degree-1 dimension are None (nothing to talk about). Groups with the same
    members share one process group (one NCCL communicator): for Ulysses-8 on 8 ranks the
    world, SP and Ulysses groups are all the default group. Every group this rank belongs to
    is warmed up with one tiny collective here, so communicators exist before the first
    request (and a broken interconnect fails the replica's start, not a job).

    `cpu_group` (gloo) carries the tiny agreement all-reduces and error messages, so that they
    never synchronise a GPU stream; `control_group` (gloo, long timeout) carries request
    headers to idle workers.
    """

    def __init__(
        self,
        config: ParallelConfig,
        num_heads: int,
        device: torch.device | str = "cpu",
        timeout: datetime.timedelta | None = None,
        idle_timeout: datetime.timedelta = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        """Build the groups. Every rank must call this with the same arguments, in the same order
        relative to other group creations (torch.distributed.new_group is collective).

        timeout: of the data and agreement groups; None: the default group's (init_distributed).
        A world of 1 needs no initialised process group.
        """
        initialised = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if initialised else 1
        config.validate(num_heads, world_size)
        self.config = config
        self.num_heads = num_heads
        self.device = torch.device(device)
        self.rank = dist.get_rank() if initialised else 0
        self.world_size = world_size
        if timeout is None:
            timeout = _default_group_timeout or DEFAULT_TIMEOUT
        self.timeout = timeout

        u, r = config.ulysses, config.ring
        self.cfg_index, rest = divmod(self.rank, r * u)
        self.ring_index, self.ulysses_index = divmod(rest, u)

        self.ulysses_group = self.ring_group = self.cfg_group = self.sp_group = None
        self.world_group = self.cpu_group = self.control_group = None
        # Global ranks of this rank's ring, in ring order (for point-to-point sends).
        self.ring_ranks = [self._rank_of(self.cfg_index, j, self.ulysses_index) for j in range(r)]
        self.cfg_ranks = [self._rank_of(c, self.ring_index, self.ulysses_index) for c in range(config.cfg)]
        # (members, backend, timeout) → group; `created`: how many new_group calls this mesh made.
        self._groups: dict[tuple, dist.ProcessGroup] = {}
        self.created = 0
        if world_size == 1:
            return

        # Same loops, same order on every rank (so the deduplicated new_group calls match);
        # keep the groups this rank belongs to.
        backend = dist.get_backend()
        everyone = list(range(world_size))
        self.world_group = self._group(everyone, backend, timeout)
        self.cpu_group = self._group(everyone, "gloo", timeout)
        self.control_group = self._group(everyone, "gloo", idle_timeout)
        for c in range(config.cfg):
            sp_ranks = [self._rank_of(c, j, i) for j in range(r) for i in range(u)]
            group = self._group(sp_ranks, backend, timeout)
            if c == self.cfg_index:
                self.sp_group = group
            for j in range(r):
                group = self._group([self._rank_of(c, j, i) for i in range(u)], backend, timeout)
                if (c, j) == (self.cfg_index, self.ring_index):
                    self.ulysses_group = group
            for i in range(u):
                group = self._group([self._rank_of(c, j, i) for j in range(r)], backend, timeout)
                if (c, i) == (self.cfg_index, self.ulysses_index):
                    self.ring_group = group
        for j in range(r):
            for i in range(u):
                group = self._group([self._rank_of(c, j, i) for c in range(config.cfg)], backend, timeout)
                if (j, i) == (self.ring_index, self.ulysses_index):
                    self.cfg_group = group
        self._warm_up()
        log.debug(
            "rank %d: mesh %s, coordinates cfg=%d ring=%d ulysses=%d, %d new groups",
            self.rank,
            config,
            self.cfg_index,
            self.ring_index,
            self.ulysses_index,
            self.created,
        )

    @property
    def groups(self) -> list[dist.ProcessGroup]:
        """The distinct process groups this rank is a member of (one communicator each)."""
        mine: list[dist.ProcessGroup] = []
        for (members, _, _), group in self._groups.items():
            if self.rank in members and all(group is not g for g in mine):
                mine.append(group)
        return mine

    def _group(
        self, ranks: list[int], backend: str, timeout: datetime.timedelta
    ) -> dist.ProcessGroup | None:
        # Degree-1 groups are never used; creating them anyway would only cost sockets.
        if len(ranks) == 1:
            return None
        key = (tuple(ranks), backend, timeout)
        if key not in self._groups:
            if (
                len(ranks) == self.world_size
                and backend == dist.get_backend()
                and timeout == _default_group_timeout
            ):
                self._groups[key] = dist.group.WORLD  # the default group, already connected
            else:
                self._groups[key] = dist.new_group(ranks, timeout=timeout, backend=backend)
                self.created += 1
        return self._groups[key]

    def _warm_up(self) -> None:
        """One tiny all-reduce on every group of this rank, in creation order (the same global
        order on every rank, so no two ranks wait on each other's groups): NCCL creates its
        communicators now instead of inside the first request."""
        for (members, backend, _), group in self._groups.items():
            if self.rank not in members:
                continue
            probe = torch.ones(1, device="cpu" if backend == "gloo" else self.device)
            try:
                dist.all_reduce(probe, group=group)
            except Exception as exc:
                raise CollectiveError(
                    f"rank {self.rank}: warm-up all-reduce over ranks {list(members)} ({backend}) "
                    f"failed: {exc}"
                ) from exc
            if int(probe.item()) != len(members):
                raise CollectiveError(f"warm-up all-reduce over {list(members)} returned {probe.item()}")

    def _rank_of(self, cfg_index: int, ring_index: int, ulysses_index: int) -> int:
        c = self.config
        return (cfg_index * c.ring + ring_index) * c.ulysses + ulysses_index

    @property
    def sp_rank(self) -> int:
        """Index of this rank's token shard inside its SP group."""
        return self.ring_index * self.config.ulysses + self.ulysses_index

    @property
    def head_range(self) -> tuple[int, int]:
        """[start, stop) of the attention heads this rank computes after the Ulysses all-to-all."""
        per_rank = self.num_heads // self.config.ulysses
        return self.ulysses_index * per_rank, (self.ulysses_index + 1) * per_rank

    def __repr__(self) -> str:
        return (
            f"DeviceMesh(rank={self.rank}, {self.config}, cfg_index={self.cfg_index}, "
            f"ring_index={self.ring_index}, ulysses_index={self.ulysses_index})"
        )
