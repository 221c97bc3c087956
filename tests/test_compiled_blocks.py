"""`compiled_blocks` (torch.compile of each DiT block, regional, dynamic token counts) against
eager: the same outputs to float32 rounding, for two video sizes, one graph shared by every block,
the identity cache built through it, and step caching on top; after `warm_up` a request compiles
nothing. (Under sequence parallelism: tests/test_compiled_sp.py.)"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from standin.forward_plan import ForwardPlan, compiled_blocks
from standin.step_cache import FirstBlockCache
from standin.warmup import warm_up
from tests.test_dit import CFG, FACE, inputs, randomized

pytestmark = pytest.mark.slow  # the first compilation takes ≈ 30 s on one CPU thread


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_compiled_blocks_equal_eager_across_video_sizes_with_identity_and_step_cache() -> None:
    torch._dynamo.reset()
    counters.clear()
    model = randomized()
    plan = ForwardPlan(run_block=compiled_blocks())
    latents, t, ctx, face = inputs()
    longer = torch.randn(2, CFG.in_dim, 5, 6, 10, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager_cache = model.identity_cache(face, latents.shape)
        compiled_cache = model.identity_cache(face, latents.shape, plan=plan)
        for k_e, k_c in zip(eager_cache.keys, compiled_cache.keys, strict=True):
            assert _rel(k_c, k_e) < 1e-5
        for x in (latents, longer):  # another token count: the dynamic graph, no new compile
            assert _rel(model(x, t, ctx, compiled_cache, plan=plan), model(x, t, ctx, eager_cache)) < 1e-5
            assert _rel(model(x, t, ctx, plan=plan), model(x, t, ctx)) < 1e-5
        eager_steps, compiled_steps = FirstBlockCache(0.5), FirstBlockCache(0.5)
        outs = []
        for i, x in enumerate((latents, latents * 1.01)):
            eager_steps.begin_step(i)
            compiled_steps.begin_step(i)
            outs.append(
                (
                    eager_steps.call(model, eager_cache)(x, t, ctx),
                    compiled_steps.call(model, compiled_cache, base=plan)(x, t, ctx),
                )
            )
    assert eager_steps.decisions == compiled_steps.decisions == [[False], [True]]
    # Regional: the blocks share their graphs (7 measured: forward with/without identity per size,
    # identity_forward and its last-block variant); blocks specialised on their names gave 11 here,
    # and a 40-block model would pass dynamo's recompile limit and fall back to eager.
    assert counters["stats"]["unique_graphs"] <= 8, dict(counters["stats"])
    for eager, compiled in outs:
        assert _rel(compiled, eager) < 1e-5


def test_after_warm_up_requests_of_new_sizes_compile_nothing() -> None:
    torch._dynamo.reset()
    counters.clear()
    model = randomized()
    plan = ForwardPlan(run_block=compiled_blocks())
    assert warm_up(model, plan) > 0  # batch 1, with and without identity: what a replica runs
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    g = torch.Generator().manual_seed(4)
    t, face = torch.tensor([300.0]), torch.randn(FACE, generator=g)
    with torch.no_grad():
        for frames, h, w in ((3, 6, 10), (5, 8, 6)):  # 45 and 60 tokens, neither the warm-up's
            x = torch.randn(1, CFG.in_dim, frames, h, w, generator=g)
            ctx = torch.randn(1, 11, CFG.text_dim, generator=g)
            cache = model.identity_cache(face, x.shape, plan=plan)
            eager = model(x, t, ctx, model.identity_cache(face, x.shape))
            assert _rel(model(x, t, ctx, cache, plan=plan), eager) < 1e-5
            assert _rel(model(x, t, ctx, plan=plan), model(x, t, ctx)) < 1e-5
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
