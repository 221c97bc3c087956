"""The seams of the one DiT forward: adapters, block hooks, block execution.

Each seam is checked against an independent computation: adapters against merged weights,
`SkipRest` against a model cut after that block, checkpointing against the plain forward.
(The sequence-parallel sharding is checked against one process in tests/test_parallel.py.)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from standin.dit import WanDiT
from standin.forward_plan import LOCAL, ForwardPlan, SkipRest, checkpointed_blocks
from standin.rope import video_positions
from tests.test_dit import CFG, assert_close, inputs, randomized


@dataclass
class MergedDeltas:
    """Adapters adding x·Dᵀ for a delta D per layer, recording which layers they saw."""

    deltas: dict[str, torch.Tensor]
    seen: set[str] = field(default_factory=set)

    def linear(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen.add(name)
        return y + x @ self.deltas[name].to(x.dtype).T


def base_linears(model: WanDiT) -> dict[str, nn.Linear]:
    """Every base linear layer (Stand-In's own identity LoRA excluded)."""
    return {
        name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and "_loras" not in name
    }


def test_adapters_on_every_linear_equal_merged_weights() -> None:
    model = randomized()
    g = torch.Generator().manual_seed(5)
    deltas = {n: torch.randn(m.weight.shape, generator=g) * 0.05 for n, m in base_linears(model).items()}
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in base_linears(merged).items():
            layer.weight += deltas[name]
    latents, timestep, context, face = inputs()

    adapters = MergedDeltas(deltas)
    with torch.no_grad():
        cache = model.identity_cache(face, latents.shape, adapters)
        ours = model(latents, timestep, context, cache, adapters)
        expected = merged(latents, timestep, context, merged.identity_cache(face, latents.shape))
        plain = model(latents, timestep, context, model.identity_cache(face, latents.shape))
    assert adapters.seen == set(deltas), "some base linear layer never met the adapters"
    assert_close(ours, expected, rtol=1e-5)
    assert (ours - plain).abs().max() > 1e-2  # the deltas matter


def test_identity_cache_meets_the_adapters_of_the_layers_identity_tokens_pass() -> None:
    model = randomized()
    latents, _, _, face = inputs()
    adapters = MergedDeltas({n: torch.zeros(m.weight.shape) for n, m in base_linears(model).items()})
    with torch.no_grad():
        model.identity_cache(face, latents.shape, adapters)
    layers = CFG.num_layers
    expected = {f"blocks.{i}.self_attn.{p}" for i in range(layers) for p in "qkv"}
    # the last block only yields K/V: its output projection and FFN would be dropped
    expected |= {f"blocks.{i}.{p}" for i in range(layers - 1) for p in ("self_attn.o", "ffn.0", "ffn.2")}
    expected |= {"time_embedding.0", "time_embedding.2", "time_projection.1"}
    assert adapters.seen == expected  # no cross-attention, text embedding or head


def test_a_hook_returning_skip_rest_equals_a_model_cut_after_that_block() -> None:
    model = randomized()
    latents, timestep, context, face = inputs()
    cut = copy.deepcopy(model)
    cut.blocks = cut.blocks[:2]
    calls: list[int] = []

    def stop_after_block_1(i: int, x: torch.Tensor) -> torch.Tensor | SkipRest:
        calls.append(i)
        return SkipRest(x) if i == 1 else x

    with torch.no_grad():
        cache = model.identity_cache(face, latents.shape)
        ours = model(latents, timestep, context, cache, plan=ForwardPlan(after_block=stop_after_block_1))
        # the cut model's identity cache has the same first two layers
        expected = cut(latents, timestep, context, cut.identity_cache(face, latents.shape))
    assert calls == [0, 1]
    assert_close(ours, expected, rtol=1e-6)


def test_a_hook_that_adds_to_the_tokens_changes_exactly_what_follows() -> None:
    model = randomized()
    latents, timestep, context, _ = inputs()
    bump = torch.randn(CFG.dim, generator=torch.Generator().manual_seed(3))

    def add_after_last(i: int, x: torch.Tensor) -> torch.Tensor:
        return x + bump if i == CFG.num_layers - 1 else x

    with torch.no_grad():
        ours = model(latents, timestep, context, plan=ForwardPlan(after_block=add_after_last))
        # independently: run the blocks by hand and add before the head
        grid = model.token_grid(latents.shape)
        x = model.patchify(latents)
        rope = model.rope(video_positions(*grid))
        t_emb, t_mod = model.time_modulation(timestep)
        ctx = model.embed_text(context)
        for block in model.blocks:
            x = block(x, t_mod, ctx, rope, None, LOCAL.sharding.attention)
        expected = model.unpatchify(model.head(x + bump, t_emb), grid)
    assert_close(ours, expected, rtol=1e-6)


def test_checkpointed_blocks_give_the_same_output_and_gradients() -> None:
    latents, timestep, context, face = inputs()
    results = []
    for plan in (LOCAL, ForwardPlan(run_block=checkpointed_blocks)):
        model = randomized()
        cache = model.identity_cache(face, latents.shape, plan=plan)
        out = model(latents, timestep, context, cache, plan=plan)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    assert any("self_attn.q_loras" in n for n in grads_a)  # gradients flow through the identity cache
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7)
