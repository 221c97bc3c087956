"""The Stand-In DiT against an independent float64 reference and its own invariants."""

from __future__ import annotations

import pytest
import torch

from standin.attention import select_backend
from standin.config import DiTConfig
from standin.dit import WanDiT
from standin.presets import dit_preset
from standin.rope import apply_rope, identity_positions, rope_angles, rope_split, video_positions
from tests.reference_dit import reference_forward

# 3 heads of 24 channels, 3 layers; grids with rows != columns catch row/column mix-ups.
CFG = DiTConfig(dim=72, ffn_dim=96, num_heads=3, num_layers=3, text_dim=20, freq_dim=16, lora_rank=6)
VIDEO = (2, 16, 3, 6, 10)  # [B, C, F, H, W] latents → token grid (3, 3, 5)
FACE = (1, 16, 1, 8, 4)  # identity latent → 4 × 2 identity tokens


def randomized(cfg: DiTConfig = CFG, seed: int = 0) -> WanDiT:
    """A model whose every weight (LoRA `up` included) is random, so no path is a no-op."""
    torch.manual_seed(seed)
    model = WanDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(VIDEO, generator=g)
    timestep = torch.tensor([870.0, 120.0])
    context = torch.randn(VIDEO[0], 7, CFG.text_dim, generator=g)
    face = torch.randn(FACE, generator=g)
    return latents, timestep, context, face


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 2e-5) -> None:
    """Max-norm relative agreement, the fp32-vs-fp64 yardstick used throughout."""
    err = (actual.double() - expected.double()).abs().max() / expected.double().abs().max()
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


@pytest.fixture(scope="module")
def model() -> WanDiT:
    return randomized()


# -- RoPE ------------------------------------------------------------------------------


def test_rope_split_matches_wan_for_real_head_dim() -> None:
    assert rope_split(128) == (44, 42, 42)
    assert rope_split(24) == (8, 8, 8)


def test_float32_rope_matches_float64_complex_rotation() -> None:
    # Positions as large as the 14B case: 21 frames, rows/columns past a 30×52 grid + 32×32 face.
    head_dim = 128
    pos = torch.cat([video_positions(21, 3, 4), identity_positions(32, 32, 30, 52)])
    pos[:12] += torch.tensor([0, 27, 48])
    x = torch.randn(2, len(pos), 3, head_dim)
    cos, sin = rope_angles(pos, head_dim)
    ours = apply_rope(x, cos, sin)

    parts = []
    for axis, dim in enumerate(rope_split(head_dim)):
        inv = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        parts.append(torch.outer(pos[:, axis].double(), inv))
    rot = torch.polar(torch.ones_like(torch.cat(parts, 1)), torch.cat(parts, 1))
    xc = torch.view_as_complex(x.double().reshape(2, len(pos), 3, -1, 2))
    expected = torch.view_as_real(xc * rot[None, :, None, :]).flatten(-2)
    assert_close(ours, expected, rtol=1e-6)


def test_identity_positions_are_frame_minus_one_after_the_video_grid() -> None:
    pos = identity_positions(2, 3, video_h=30, video_w=52)
    assert pos[:, 0].tolist() == [-1] * 6
    assert sorted(set(pos[:, 1].tolist())) == [30, 31]
    assert sorted(set(pos[:, 2].tolist())) == [52, 53, 54]


# -- forward against the float64 reference ----------------------------------------------


def test_plain_forward_matches_float64_reference(model: WanDiT) -> None:
    latents, t, ctx, _ = inputs()
    with torch.no_grad():
        ours = model(latents, t, ctx)
    expected, _ = reference_forward(model.state_dict(), CFG, latents, t, ctx)
    assert_close(ours, expected)


def test_identity_forward_matches_float64_restricted_attention(model: WanDiT) -> None:
    latents, t, ctx, face = inputs()
    with torch.no_grad():
        cache = model.identity_cache(face, latents.shape)
        ours = model(latents, t, ctx, cache)
    expected, ref_kv = reference_forward(model.state_dict(), CFG, latents, t, ctx, face)
    assert_close(ours, expected)
    for layer, (k_ref, v_ref) in enumerate(ref_kv):
        k, v = cache.layer(layer)
        assert_close(k.flatten(-2).expand_as(k_ref), k_ref)
        assert_close(v.flatten(-2).expand_as(v_ref), v_ref)


