"""Failure settings for NCCL process groups: collective timeouts sized from the step, the
watchdog, and the flight recorder. One place, applied before the process group exists.

The failure model is crash-only: a DiT replica whose rank failed (a peer died, a collective
timed out, NCCL reported an error) never tries to repair its group. It marks itself broken
(`SPRunner.broken`), refuses work, fails its health check, and Serve replaces the whole replica
(the workers die with it); the job runner retries the job elsewhere. What these settings buy:

- a dead peer is seen at the next agreement gate (gloo over TCP: the connection closes), so the
  survivors raise `CollectiveError` within one collective, not after a timeout;
- a rank stuck without dying (a hung kernel, a wedged NIC) is bounded by the collective
  timeout, sized from the measured step (`collective_timeout_s`), not a flat 10 minutes;
- NCCL's watchdog tears the process down after a timeout or an asynchronous NCCL error
  (`TORCH_NCCL_ASYNC_ERROR_HANDLING=3`): the Serve replica is rank 0, so its death is itself
  the crash-only replacement; the flight recorder dumps what every rank was doing.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping

__all__ = ["apply_nccl_environment", "collective_timeout_s", "nccl_environment"]

# Lower bound of a collective timeout: covers NCCL communicator set-up hiccups and Python
# pauses (GC, logging) that are not proportional to the step.
MIN_TIMEOUT_S = 60.0
# A collective waits at most for the slowest rank to finish the work queued before it, which is
# bounded by one denoising step (each step ends in an agreement). SAFETY covers stragglers,
# clock-throttled GPUs and the first step's allocator warm-up.
SAFETY = 4.0


def collective_timeout_s(step_s: float, floor_s: float = MIN_TIMEOUT_S) -> float:
    """The collective timeout for a replica whose denoising step takes `step_s` seconds
    (one whole step: both CFG passes, measured on this GPU type at the largest size served):

        timeout = max(floor_s, SAFETY × step_s) = max(60 s, 4 × step_s)

    Example: 14B at 480p on 8 GPUs, ≈ 2 s per step → 60 s (the floor); 14B at 720p on one GPU,
    ≈ 60 s per step → 240 s. The first request's step is no longer (communicators and the
    allocator are warmed up when the mesh is built).
    """
    if not isinstance(step_s, (int, float)) or not math.isfinite(step_s) or step_s <= 0:
        raise ValueError(f"step_s must be a positive number of seconds, got {step_s!r}")
    return max(floor_s, SAFETY * step_s)


def nccl_environment(timeout_s: float, dump_dir: str | None = None) -> dict[str, str]:
    """The TORCH_NCCL_* settings of a DiT replica (documented in cluster/README.md,
    "Failure semantics (NCCL)"). timeout_s: the collective timeout in seconds."""
    heartbeat = max(int(timeout_s) * 2, 600)
    env = {
        # Watchdog: on a timeout or an async NCCL error, tear the process down (without
        # aborting communicators, which can itself hang): crash-only, Serve replaces the replica.
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        # Non-blocking wait: the host runs ahead of the GPU (no sync per collective); a dead peer
        # is caught by the gloo agreement gates, a stuck one by the watchdog timeout.
        "TORCH_NCCL_BLOCKING_WAIT": "0",
        # The monitor thread kills the process if the watchdog itself is stuck in a CUDA/NCCL call.
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(heartbeat),
        # Flight recorder: the last 2,000 collectives per rank, dumped on a timeout.
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        # Record which rank is behind when the ranks desynchronise (cheap: only on a timeout).
        "TORCH_NCCL_DESYNC_DEBUG": "1",
    }
    if dump_dir:
        env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = os.path.join(dump_dir, "nccl_trace_rank_")
    return env


def apply_nccl_environment(
    timeout_s: float, environ: MutableMapping[str, str] | None = None, dump_dir: str | None = None
) -> dict[str, str]:
    """Set `nccl_environment` in this process before its NCCL process group is created. A
    variable already set (by the operator, the profile's runtime_env) wins. Returns what is
    in effect for each of them."""
    environ = os.environ if environ is None else environ
    for key, value in nccl_environment(timeout_s, dump_dir).items():
        environ.setdefault(key, value)
    return {key: environ[key] for key in nccl_environment(timeout_s, dump_dir)}
