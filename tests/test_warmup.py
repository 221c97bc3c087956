"""The DiT replica's warm-up request (serve_app/warmup.py): it runs through the real runner, and
with compiled blocks it leaves nothing to compile for the first real job of another size."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

from parallel import Collectives, DenoiseRequest, DeviceMesh, ParallelConfig, SPRunner
from serve_app.warmup import warm_up_replica, warmup_request
from standin.forward_plan import compiled_blocks
from tests.test_dit import randomized


def _runner(run_block=None) -> SPRunner:
    model = randomized()
    mesh = DeviceMesh(ParallelConfig(), model.config.num_heads)
    return SPRunner(model, Collectives(mesh), run_block=run_block)


def _job(runner: SPRunner) -> DenoiseRequest:
    """A real-looking request: another video size and prompt length than the warm-up's."""
    g = torch.Generator().manual_seed(5)
    dim = runner.model.config.text_dim
    return DenoiseRequest(
        latents=torch.randn(1, 16, 3, 6, 10, generator=g),
        context=torch.randn(1, 11, dim, generator=g),
        negative_context=torch.randn(1, 6, dim, generator=g),
        identity_latents=torch.randn(1, 16, 1, 6, 6, generator=g),
        num_steps=2,
        guidance=4.0,
    )


def test_warmup_request_uses_identity_guidance_and_the_model_shapes() -> None:
    runner = _runner()
    request = warmup_request(runner)
    config = runner.model.config
    assert request.latents.shape[:2] == (1, config.in_dim)
    assert request.identity_latents is not None and request.negative_context is not None
    assert request.context.shape[-1] == config.text_dim and request.guidance != 1.0
    assert warm_up_replica(runner) > 0  # validated and run by the runner like a job


@pytest.mark.slow  # compiles the blocks once (≈ 30 s on one CPU thread)
def test_after_warmup_a_compiled_replica_compiles_nothing_for_its_first_job() -> None:
    torch._dynamo.reset()
    counters.clear()
    runner = _runner(compiled_blocks())
    warm_up_replica(runner)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    for job in (_job(runner), replace(_job(runner), identity_latents=None)):
        compiled = runner.generate(job)
        assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
        eager = _runner().generate(job)
        assert float((compiled - eager).abs().max() / eager.abs().max()) < 1e-5
