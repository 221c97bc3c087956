"""bf16 inference numerics (standin/dit.py docstring): which parameters stay float32, and the bf16
DiT against the float64 reference.

Tolerance: max-norm relative error ≤ 1e-2 for the 3-layer test model of tests/test_dit.py (bf16
keeps 8 significant bits, ≈ 4e-3 per rounding; measured 4.2e-3 with and without identity, vs
1.1e-2 when every parameter is bf16, 4e-7 in float32); the mixed model (float32 time embedding,
modulation, norms, head) must also be no worse than the same weights all in bf16.
"""

from __future__ import annotations

import copy

import torch

from standin.dit import WanDiT, keeps_float32
from standin.step_cache import FirstBlockCache
from tests.reference_dit import reference_forward
from tests.test_dit import CFG, inputs, randomized

BF16_RTOL = 1e-2


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def _bf16(model: WanDiT) -> WanDiT:
    return copy.deepcopy(model).to_inference_dtype(torch.bfloat16)


def test_inference_dtype_keeps_the_official_float32_parts() -> None:
    model = _bf16(randomized())
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    float32 = {n for n in dtypes if keeps_float32(n)}
    assert {dtypes[n] for n in float32} == {torch.float32}
    assert {d for n, d in dtypes.items() if n not in float32} == {torch.bfloat16}
    for name in ("time_embedding.0.weight", "time_projection.1.weight", "head.head.weight",
                 "head.modulation", "blocks.2.modulation", "blocks.0.self_attn.norm_q.weight",
                 "blocks.1.norm3.bias"):
        assert name in float32, name
    for name in ("blocks.0.self_attn.q.weight", "blocks.1.ffn.0.bias", "patch_embedding.weight",
                 "text_embedding.2.weight", "blocks.0.self_attn.k_loras.down.weight"):
        assert name not in float32, name
    # float32 back again: every parameter float32
    assert {p.dtype for p in model.to_inference_dtype(torch.float32).parameters()} == {torch.float32}


def test_bf16_dit_matches_float64_reference_with_and_without_identity() -> None:
    model = randomized()
    sd = model.state_dict()
    bf16 = _bf16(model)
    all_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    latents, t, ctx, face = inputs()
    with torch.no_grad():
        plain_ref, _ = reference_forward(sd, CFG, latents, t, ctx)
        ident_ref, _ = reference_forward(sd, CFG, latents, t, ctx, face)
        plain = bf16(latents, t, ctx)
        cache = bf16.identity_cache(face, latents.shape)
        cached = bf16(latents, t, ctx, cache)
        rebuilt = bf16(latents, t, ctx, bf16.identity_cache(face, latents.shape))
        naive = all_bf16(latents, t, ctx, all_bf16.identity_cache(face, latents.shape))
    assert plain.dtype == torch.float32 and cached.dtype == torch.float32
    assert _rel(plain, plain_ref) <= BF16_RTOL
    assert _rel(cached, ident_ref) <= BF16_RTOL
    torch.testing.assert_close(cached, rebuilt, rtol=0, atol=0)  # the identity cache stays exact
    assert _rel(cached, ident_ref) <= _rel(naive, ident_ref)
    assert cache.keys[0].dtype == torch.bfloat16  # identity K/V held in the compute dtype


def test_bf16_step_cache_off_and_skipping_against_the_reference() -> None:
    model = randomized()
    bf16 = _bf16(model)
    latents, t, ctx, face = inputs()
    ref, _ = reference_forward(model.state_dict(), CFG, latents, t, ctx, face)
    with torch.no_grad():
        identity = bf16.identity_cache(face, latents.shape)
        uncached = bf16(latents, t, ctx, identity)
        step_cache = FirstBlockCache(threshold=1e-3)
        step_cache.begin_step(0)
        full = step_cache.call(bf16, identity)(latents, t, ctx)
        step_cache.begin_step(1)
        skipped = step_cache.call(bf16, identity)(latents, t, ctx)  # unchanged inputs: skipped
    assert step_cache.decisions == [[False], [True]]
    torch.testing.assert_close(full, uncached, rtol=0, atol=0)
    assert _rel(skipped, ref) <= BF16_RTOL
