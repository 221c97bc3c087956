"""Compiled blocks under sequence parallelism (2 gloo ranks, each its own process, hard deadline).

The production mode: `compiled_blocks()` with ungated collectives (`Collectives(gated=False)`),
the SP attention's collectives kept out of the compiled graph (`torch.compiler.disable`), one
agreement per denoising step. It must equal the eager gated SP run and the single-process eager
forward, with identity, over two video sizes and both SP kinds (Ulysses, ring), compiling once:
after `warm_up` no size or mesh adds a graph.

Every rank compiles its own graphs (≈ 30 s on one thread): a tiny model, two blocks.
"""

from __future__ import annotations

import datetime

import pytest
import torch

from standin.config import DiTConfig
from tests.distributed import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TOLERANCE = 1e-5
DEADLINE_S = 240
CFG = DiTConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=2, text_dim=16, freq_dim=16, lora_rank=4)
VIDEOS = ((1, 16, 3, 6, 10), (1, 16, 2, 6, 8))  # 45 tokens (padded over 2 ranks), then 24
FACE = (1, 16, 1, 4, 4)  # 2 × 2 identity tokens
STEPS = 2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _rank_main(rank: int, world: int, init_method: str) -> dict:
    from torch._dynamo.utils import counters

    from parallel import (
        Collectives,
        DenoiseRequest,
        DeviceMesh,
        ParallelConfig,
        ShardedDiT,
        SPRunner,
        init_distributed,
    )
    from standin.forward_plan import compiled_blocks
    from standin.warmup import warm_up
    from tests.test_dit import randomized

    init_distributed(rank, world, init_method, timeout=datetime.timedelta(seconds=120))
    torch._dynamo.reset()
    counters.clear()
    model = randomized(CFG)
    run_block = compiled_blocks()  # one closure: its graphs serve every mesh and size below
    gen = torch.Generator().manual_seed(1)
    t = torch.tensor([640.0])
    ctx, neg = torch.randn(1, 5, CFG.text_dim, generator=gen), torch.randn(1, 7, CFG.text_dim, generator=gen)
    face = torch.randn(FACE, generator=gen)
    videos = [torch.randn(shape, generator=gen) for shape in VIDEOS]
    result: dict = {"errors": {}, "graphs": {}}
    for name, config in (("ulysses2", ParallelConfig(ulysses=2)), ("ring2", ParallelConfig(ring=2))):
        mesh = DeviceMesh(config, CFG.num_heads)
        gated, ungated = Collectives(mesh), Collectives(mesh, gated=False)
        eager, compiled = ShardedDiT(model, gated), ShardedDiT(model, ungated, run_block=run_block)
        # What a replica does at start (one mesh per replica: each mesh here warms up).
        result[f"{name} warm_up_s"] = warm_up(model, compiled.plan)
        graphs_after_warm_up = counters["stats"]["unique_graphs"]
        for x in videos:
            with torch.no_grad():
                single = model(x, t, ctx, model.identity_cache(face, x.shape))
            sp_eager = eager(x, t, ctx, eager.identity_cache(face, x.shape))
            sp_compiled = compiled(x, t, ctx, compiled.identity_cache(face, x.shape))
            result["errors"][f"{name} {tuple(x.shape)}"] = {
                "compiled_vs_single": _rel(sp_compiled, single),
                "compiled_vs_eager_sp": _rel(sp_compiled, sp_eager),
                "eager_sp_vs_single": _rel(sp_eager, single),
            }
        result["graphs"][name] = (graphs_after_warm_up, counters["stats"]["unique_graphs"])
        result[f"{name} forward agreements"] = {
            "gated": gated.stats.calls["agree"],
            "ungated": ungated.stats.calls["agree"],
        }
    # A whole request through SPRunner: the compiled ungated runner, then the eager gated one.
    mesh = DeviceMesh(ParallelConfig(ulysses=2), CFG.num_heads)
    outputs, agreements = [], []
    for comm, blocks in ((Collectives(mesh, gated=False), run_block), (Collectives(mesh), None)):
        runner = SPRunner(model, comm, run_block=blocks)
        if rank == 0:
            request = DenoiseRequest(
                latents=videos[0], context=ctx, negative_context=neg, identity_latents=face,
                num_steps=STEPS, guidance=3.0,
            )  # fmt: skip
            outputs.append(runner.generate(request))
            runner.shutdown()
        else:
            runner.serve_forever()
        agreements.append(comm.stats.calls["agree"])
    if rank == 0:
        result["runner_compiled_vs_eager"] = _rel(outputs[0], outputs[1])
    result["runner_agreements"] = {"ungated": agreements[0], "gated": agreements[1]}
    result["graphs"]["runner"] = (result["graphs"]["ring2"][1], counters["stats"]["unique_graphs"])
    result["graph_breaks"] = sum(counters["graph_break"].values())
    return result


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> list[dict]:
    return run_ranks(_rank_main, 2, tmp_path_factory.mktemp("compiled_sp"), DEADLINE_S)


@pytest.mark.timeout(DEADLINE_S + 60)
def test_compiled_ungated_sp_equals_eager_gated_sp_and_single_process(world2: list[dict]) -> None:
    for rank, res in enumerate(world2):
        assert len(res["errors"]) == 4, res  # 2 meshes × 2 video sizes
        for case, errs in res["errors"].items():
            assert max(errs.values()) <= TOLERANCE, (rank, case, errs)


@pytest.mark.timeout(DEADLINE_S + 60)
def test_compiled_ungated_runner_equals_eager_and_agrees_once_per_step(world2: list[dict]) -> None:
    assert world2[0]["runner_compiled_vs_eager"] <= TOLERANCE, world2[0]
    for res in world2:
        # the request's setup phase, then one end-of-step agreement per step; nothing inside
        assert res["runner_agreements"]["ungated"] == 1 + STEPS, res["runner_agreements"]
        assert res["runner_agreements"]["gated"] > 1 + STEPS, res["runner_agreements"]
        for agreements in (res["ulysses2 forward agreements"], res["ring2 forward agreements"]):
            assert agreements["ungated"] == 0 and agreements["gated"] > 0, agreements


@pytest.mark.timeout(DEADLINE_S + 60)
def test_after_warm_up_no_video_size_compiles_again(world2: list[dict]) -> None:
    for res in world2:
        for stage, (before, after) in res["graphs"].items():  # (after warm-up, after its requests)
            assert before > 0 and after == before, (stage, res["graphs"])
        assert res["graph_breaks"] >= 1  # the SP attention, kept out of the graph
        assert res["ulysses2 warm_up_s"] > 0