def test_cached_steps_equal_recomputed_steps(model: WanDiT) -> None:
    latents, _, ctx, face = inputs()
    with torch.no_grad():
        cache = model.identity_cache(face, latents.shape)
        for step, timestep in enumerate([999.0, 500.0, 3.0]):
            x = latents + step  # a later step: other latents, timestep and prompt
            tt = torch.full((2,), timestep)
            cached = model(x, tt, ctx * (step + 1), cache)
            fresh = model(x, tt, ctx * (step + 1), model.identity_cache(face, latents.shape))
            torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
            expected, _ = reference_forward(model.state_dict(), CFG, x, tt, ctx * (step + 1), face)
            assert_close(cached, expected)


def test_identity_kv_never_depend_on_the_video(model: WanDiT) -> None:
    latents, t, ctx, face = inputs()
    _, kv_a = reference_forward(model.state_dict(), CFG, latents, t, ctx, face)
    _, kv_b = reference_forward(model.state_dict(), CFG, -3 * latents, t * 0.1, ctx + 1, face)
    for (ka, va), (kb, vb) in zip(kv_a, kv_b, strict=True):
        torch.testing.assert_close(ka, kb, rtol=0, atol=0)
        torch.testing.assert_close(va, vb, rtol=0, atol=0)
    # And a forward never changes a cache it reads.
    with torch.no_grad():
        cache = model.identity_cache(face, latents.shape)
        before = [k.clone() for k in cache.keys]
        model(latents, t, ctx, cache)
    for k0, k1 in zip(before, cache.keys, strict=True):
        assert torch.equal(k0, k1)


def test_identity_changes_the_video_prediction(model: WanDiT) -> None:
    latents, t, ctx, face = inputs()
    with torch.no_grad():
        with_face = model(latents, t, ctx, model.identity_cache(face, latents.shape))
        other_face = model(latents, t, ctx, model.identity_cache(face.flip(-1), latents.shape))
        without = model(latents, t, ctx)
    assert (with_face - without).abs().max() > 1e-2
    assert (with_face - other_face).abs().max() > 1e-2


# -- batching and request isolation ------------------------------------------------------


def test_batch_of_two_equals_two_batches_of_one(model: WanDiT) -> None:
    latents, t, ctx, face = inputs()
    with torch.no_grad():
        shared = model.identity_cache(face, latents.shape)
        batched = model(latents, t, ctx, shared)
        singles = torch.cat([model(latents[i : i + 1], t[i : i + 1], ctx[i : i + 1], shared) for i in (0, 1)])
        assert_close(batched, singles, rtol=1e-6)
        # Two different faces in one batch: a [2, ...] cache.
        faces = torch.cat([face, -face])
        per_item = model.identity_cache(faces, latents.shape)
        batched = model(latents, t, ctx, per_item)
        for i, f in enumerate((face, -face)):
            cache = model.identity_cache(f, latents.shape)
            alone = model(latents[i : i + 1], t[i : i + 1], ctx[i : i + 1], cache)
            assert_close(batched[i : i + 1], alone, rtol=1e-6)


def test_positive_and_negative_prompt_batched_equal_two_passes(model: WanDiT) -> None:
    latents, t, ctx, face = inputs()
    x, tt = latents[:1].expand(2, -1, -1, -1, -1), t[:1].expand(2)
    with torch.no_grad():
        cache = model.identity_cache(face, latents.shape)
        both = model(x, tt, ctx, cache)
        pos = model(x[:1], tt[:1], ctx[:1], cache)
        neg = model(x[:1], tt[:1], ctx[1:], cache)
    assert_close(both, torch.cat([pos, neg]), rtol=1e-6)


def test_interleaved_requests_do_not_share_identity(model: WanDiT) -> None:
    latents, t, ctx, face = inputs()
    x, tt, c = latents[:1], t[:1], ctx[:1]
    with torch.no_grad():
        alone_a = model(x, tt, c, model.identity_cache(face, x.shape))
        alone_b = model(x, tt, c, model.identity_cache(2 * face, x.shape))
        cache_a = model.identity_cache(face, x.shape)
        cache_b = model.identity_cache(2 * face, x.shape)
        b_first = model(x, tt, c, cache_b)
        a_second = model(x, tt, c, cache_a)
        plain = model(x, tt, c)
    assert torch.equal(a_second, alone_a) and torch.equal(b_first, alone_b)
    assert torch.equal(plain, model(x, tt, c))  # no request without a face sees a face


