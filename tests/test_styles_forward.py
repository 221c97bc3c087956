"""Style LoRAs applied unmerged through the DiT's adapter seam equal merged weights, stack,
leave the shared model untouched, reach identity tokens where the official merge does, and keep
concurrent requests apart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from standin.config import DiTConfig
from standin.styles import StyleLoRA, StyleSet, pinned_model
from tests.test_styles import CFG, FORMATS, as_format, random_deltas, write

# -- applied unmerged, per request ---------------------------------------------------------


def randomized(cfg: DiTConfig = CFG, seed: int = 0):
    """A DiT whose every weight is random (identity LoRA included), so no path is a no-op."""
    from standin.dit import WanDiT

    torch.manual_seed(seed)
    model = WanDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval().requires_grad_(False)


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(2, 16, 3, 6, 10, generator=g),
        "t": torch.tensor([870.0, 120.0]),
        "context": torch.randn(2, 7, CFG.text_dim, generator=g),
        "negative": torch.randn(2, 7, CFG.text_dim, generator=g),
        "face": torch.randn(1, 16, 1, 8, 4, generator=g),
    }


def velocity(model, x: dict[str, torch.Tensor], adapters=None) -> torch.Tensor:
    """One forward with identity; the cache is built with the same adapters, as a request does."""
    cache = model.identity_cache(x["face"], x["latents"].shape, adapters=adapters)
    return model(x["latents"], x["t"], x["context"], cache, adapters=adapters)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def model():
    return randomized()


def full_delta_file(path: Path, seed: int = 5) -> Path:
    """diff / diff_b full deltas on some layers, low-rank on others, head and time projection too."""
    g = torch.Generator().manual_seed(seed)
    d, f = CFG.dim, CFG.ffn_dim

    def r(*shape: int, std: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    return write(
        path,
        {
            "diffusion_model.blocks.0.self_attn.k.diff": r(d, d),
            "diffusion_model.blocks.0.self_attn.k.diff_b": r(d),
            "diffusion_model.blocks.1.ffn.0.diff": r(f, d),
            "diffusion_model.blocks.1.ffn.2.diff_b": r(d),
            "diffusion_model.blocks.1.cross_attn.o.lora_down.weight": r(2, d, std=0.2),
            "diffusion_model.blocks.1.cross_attn.o.lora_up.weight": r(d, 2, std=0.2),
            "diffusion_model.blocks.1.cross_attn.o.alpha": torch.tensor(1.0),
            "diffusion_model.head.head.diff_b": r(64),
            "diffusion_model.time_projection.1.diff_b": r(6 * d),
            "diffusion_model.blocks.0.norm3.diff": torch.zeros(d),
        },
    )


@pytest.mark.parametrize("fmt", [*FORMATS, "full_deltas"])
def test_unmerged_equals_merged_weights_for_every_format(tmp_path: Path, model, fmt: str) -> None:
    path = tmp_path / f"{fmt}.safetensors"
    if fmt == "full_deltas":
        full_delta_file(path)
    else:
        write(path, as_format(random_deltas(), fmt))
    styles = StyleSet([(StyleLoRA.load(path, model), 0.7)])
    x = inputs()
    with torch.no_grad():
        unmerged = velocity(model, x, styles)
        merged = velocity(pinned_model(model, styles), x)
        plain = velocity(model, x)
    assert rel(unmerged, merged) <= 1e-5
    assert rel(unmerged, plain) > 1e-3  # the style does change the output
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), randomized().state_dict().values(), strict=True)
    )


def test_several_styles_stack_like_merging_them_all(tmp_path: Path, model) -> None:
    a = StyleLoRA.load(write(tmp_path / "a.safetensors", as_format(random_deltas(1), "kohya")), model)
    b = StyleLoRA.load(write(tmp_path / "b.safetensors", as_format(random_deltas(2), "diffusers")), model)
    c = StyleLoRA.load(full_delta_file(tmp_path / "c.safetensors"), model)
    styles = StyleSet([(a, 0.5), (b, -0.8), (c, 1.3)])
    x = inputs()
    with torch.no_grad():
        assert rel(velocity(model, x, styles), velocity(pinned_model(model, styles), x)) <= 1e-5


def test_scale_zero_is_the_base_model_bit_for_bit(tmp_path: Path, model) -> None:
    style = StyleLoRA.load(write(tmp_path / "a.safetensors", as_format(random_deltas(), "ab")), model)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            velocity(model, x, StyleSet([(style, 0.0)])), velocity(model, x), rtol=0, atol=0
        )


def test_identity_tokens_take_the_style_on_self_attention_and_ffn_but_not_cross_attention(
    tmp_path: Path, model
) -> None:
    x = inputs()
    d = random_deltas()
    with torch.no_grad():
        base = model.identity_cache(x["face"], x["latents"].shape)
        for layers, changes in ((("cross_attn.k",), False), (("self_attn.v",), True), (("ffn.0",), True)):
            chosen = {k: v for k, v in d.items() if k.split(".", 2)[2] in layers}
            path = write(tmp_path / f"{layers[0]}.safetensors", as_format(chosen, "ab"))
            styles = StyleSet([(StyleLoRA.load(path, model), 1.0)])
            cache = model.identity_cache(x["face"], x["latents"].shape, adapters=styles)
            # the last layer's K/V come before its FFN: compare every layer's values
            differs = any(not torch.equal(v, w) for v, w in zip(cache.values, base.values, strict=True))
            assert differs == changes, layers


def test_requests_with_different_styles_interleaved_equal_each_run_alone(tmp_path: Path, model) -> None:
    """Two requests through one shared model, step by step in turns (as a server interleaves
    them), with CFG's two passes: each equals running alone, so nothing leaks between them."""
    from standin.scheduler import FlowMatchSchedule

    s1 = StyleLoRA.load(write(tmp_path / "a.safetensors", as_format(random_deltas(1), "kohya")), model)
    s2 = StyleLoRA.load(write(tmp_path / "b.safetensors", as_format(random_deltas(2), "peft")), model)
    requests = [
        (inputs(1), StyleSet([(s1, 1.0)])),
        (inputs(2), StyleSet([(s2, 0.6), (s1, -0.4)])),
        (inputs(3), None),
    ]
    schedule = FlowMatchSchedule(3, shift=5.0)

    def start(x, styles):
        return {
            "x": x,
            "styles": styles,
            "latents": x["latents"],
            "cache": model.identity_cache(x["face"], x["latents"].shape, adapters=styles),
        }

    def step(state, i):
        x, styles = state["x"], state["styles"]
        t = schedule.timestep(i).expand(2)
        pos = model(state["latents"], t, x["context"], state["cache"], adapters=styles)
        neg = model(state["latents"], t, x["negative"], state["cache"], adapters=styles)
        state["latents"] = schedule.step(neg + 5.0 * (pos - neg), i, state["latents"])

    with torch.no_grad():
        alone = []
        for x, styles in requests:
            state = start(x, styles)
            for i in range(3):
                step(state, i)
            alone.append(state["latents"])
        states = [start(x, styles) for x, styles in requests]
        for i in range(3):
            for state in states:
                step(state, i)
    for state, expected in zip(states, alone, strict=True):
        torch.testing.assert_close(state["latents"], expected, rtol=0, atol=0)
    assert rel(alone[0], alone[2]) > 1e-3 and rel(alone[1], alone[2]) > 1e-3


