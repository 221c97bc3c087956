"""Device selection (parallel/devices.py): every case on CPU by injecting what the process sees,
plus the same path on a real GPU (`gpu` marker)."""

from __future__ import annotations

import pytest
import torch

from parallel.devices import DeviceEnvironment, DeviceError, device_environment, resolve_device, visible_gpus

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def env(count: int = 1, visible: str | None = None, assigned: tuple[str, ...] = (), local_rank=None):
    return DeviceEnvironment(
        cuda_available=count > 0,
        device_count=count,
        visible_devices=visible,
        assigned_gpu_ids=assigned,
        local_rank=local_rank,
    )


def test_a_ray_actor_with_one_gpu_always_gets_cuda_0_whatever_the_physical_gpu():
    # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU (here physical GPU 5) and reports it.
    assert resolve_device("cuda", env(1, visible="5", assigned=("5",))) == torch.device("cuda", 0)
    assert resolve_device(None, env(1, visible="5", assigned=("5",))) == torch.device("cuda", 0)


def test_cuda_is_never_returned_without_an_index():
    for case in (env(1), env(8, local_rank=3), env(8), env(4, visible="0,1,2,3", assigned=("2",))):
        dev = resolve_device("cuda", case)
        assert dev.type == "cuda" and dev.index is not None
        dev = resolve_device(None, case)
        assert dev.type == "cuda" and dev.index is not None


def test_ray_without_cuda_visible_devices_isolation_uses_the_assigned_gpus_position():
    # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: all 8 GPUs visible, Ray assigned physical 6.
    assert resolve_device("cuda", env(8, assigned=("6",))) == torch.device("cuda", 6)
    # A restricted visible list renumbers: physical 6 is torch's cuda:1 here.
    assert resolve_device("cuda", env(2, visible="4,6", assigned=("6",))) == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="not among the visible GPUs"):
        resolve_device("cuda", env(2, visible="4,6", assigned=("3",)))


def test_local_rank_picks_the_gpu_when_several_are_visible():
    assert resolve_device("cuda", env(8, local_rank=5)) == torch.device("cuda", 5)
    assert resolve_device(None, env(8, local_rank=2)) == torch.device("cuda", 2)
    with pytest.raises(DeviceError, match="cuda:9 does not exist"):
        resolve_device("cuda", env(8, local_rank=9))


def test_an_explicit_index_is_kept_and_checked():
    assert resolve_device("cuda:3", env(8, local_rank=5)) == torch.device("cuda", 3)
    with pytest.raises(DeviceError, match="cuda:1 does not exist"):
        resolve_device("cuda:1", env(1))


def test_cpu_when_asked_or_when_no_gpu_and_a_clear_error_for_cuda_without_one():
    assert resolve_device("cpu", env(8)) == torch.device("cpu")
    assert resolve_device(None, env(0)) == torch.device("cpu")
    with pytest.raises(DeviceError, match="no GPU.*num_gpus"):
        resolve_device("cuda", env(0, visible=""))


def test_visible_gpus_parses_cuda_visible_devices():
    assert visible_gpus(None, 3) == ["0", "1", "2"]
    assert visible_gpus("3, 1", 2) == ["3", "1"]
    assert visible_gpus("GPU-aa,GPU-bb", 2) == ["GPU-aa", "GPU-bb"]


def test_device_environment_reads_this_process():
    seen = device_environment(["7"], environ={"CUDA_VISIBLE_DEVICES": "7", "LOCAL_RANK": "0"})
    assert seen.visible_devices == "7" and seen.assigned_gpu_ids == ("7",) and seen.local_rank == 0
    assert seen.cuda_available == torch.cuda.is_available()


@pytest.mark.gpu
@cuda
def test_resolved_device_can_be_set_on_a_real_gpu():
    dev = resolve_device("cuda", device_environment())
    torch.cuda.set_device(dev)  # raises for a device without an index
    assert torch.cuda.current_device() == dev.index
