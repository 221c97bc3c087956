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

from parallel.errors import ParallelConfigError

__all__ = ["DeviceMesh", "ParallelConfig", "init_distributed"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)
# Workers wait this long for the next request on the control group before giving up.
DEFAULT_IDLE_TIMEOUT = datetime.timedelta(days=7)


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
) -> None:
    """Join the default process group; its collectives raise after `timeout` instead of hanging."""
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout
    )


class DeviceMesh:
    """This rank's place in the mesh and the process groups it talks over.

    Groups of a degree-1 dimension are None (nothing to talk about). `cpu_group` (gloo) carries
    the tiny agreement all-reduces and error messages, so that they never synchronise a GPU
    stream; `control_group` (gloo, long timeout) carries request headers to idle workers.
    """

    def __init__(
        self,
        config: ParallelConfig,
        num_heads: int,
        device: torch.device | str = "cpu",
        timeout: datetime.timedelta = DEFAULT_TIMEOUT,
        idle_timeout: datetime.timedelta = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        """Build the groups. Every rank must call this with the same arguments, in the same order
        relative to other group creations (torch.distributed.new_group is collective).

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

        u, r = config.ulysses, config.ring
        self.cfg_index, rest = divmod(self.rank, r * u)
        self.ring_index, self.ulysses_index = divmod(rest, u)

        self.ulysses_group = self.ring_group = self.cfg_group = self.sp_group = None
        self.world_group = self.cpu_group = self.control_group = None
        # Global ranks of this rank's ring, in ring order (for point-to-point sends).
        self.ring_ranks = [self._rank_of(self.cfg_index, j, self.ulysses_index) for j in range(r)]
        self.cfg_ranks = [self._rank_of(c, self.ring_index, self.ulysses_index) for c in range(config.cfg)]
        if world_size == 1:
            return

        # Same loops, same order on every rank; keep the groups this rank belongs to.
        backend = dist.get_backend()
        self.world_group = dist.new_group(list(range(world_size)), timeout=timeout, backend=backend)
        self.cpu_group = dist.new_group(list(range(world_size)), timeout=timeout, backend="gloo")
        self.control_group = dist.new_group(list(range(world_size)), timeout=idle_timeout, backend="gloo")
        for c in range(config.cfg):
            sp_ranks = [self._rank_of(c, j, i) for j in range(r) for i in range(u)]
            group = self._new_group(sp_ranks, timeout, backend)
            if c == self.cfg_index:
                self.sp_group = group
            for j in range(r):
                group = self._new_group([self._rank_of(c, j, i) for i in range(u)], timeout, backend)
                if (c, j) == (self.cfg_index, self.ring_index):
                    self.ulysses_group = group
            for i in range(u):
                group = self._new_group([self._rank_of(c, j, i) for j in range(r)], timeout, backend)
                if (c, i) == (self.cfg_index, self.ulysses_index):
                    self.ring_group = group
        for j in range(r):
            for i in range(u):
                group = self._new_group([self._rank_of(c, j, i) for c in range(config.cfg)], timeout, backend)
                if (j, i) == (self.ring_index, self.ulysses_index):
                    self.cfg_group = group
        log.debug(
            "rank %d: mesh %s, coordinates cfg=%d ring=%d ulysses=%d",
            self.rank,
            config,
            self.cfg_index,
            self.ring_index,
            self.ulysses_index,
        )

    def _rank_of(self, cfg_index: int, ring_index: int, ulysses_index: int) -> int:
        c = self.config
        return (cfg_index * c.ring + ring_index) * c.ulysses + ulysses_index

    @staticmethod
    def _new_group(ranks: list[int], timeout: datetime.timedelta, backend: str) -> dist.ProcessGroup | None:
        # Degree-1 groups are never used; creating them anyway would only cost sockets.
        if len(ranks) == 1:
            return None
        return dist.new_group(ranks, timeout=timeout, backend=backend)

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
