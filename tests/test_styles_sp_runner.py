"""The SP runner carries a request's styles as references: a styled request run by
`parallel.SPRunner` over 2 gloo ranks (Ulysses 2, and CFG 2: each CFG pass on its own rank), each
rank resolving the names from its own cache, equals `StandInPipeline.denoise` with the same
StyleSet in one process. A request whose file hash does not match is refused on rank 0 before
anything is sent, and the group serves the next request. Ranks run in their own processes
with a hard deadline."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch

from tests.distributed import run_ranks

TOLERANCE = 1e-5
DEADLINE_S = 150
REPO = Path(__file__).resolve().parent.parent


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _random_style(model, seed: int):
    """A rank-4 style on every linear layer of every block, the same in every process."""
    from standin.styles import LayerDelta, StyleLoRA

    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in model.named_modules():
        if name.startswith("blocks.") and isinstance(m, torch.nn.Linear) and "_loras" not in name:
            down = torch.randn(4, m.in_features, generator=gen) * 0.2
            up = torch.randn(m.out_features, 4, generator=gen) * 0.2
            layers[name] = LayerDelta(down, up, 0.5)
    return StyleLoRA("random", "synthetic", layers, sha256="f" * 64)


def _rank_main(rank: int, world: int, init_method: str) -> dict:
    import numpy as np
    from PIL import Image

    from parallel import (
        Collectives,
        DenoiseRequest,
        DeviceMesh,
        ParallelConfig,
        SPRunner,
        init_distributed,
    )
    from parallel.styles import StyleRef
    from standin.errors import InvalidRequestError
    from standin.pipeline import DenoiseInputs, GenerationParams, StandInPipeline, initial_noise
    from standin.styles import StyleLoRA, StyleSet

    init_distributed(rank, world, init_method, timeout=datetime.timedelta(seconds=60))
    pipe = StandInPipeline.from_preset("tiny", device="cpu", dtype=torch.float32)
    model = pipe.dit
    palette = StyleLoRA.load(REPO / "examples" / "tiny_palette_style.safetensors", model, name="palette")
    library = {"palette": palette, "random": _random_style(model, seed=0)}
    resolved: list[list[str]] = []

    def resolver(refs):  # this rank's own "cache": names → loaded styles
        resolved.append([r.name for r in refs])
        return StyleSet([(library[r.name], r.scale) for r in refs])

    refs = (StyleRef("palette", 1.0, palette.sha256), StyleRef("random", 0.5, "f" * 64))
    styles = StyleSet([(palette, 1.0), (library["random"], 0.5)])
    params = GenerationParams(
        prompt="moves right on navy", width=32, height=32, num_frames=5, num_steps=3, seed=5
    )
    image = np.asarray(Image.open(REPO / "examples" / "glyph_reference.png").convert("RGB"))
    ctx, neg = pipe.encode_prompts(params.prompt, params.negative_prompt)
    identity = pipe.encode_identity(image)
    single = pipe.denoise(DenoiseInputs.for_request(params, ctx, neg, identity, adapters=styles))
    plain = pipe.denoise(DenoiseInputs.for_request(params, ctx, neg, identity))

    def request(styles_refs):
        return DenoiseRequest(
            latents=initial_noise(params),
            context=ctx,
            negative_context=neg,
            identity_latents=identity,
            num_steps=params.num_steps,
            guidance=params.guidance_scale,
            shift=params.shift,
            styles=styles_refs,
        )

    result: dict = {}
    for name, config in (("ulysses2", ParallelConfig(ulysses=2)), ("cfg2", ParallelConfig(cfg=2))):
        mesh = DeviceMesh(config, model.config.num_heads)
        runner = SPRunner(model, Collectives(mesh), styles=resolver)
        res: dict = {}
        if mesh.rank == 0:
            out = runner.generate(request(refs))
            res["err"] = _rel(out, single)
            res["style_effect"] = _rel(single, plain)
            bad = (StyleRef("palette", 1.0, "0" * 64),)
            try:
                runner.generate(request(bad))
                res["bad_hash"] = "accepted"
            except InvalidRequestError as exc:
                res["bad_hash"] = str(exc)
            res["after_err"] = _rel(runner.generate(request(refs)), single)
            runner.shutdown()
        else:
            runner.serve_forever()
        res["resolved"] = list(resolved)
        resolved.clear()
        result[name] = res
    return result


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> list[dict]:
    return run_ranks(_rank_main, 2, tmp_path_factory.mktemp("styles_sp_runner"), DEADLINE_S)


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mesh", ["ulysses2", "cfg2"])
def test_sp_runner_with_styles_equals_the_single_process_pipeline(world2: list[dict], mesh: str) -> None:
    rank0, rank1 = world2[0][mesh], world2[1][mesh]
    assert rank0["err"] <= TOLERANCE, rank0
    assert rank0["style_effect"] > 100 * TOLERANCE, rank0  # the styles matter
    assert rank0["after_err"] <= TOLERANCE, rank0
    # names travelled, each rank resolved them itself (rank 0 also once in validation)
    assert rank1["resolved"] == [["palette", "random"]] * 2, rank1
    assert ["palette"] in rank0["resolved"] and ["palette"] not in rank1["resolved"]


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_file_hash_mismatch_is_refused_on_rank_0_before_anything_is_sent(world2: list[dict]) -> None:
    for mesh in ("ulysses2", "cfg2"):
        assert "changed since the request was accepted" in world2[0][mesh]["bad_hash"], world2[0][mesh]