def test_cache_for_another_video_size_is_rejected(model: WanDiT) -> None:
    latents, t, ctx, face = inputs()
    with torch.no_grad():
        cache = model.identity_cache(face, (3, 6, 12))
        with pytest.raises(ValueError, match="rebuild it"):
            model(latents, t, ctx, cache)
        with pytest.raises(ValueError, match="batch"):
            model(latents, t, ctx, model.identity_cache(torch.cat([face] * 3), latents.shape))


# -- the LoRA touches identity tokens only ------------------------------------------------


def _without_lora(model: WanDiT) -> WanDiT:
    base = WanDiT(DiTConfig(**{**CFG.__dict__, "lora_rank": 0})).eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "_loras." not in k})
    return base


def test_zero_lora_up_equals_base_model(model: WanDiT) -> None:
    latents, t, ctx, face = inputs()
    zeroed = randomized()
    with torch.no_grad():
        for block in zeroed.blocks:
            for name in ("q_loras", "k_loras", "v_loras"):
                getattr(block.self_attn, name).up.weight.zero_()
        base = _without_lora(zeroed)
        out = zeroed(latents, t, ctx, zeroed.identity_cache(face, latents.shape))
        expected = base(latents, t, ctx, base.identity_cache(face, latents.shape))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_lora_never_touches_video_tokens(model: WanDiT) -> None:
    latents, t, ctx, _ = inputs()
    with torch.no_grad():
        assert torch.equal(model(latents, t, ctx), _without_lora(model)(latents, t, ctx))


# -- presets and key names ------------------------------------------------------------------


def official_keys(num_layers: int) -> set[str]:
    """The official Wan2.1 T2V DiT keys plus Stand-In's LoRA keys, spelled out."""
    keys = {"patch_embedding.weight", "patch_embedding.bias", "head.head.weight", "head.head.bias",
            "head.modulation"}
    keys |= {f"{m}.{i}.{p}" for m, i in [("text_embedding", 0), ("text_embedding", 2),
                                         ("time_embedding", 0), ("time_embedding", 2),
                                         ("time_projection", 1)] for p in ("weight", "bias")}
    for i in range(num_layers):
        b = f"blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            keys |= {f"{b}{attn}.{m}.{p}" for m in "qkvo" for p in ("weight", "bias")}
            keys |= {f"{b}{attn}.norm_q.weight", f"{b}{attn}.norm_k.weight"}
        keys |= {f"{b}self_attn.{m}_loras.{p}.weight" for m in "qkv" for p in ("down", "up")}
        keys |= {f"{b}norm3.weight", f"{b}norm3.bias", f"{b}modulation"}
        keys |= {f"{b}ffn.{j}.{p}" for j in (0, 2) for p in ("weight", "bias")}
    return keys


@pytest.mark.parametrize("name", ["wan2.1-t2v-14b", "wan2.1-t2v-1.3b", "tiny"])
def test_state_dict_keys_are_the_official_ones(name: str) -> None:
    cfg = dit_preset(name)
    with torch.device("meta"):
        model = WanDiT(cfg)
    assert set(model.state_dict()) == official_keys(cfg.num_layers)


def test_14b_shapes_and_lora_size() -> None:
    with torch.device("meta"):
        model = WanDiT(dit_preset("wan2.1-t2v-14b"))
    sd = model.state_dict()
    assert sd["blocks.0.self_attn.q.weight"].shape == (5120, 5120)
    assert sd["blocks.39.ffn.0.weight"].shape == (13824, 5120)
    assert sd["text_embedding.0.weight"].shape == (5120, 4096)
    assert sd["time_embedding.0.weight"].shape == (5120, 256)
    assert sd["patch_embedding.weight"].shape == (5120, 16, 1, 2, 2)
    assert sd["head.head.weight"].shape == (64, 5120)
    assert sd["blocks.0.self_attn.k_loras.down.weight"].shape == (128, 5120)
    lora = sum(v.numel() for k, v in sd.items() if "_loras." in k)
    assert lora == 40 * 3 * 2 * 128 * 5120  # ≈ 157M, the figure DESIGN.md quotes


def test_unknown_attention_backend_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANDIN_ATTENTION", "xformers")
    with pytest.raises(ValueError, match="STANDIN_ATTENTION"):
        select_backend(torch.zeros(1))
