"""A request's style LoRAs in the sequence-parallel forward: the tiny model's whole denoising
loop (identity cache built with the styles, CFG's two passes, Euler steps) over 2 gloo ranks
equals the single-process loop. Ranks run in their own processes with a hard deadline."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch

from tests.distributed import run_ranks

TOLERANCE = 1e-5
DEADLINE_S = 120
REPO = Path(__file__).resolve().parent.parent


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _random_style(model, rank: int, seed: int):
    """A style on every linear layer of every block (so identity tokens, video self-attention,
    cross-attention and FFN all carry it), identical in every process."""
    from standin.styles import LayerDelta, StyleLoRA

    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    layers = {}
    for name, m in modules.items():
        if name.startswith("blocks.") and isinstance(m, torch.nn.Linear) and "_loras" not in name:
            down = torch.randn(rank, m.in_features, generator=gen) * 0.2
            up = torch.randn(m.out_features, rank, generator=gen) * 0.2
            layers[name] = LayerDelta(down, up, 2.0 / rank)
    return StyleLoRA("random", "synthetic", layers)


def _request(pipe):
    """Real tiny inputs: the glyph reference, a prompt of the vocabulary, seeded noise."""
    import numpy as np
    from PIL import Image

    from standin.pipeline import WAN_NEGATIVE_PROMPT

    image = np.asarray(Image.open(REPO / "examples" / "glyph_reference.png").convert("RGB"))
    ctx, neg = pipe.encode_prompts("moves right on navy", WAN_NEGATIVE_PROMPT)
    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    return noise, ctx, neg, pipe.encode_identity(image)


@torch.no_grad()
def _denoise(dit, noise, ctx, neg, identity, adapters, steps: int = 4, guidance: float = 3.0):
    """The sampling loop of the pipeline and the SP runner, for a model or a ShardedDiT."""
    from standin.scheduler import FlowMatchSchedule

    schedule = FlowMatchSchedule(steps, shift=5.0)
    cache = dit.identity_cache(identity, noise.shape, adapters=adapters)
    latents = noise
    for i in range(steps):
        t = schedule.timestep(i).expand(1)
        pos = dit(latents, t, ctx, cache, adapters=adapters)
        negv = dit(latents, t, neg, cache, adapters=adapters)
        latents = schedule.step(negv + guidance * (pos - negv), i, latents)
    return latents


def _rank_main(rank: int, world: int, init_method: str) -> dict:
    from parallel import Collectives, DeviceMesh, ParallelConfig, ShardedDiT, init_distributed
    from standin.pipeline import StandInPipeline
    from standin.styles import StyleLoRA, StyleSet

    init_distributed(rank, world, init_method, timeout=datetime.timedelta(seconds=60))
    pipe = StandInPipeline.from_preset("tiny", device="cpu", dtype=torch.float32)
    model = pipe.dit
    palette = StyleLoRA.load(REPO / "examples" / "tiny_palette_style.safetensors", model)
    styles = StyleSet([(palette, 1.0), (_random_style(model, rank=4, seed=0), 0.5)])
    noise, ctx, neg, identity = _request(pipe)
    single = _denoise(model, noise, ctx, neg, identity, styles)
    plain = _denoise(model, noise, ctx, neg, identity, None)
    result = {}
    for name, config in (("ulysses2", ParallelConfig(ulysses=2)), ("ring2", ParallelConfig(ring=2))):
        sharded = ShardedDiT(model, Collectives(DeviceMesh(config, model.config.num_heads)))
        sp = _denoise(sharded, noise, ctx, neg, identity, styles)
        result[name] = {"err": _rel(sp, single), "style_effect": _rel(single, plain)}
    return result


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> list[dict]:
    return run_ranks(_rank_main, 2, tmp_path_factory.mktemp("styles_sp"), DEADLINE_S)


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mesh", ["ulysses2", "ring2"])
def test_styled_request_in_sequence_parallel_equals_single_process(world2: list[dict], mesh: str) -> None:
    for rank, res in enumerate(world2):
        assert res[mesh]["err"] <= TOLERANCE, (rank, res[mesh])
        # the styles must matter, or the equality would not show they are applied on every rank
        assert res[mesh]["style_effect"] > 100 * TOLERANCE, (rank, res[mesh])
