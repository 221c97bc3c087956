"""Sequence parallelism for the Stand-In DiT over torch.distributed (gloo on CPU, NCCL on GPU).

Knows the model (`standin.dit.WanDiT`), not Ray. Identity tokens are replicated: every rank
builds its own head slice of the identity cache and no collective ever carries identity
tokens or their K/V.
"""

from parallel.collectives import Collectives, CommStats
from parallel.devices import resolve_device
from parallel.errors import CollectiveError, ParallelConfigError, PeerFailedError, RequestFailedError
from parallel.mesh import DeviceMesh, ParallelConfig, init_distributed
from parallel.runner import DenoiseRequest, SPRunner
from parallel.sharded_dit import ShardedDiT, TokenLayout
from parallel.vae_decode import RowBands, decode_bands
from parallel.weights import load_once_per_node

__all__ = [
    "CollectiveError",
    "Collectives",
    "CommStats",
    "DenoiseRequest",
    "DeviceMesh",
    "ParallelConfig",
    "ParallelConfigError",
    "PeerFailedError",
    "RequestFailedError",
    "RowBands",
    "SPRunner",
    "ShardedDiT",
    "TokenLayout",
    "decode_bands",
    "init_distributed",
    "load_once_per_node",
    "resolve_device",
]
