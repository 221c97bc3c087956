"""Which device a rank computes on: always an explicit `cuda:<index>` (or `cpu`), never bare `cuda`.

Under Ray an actor that asked for one GPU sees exactly one (Ray sets `CUDA_VISIBLE_DEVICES` to
its assigned GPU), so its device is `cuda:0` whatever the physical GPU is. Outside Ray (torchrun,
a plain 8-GPU process group) `LOCAL_RANK` picks the GPU. `torch.cuda.set_device` and NCCL's
`device_id` both need the index; `torch.device("cuda")` has none.

`resolve_device` is pure (its inputs are arguments) so that every case is unit-tested without a
GPU; `device_environment` collects those inputs from this process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from standin.errors import StandInError

__all__ = ["DeviceEnvironment", "DeviceError", "device_environment", "resolve_device", "visible_gpus"]


class DeviceError(StandInError, ValueError):
    """The requested device does not exist in this process (message says what is visible)."""


@dataclass(frozen=True)
class DeviceEnvironment:
    """What this process can see.

    cuda_available / device_count: torch.cuda's answers. visible_devices: the raw
    `CUDA_VISIBLE_DEVICES` (None: unset, all GPUs visible). assigned_gpu_ids: the GPU ids the
    scheduler gave this process (`ray.get_gpu_ids()`), physical ids as strings. local_rank:
    `LOCAL_RANK` (torchrun), None when unset.
    """

    cuda_available: bool
    device_count: int
    visible_devices: str | None = None
    assigned_gpu_ids: tuple[str, ...] = ()
    local_rank: int | None = None


def visible_gpus(visible_devices: str | None, device_count: int) -> list[str]:
    """Physical ids (or UUIDs) of the GPUs torch numbers 0, 1, …: from CUDA_VISIBLE_DEVICES."""
    if visible_devices is None or not visible_devices.strip():
        return [str(i) for i in range(device_count)]
    return [v.strip() for v in visible_devices.split(",") if v.strip()][:device_count]


def resolve_device(requested: str | torch.device | None, env: DeviceEnvironment) -> torch.device:
    """The device for this process, with an explicit index for CUDA.

    requested: the configured device ("cpu", "cuda", "cuda:3") or None (CUDA when available,
    else CPU). For CUDA without an index, in this order:
    1. one visible GPU (a Ray actor with num_gpus=1) → cuda:0;
    2. exactly one GPU assigned by the scheduler → its position among the visible GPUs
       (Ray with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES);
    3. LOCAL_RANK → cuda:LOCAL_RANK (torchrun-style launchers);
    4. otherwise cuda:0.
    Raises DeviceError when CUDA is asked for but not there, or the index does not exist.
    """
    dev = torch.device(requested) if requested is not None else None
    if dev is None:
        dev = torch.device("cuda") if env.cuda_available and env.device_count > 0 else torch.device("cpu")
    if dev.type != "cuda":
        return dev
    if not env.cuda_available or env.device_count < 1:
        raise DeviceError(
            f"device {str(requested)!r} asks for CUDA, but torch sees no GPU in this process "
            f"(CUDA_VISIBLE_DEVICES={env.visible_devices!r}); under Ray give the actor num_gpus"
        )
    if dev.index is not None:
        index = dev.index
    elif env.device_count == 1:
        index = 0
    elif len(env.assigned_gpu_ids) == 1:
        visible = visible_gpus(env.visible_devices, env.device_count)
        gpu = env.assigned_gpu_ids[0]
        if gpu not in visible:
            raise DeviceError(f"assigned GPU {gpu} is not among the visible GPUs {visible}")
        index = visible.index(gpu)
    elif env.local_rank is not None:
        index = env.local_rank
    else:
        index = 0
    if not 0 <= index < env.device_count:
        raise DeviceError(
            f"cuda:{index} does not exist: this process sees {env.device_count} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={env.visible_devices!r}, LOCAL_RANK={env.local_rank})"
        )
    return torch.device("cuda", index)


def device_environment(
    assigned_gpu_ids: Sequence[object] = (), environ: Mapping[str, str] | None = None
) -> DeviceEnvironment:
    """This process's DeviceEnvironment (pass `ray.get_gpu_ids()` as assigned_gpu_ids under Ray)."""
    environ = os.environ if environ is None else environ
    available = torch.cuda.is_available()
    local_rank = environ.get("LOCAL_RANK")
    return DeviceEnvironment(
        cuda_available=available,
        device_count=torch.cuda.device_count() if available else 0,
        visible_devices=environ.get("CUDA_VISIBLE_DEVICES"),
        assigned_gpu_ids=tuple(str(g) for g in assigned_gpu_ids),
        local_rank=int(local_rank) if local_rank not in (None, "") else None,
    )
