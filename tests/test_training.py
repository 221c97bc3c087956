"""The trainer: synthetic data, what each recipe trains, the loss path, checkpoints, data parallel."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from standin.checkpoints import read_torch_pickle
from standin.dit import WanDiT
from standin.presets import get_preset
from standin.scheduler import FlowMatchSchedule
from standin.tiny_weights import TINY_WEIGHTS, load_tiny_weights
from standin.training.command import LORA_FILE
from standin.training.synthetic import make_identities, render_clip, split_identities
from standin.training.tiny_recipe import (
    TinySchedule,
    latent_mask,
    tiny_identities,
    train_tiny,
)
from standin.training.trainer import (
    LatentBatch,
    TrainConfig,
    flow_matching_loss,
    sample_sigmas,
    select_trainable,
    train,
)
from standin.video import encode_mp4

TINY = get_preset("tiny")


def test_synthetic_clips_are_deterministic_and_held_out_identities_are_never_trained() -> None:
    ids = make_identities(20, seed=3)
    assert make_identities(20, seed=3) == ids
    a, b = render_clip(ids[0], seed=5), render_clip(ids[0], seed=5)
    assert np.array_equal(a.video, b.video) and a.prompt == b.prompt
    assert a.video.shape == (5, 32, 32, 3) and a.mask.any(axis=(1, 2)).all()
    # The reference shows the subject bigger than any video frame does (scale differs).
    assert (a.reference != 255).any(axis=2).sum() > a.mask.sum(axis=(1, 2)).max()
    train_ids, held = split_identities(ids, 5)
    assert len(held) == 5 and not {i.index for i in train_ids} & {i.index for i in held}
    trained, held_out = tiny_identities()
    assert max(i.index for i in trained) < min(i.index for i in held_out)


def test_latent_mask_follows_the_vae_frame_grouping() -> None:
    mask = np.zeros((5, 32, 32), bool)
    mask[3, 0, 0] = True  # frame 3 belongs to latent frame 1
    m = latent_mask(mask[None], TINY)
    assert m.shape == (1, 1, 2, 4, 4)
    assert m[0, 0, 1, 0, 0] == 1 and m.sum() == 1


def test_training_timesteps_come_from_the_samplers_shifted_schedule() -> None:
    sigmas = sample_sigmas(4000, 5.0, torch.Generator().manual_seed(0))
    schedule = FlowMatchSchedule(1000, shift=5.0).sigmas
    assert torch.isin(sigmas, schedule).all()
    # shift 5 spends most of the time at high noise: the median is 5·0.5/(1+4·0.5) ≈ 0.83
    assert 0.79 < sigmas.median() < 0.87


def _model(rank: int = 4) -> WanDiT:
    torch.manual_seed(0)
    return WanDiT(replace(TINY.dit, lora_rank=rank))


class _Source:
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.latents = torch.randn(6, 16, 2, 4, 4, generator=g)
        self.identity = torch.randn(6, 16, 1, 4, 4, generator=g)
        self.context = torch.randn(6, 8, TINY.dit.text_dim, generator=g)
        self.null_context = torch.zeros(1, 8, TINY.dit.text_dim)

    def sample(self, batch_size: int, generator: torch.Generator) -> LatentBatch:
        i = torch.randint(6, (batch_size,), generator=generator)
        return LatentBatch(self.latents[i], self.context[i], self.identity[i], None)


def test_lora_recipe_changes_only_the_identity_lora_and_gradients_reach_it_through_the_cache() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, _Source(), TrainConfig("lora", steps=3, batch_size=4, lr=1e-2, warmup=1))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("_loras." in k for k in changed)
    # up starts at zero, so only a gradient through the identity K/V can have moved it
    assert any(k.endswith("_loras.up.weight") for k in changed)


def test_base_recipe_leaves_the_lora_alone_and_demo_trains_everything() -> None:
    model = _model()
    base = select_trainable(model, "base")
    assert base and all(p.requires_grad for p in base)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "_loras." in n)
    assert len(select_trainable(model, "demo")) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="lora_rank"):
        select_trainable(_model(rank=0), "lora")


def test_reference_dropout_trains_those_examples_as_plain_text_to_video() -> None:
    model, src = _model(), _Source()
    batch = src.sample(4, torch.Generator().manual_seed(0))
    sigma, noise = torch.full((4,), 0.6), torch.randn(batch.latents.shape)
    with torch.no_grad():
        mixed = flow_matching_loss(model, batch, sigma, noise, use_identity=torch.tensor([1, 0, 1, 0]).bool())
        plain = flow_matching_loss(model, batch._replace(identity=None), sigma, noise)
        full = flow_matching_loss(model, batch, sigma, noise)
    torch.testing.assert_close(mixed[1::2], plain[1::2])
    torch.testing.assert_close(mixed[::2], full[::2])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients() -> None:
    src = _Source()
    batch = src.sample(3, torch.Generator().manual_seed(0))
    sigma, noise = torch.tensor([0.2, 0.5, 0.9]), torch.randn(batch.latents.shape)
    grads = []
    for ckpt in (False, True):
        model = _model()
        with torch.no_grad():  # a non-zero LoRA so that every path carries gradient
            for n, p in model.named_parameters():
                if n.endswith("up.weight"):
                    p.normal_(0, 0.1)
        loss = flow_matching_loss(model, batch, sigma, noise, gradient_checkpointing=ckpt).mean()
        loss.backward()
        # (the last layer's identity queries are never used: its q LoRA gets no gradient)
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys() and len(grads[0][1]) > 50
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_bfloat16_autocast_trains_with_float32_trainable_weights() -> None:
    model = _model().to(torch.bfloat16)
    stats = train(
        model, _Source(), TrainConfig("lora", 2, 2, 1e-3, warmup=1, dtype=torch.bfloat16, log_every=1)
    )
    assert np.isfinite(stats["loss"])
    lora = [p for n, p in model.named_parameters() if "_loras." in n]
    assert all(p.dtype == torch.float32 for p in lora)
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16


def test_tiny_synthetic_run_writes_a_loadable_model_and_is_reproducible(tmp_path: Path) -> None:
    sched = TinySchedule(
        clips_per_identity=1, vae_steps=2, vae_batch=2, base_steps=2, identity_steps=2, batch_size=4
    )
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    train_tiny("demo", first, schedule=sched)
    train_tiny("demo", second, schedule=sched)
    dit, vae, meta = load_tiny_weights(first, TINY)
    assert meta["recipe"] == "demo" and meta["video"] == "32x32x5"
    assert first.stat().st_size < 5 * 2**20
    assert not any(p.requires_grad for p in dit.parameters())
    # same seed, same machine: the same weights (the shipped file is regenerated this way)
    dit2, vae2, _ = load_tiny_weights(second, TINY)
    for a, b in ((dit, dit2), (vae, vae2)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name


def _write_clip_folder(folder: Path, count: int) -> None:
    folder.mkdir()
    ids = make_identities(count, seed=11)
    for i, ident in enumerate(ids):
        clip = render_clip(ident, seed=i, size=48)  # another size than the training size: resized
        (folder / f"clip{i}.mp4").write_bytes(encode_mp4(clip.video, fps=8))
        (folder / f"clip{i}.txt").write_text(clip.prompt)
        Image.fromarray(clip.reference).resize((64, 64)).save(folder / f"clip{i}.png")


@pytest.mark.distributed
def test_folder_training_data_parallel_over_two_gloo_ranks_writes_the_official_lora(tmp_path: Path) -> None:
    data, out = tmp_path / "clips", tmp_path / "run"
    _write_clip_folder(data, 3)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "standin.cli",
        "train",
        "--recipe",
        "lora",
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--lr",
        "1e-2",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A failed collective can hang: the timeout turns that into a failure.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((data / ".latents").glob("*/*.pt"))) == 3  # each clip encoded once, across ranks
    lora = read_torch_pickle(out / LORA_FILE, dtype=None)
    expected = {
        f"blocks.{i}.self_attn.{p}_loras.{w}.weight"
        for i in range(TINY.dit.num_layers)
        for p in "qkv"
        for w in ("down", "up")
    }
    assert set(lora) == expected
    assert not (out / "diffusion_pytorch_model.safetensors").exists()  # lora recipe: base untouched
    shipped, _, _ = load_tiny_weights(TINY_WEIGHTS, TINY)
    key = "blocks.0.self_attn.k_loras.up.weight"
    assert not torch.equal(lora[key][0], shipped.state_dict()[key])
