"""A request's style LoRAs in the sequence-parallel forward: the tiny model's whole denoising
loop (identity cache built with the styles, CFG's two passes, Euler steps) over 2 gloo ranks
equals the single-process loop. Ranks run in their own processes with a hard deadline."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch

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


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    result: dict = {}
    try:
        from parallel import Collectives, DeviceMesh, ParallelConfig, ShardedDiT, init_distributed
        from standin.pipeline import StandInPipeline
        from standin.styles import StyleLoRA, StyleSet

        init_distributed(rank, world, f"tcp://127.0.0.1:{port}", timeout=datetime.timedelta(seconds=60))
        pipe = StandInPipeline.from_preset("tiny", device="cpu", dtype=torch.float32)
        model = pipe.dit
        palette = StyleLoRA.load(REPO / "examples" / "tiny_palette_style.safetensors", model)
        styles = StyleSet([(palette, 1.0), (_random_style(model, rank=4, seed=0), 0.5)])
        noise, ctx, neg, identity = _request(pipe)
        single = _denoise(model, noise, ctx, neg, identity, styles)
        plain = _denoise(model, noise, ctx, neg, identity, None)
        for name, config in (("ulysses2", ParallelConfig(ulysses=2)), ("ring2", ParallelConfig(ring=2))):
            sharded = ShardedDiT(model, Collectives(DeviceMesh(config, model.config.num_heads)))
            sp = _denoise(sharded, noise, ctx, neg, identity, styles)
            result[name] = {"err": _rel(sp, single), "style_effect": _rel(single, plain)}
    except BaseException:
        result = {"crash": traceback.format_exc()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("styles_sp")
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, str(out))) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        pytest.fail(f"ranks {hung} still running after {DEADLINE_S} s (hang)")
    results = []
    for r in range(2):
        path = out / f"rank{r}.json"
        if not path.exists():
            pytest.fail(f"rank {r} exited without results (exit code {procs[r].exitcode})")
        results.append(json.loads(path.read_text()))
    crashes = [res["crash"] for res in results if "crash" in res]
    if crashes:
        pytest.fail("a rank crashed:\n" + "\n".join(crashes))
    return results


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mesh", ["ulysses2", "ring2"])
def test_styled_request_in_sequence_parallel_equals_single_process(world2: list[dict], mesh: str) -> None:
    for rank, res in enumerate(world2):
        assert res[mesh]["err"] <= TOLERANCE, (rank, res[mesh])
        # the styles must matter, or the equality would not show they are applied on every rank
        assert res[mesh]["style_effect"] > 100 * TOLERANCE, (rank, res[mesh])