@pytest.mark.slow
def test_style_benchmark_writes_every_variant_and_pinned_equals_unmerged(tmp_path: Path) -> None:
    import json

    from benchmarks import style_lora

    style_lora.main(["--preset", "tiny", "--reps", "1", "--warmup", "0", "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "style_lora_tiny_cpu.json").read_text())
    res = saved["results"]
    assert set(res["samples_s"]) == {"none", style_lora.PINNED} | {
        f"{k}_r{r}" for k in style_lora.SETS for r in style_lora.RANKS
    }
    assert res["pinned_vs_unmerged_max_rel_err"] <= 1e-5
    assert (tmp_path / "style_lora_tiny_cpu.png").stat().st_size > 0


def test_in_bfloat16_unmerged_stays_as_close_to_float32_as_merged_does(tmp_path: Path, model) -> None:
    """The GPU dtype: both ways round differently, neither drifts further from fp32 than the other."""
    path = write(tmp_path / "a.safetensors", as_format(random_deltas(), "kohya"))
    style = StyleLoRA.load(path, model)
    x = inputs()
    with torch.no_grad():
        exact = velocity(model, x, StyleSet([(style, 0.7)]))
        half = randomized().to(torch.bfloat16)
        styles = StyleSet([(style.to(dtype=torch.bfloat16), 0.7)])
        unmerged = velocity(half, x, styles)
        merged = velocity(pinned_model(half, styles), x)
    err_unmerged, err_merged = rel(unmerged, exact), rel(merged, exact)
    assert err_unmerged <= max(2 * err_merged, 1e-2), (err_unmerged, err_merged)
