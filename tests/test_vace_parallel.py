"""Sequence parallelism with VACE (gloo on CPU, 2 ranks in their own processes, hard deadline).

The VACE context tokens are sharded exactly like the video tokens (45 of them: padding on the
last rank), each rank runs the VACE blocks on its shard with the group's attention and adds its
own hints: the forward and whole requests (identity + VACE + CFG, through `SPRunner`) must equal
the single process, and the hints must never be gathered (no collective beyond what the extra
VACE blocks' attention needs).
"""

from __future__ import annotations

import datetime

import pytest
import torch

from parallel import Collectives, DenoiseRequest, DeviceMesh, ParallelConfig, SPRunner, init_distributed
from standin.dit import WanDiT
from standin.errors import InvalidRequestError
from standin.guidance import guided_velocity
from standin.presets import get_preset
from standin.scheduler import FlowMatchSchedule
from standin.vace import VaceBranch, VaceInputs, vace_call
from tests.distributed import run_ranks

TOLERANCE = 1e-5
DEADLINE_S = 150
MESHES = {
    "ulysses2": ParallelConfig(ulysses=2),
    "ring2": ParallelConfig(ring=2),
    "cfg2": ParallelConfig(cfg=2),
}


def _models() -> tuple[WanDiT, VaceBranch]:
    preset = get_preset("tiny")
    torch.manual_seed(0)
    dit, branch = WanDiT(preset.dit).eval(), VaceBranch(preset.dit, preset.vace).eval()
    for block in dit.blocks:
        for lora in (block.self_attn.q_loras, block.self_attn.k_loras, block.self_attn.v_loras):
            torch.nn.init.normal_(lora.up.weight, std=0.5)
    return dit, branch


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    text_dim = get_preset("tiny").dit.text_dim
    return {
        "latents": torch.randn(1, 16, 3, 6, 10, generator=g),  # 3×3×5 = 45 tokens
        "context": torch.randn(1, 7, text_dim, generator=g),
        "negative": torch.randn(1, 5, text_dim, generator=g),
        "identity": torch.randn(1, 16, 1, 6, 6, generator=g),
        "vace": torch.randn(1, 96, 3, 6, 10, generator=g),
        "t": torch.full((1,), 937.5),
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def _single_process_denoise(
    dit: WanDiT, branch: VaceBranch, x: dict, scale: float, steps: int
) -> torch.Tensor:
    schedule = FlowMatchSchedule(steps)
    cache = dit.identity_cache(x["identity"], x["latents"].shape)
    call = vace_call(dit, branch, VaceInputs(x["vace"], scale), cache)
    latents = x["latents"]
    for i in range(steps):
        t = schedule.timestep(i).expand(1)
        velocity = guided_velocity(call, latents, t, x["context"], x["negative"], 5.0)
        latents = schedule.step(velocity, i, latents)
    return latents


class _CallCounter:
    """Counts torch.distributed collectives by name while active."""

    NAMES = ("all_to_all_single", "all_gather", "all_gather_into_tensor", "broadcast", "batch_isend_irecv")

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        for name in self.NAMES:
            original = getattr(torch.distributed, name)
            setattr(torch.distributed, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def wrapped(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return original(*args, **kwargs)

        return wrapped


def _scenario(rank: int, counter: _CallCounter) -> dict:
    dit, branch = _models()
    x = _inputs()
    scale = 0.8
    out: dict = {}
    with torch.no_grad():
        cache = dit.identity_cache(x["identity"], x["latents"].shape)
        ref = vace_call(dit, branch, VaceInputs(x["vace"], scale), cache)(x["latents"], x["t"], x["context"])
        plain_ref = dit(x["latents"], x["t"], x["context"], cache)
    whole = _single_process_denoise(dit, branch, x, scale, steps=2)
    for name, config in MESHES.items():
        comm = Collectives(DeviceMesh(config, dit.config.num_heads))
        runner = SPRunner(dit, comm, vace=branch)
        res: dict = {}
        if config.cfg == 1:
            my_cache = runner.dit.identity_cache(x["identity"], x["latents"].shape)
            counter.calls.clear()
            plain = runner.dit(x["latents"], x["t"], x["context"], my_cache)
            plain_calls = dict(counter.calls)
            counter.calls.clear()
            call = vace_call(dit, branch, VaceInputs(x["vace"], scale), my_cache, plan=runner.dit.plan)
            with torch.no_grad():
                ours = call(x["latents"], x["t"], x["context"])
            vace_calls = dict(counter.calls)
            res["forward_err"] = _rel(ours, ref)
            res["plain_err"] = _rel(plain, plain_ref)
            res["vace_effect"] = _rel(ref, plain_ref)
            res["gathers"] = [plain_calls.get("all_gather", 0), vace_calls.get("all_gather", 0)]
            res["attention_collectives"] = [
                plain_calls.get("all_to_all_single", 0) + plain_calls.get("batch_isend_irecv", 0),
                vace_calls.get("all_to_all_single", 0) + vace_calls.get("batch_isend_irecv", 0),
            ]
        request = DenoiseRequest(
            latents=x["latents"], context=x["context"], negative_context=x["negative"],
            identity_latents=x["identity"], num_steps=2, guidance=5.0,
            vace_context=x["vace"], vace_scale=scale,
        )
        if rank == 0:
            res["request_err"] = _rel(runner.generate(request), whole)
            try:
                runner.generate(DenoiseRequest(**{**request.__dict__, "vace_context": x["vace"][:, :95]}))
                res["bad_context"] = "accepted"
            except InvalidRequestError as exc:
                res["bad_context"] = str(exc)
            runner.shutdown()
        else:
            runner.serve_forever()
        out[name] = res
    return out


def _rank_main(rank: int, world: int, init_method: str) -> dict:
    counter = _CallCounter()
    init_distributed(rank, world, init_method, timeout=datetime.timedelta(seconds=60))
    return _scenario(rank, counter)


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> list[dict]:
    return run_ranks(_rank_main, 2, tmp_path_factory.mktemp("vace_world2"), DEADLINE_S)


pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.mark.parametrize("mesh", ["ulysses2", "ring2"])
def test_sequence_parallel_vace_forward_matches_single_process(world2, mesh):
    for rank, res in enumerate(world2):
        r = res[mesh]
        assert r["forward_err"] <= TOLERANCE, f"rank {rank}: {r}"
        assert r["plain_err"] <= TOLERANCE
        assert r["vace_effect"] > 100 * TOLERANCE  # the hints matter, so the equality proves them


@pytest.mark.parametrize("mesh", ["ulysses2", "ring2"])
def test_hints_stay_on_their_rank(world2, mesh):
    """VACE adds only the attention collectives of its own blocks: no extra gather."""
    for res in world2:
        r = res[mesh]
        assert r["gathers"][0] == r["gathers"][1]
        plain, vace = r["attention_collectives"]
        layers, vace_blocks = 2, 2  # tiny: two DiT blocks, two VACE blocks
        assert vace == plain * (layers + vace_blocks) // layers


@pytest.mark.parametrize("mesh", list(MESHES))
def test_sequence_parallel_vace_request_with_identity_matches_single_process(world2, mesh):
    r = world2[0][mesh]
    assert r["request_err"] <= TOLERANCE
    assert "vace context must be" in r["bad_context"]
