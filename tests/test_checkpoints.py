"""Loading the official DiT files: shards, single file, diffusers names, the Stand-In pickle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from standin.checkpoints import STANDIN_LORA_FILE, load_wan_dit, save_safetensors_shards
from standin.dit import keeps_float32
from standin.errors import CheckpointError
from tests.test_dit import CFG, assert_close, inputs, randomized

STEM = "diffusion_pytorch_model"


def write_official(model: torch.nn.Module, directory: Path, num_shards: int = 6) -> Path:
    """The released layout: base weights in safetensors shards, LoRA in a torch pickle."""
    sd = model.state_dict()
    base = {k: v for k, v in sd.items() if "_loras." not in k}
    lora = {k: v.clone() for k, v in sd.items() if "_loras." in k}
    save_safetensors_shards(base, directory, num_shards, STEM)
    torch.save(lora, directory / STANDIN_LORA_FILE)
    return directory / STANDIN_LORA_FILE


def outputs(model: torch.nn.Module) -> torch.Tensor:
    latents, t, ctx, face = inputs()
    with torch.no_grad():
        return model(latents, t, ctx, model.identity_cache(face, latents.shape))


def test_official_shards_and_standin_pickle_round_trip(tmp_path: Path) -> None:
    model = randomized()
    lora = write_official(model, tmp_path)
    assert len(list(tmp_path.glob(f"{STEM}-0000?-of-00006.safetensors"))) == 6
    loaded = load_wan_dit(tmp_path, CFG, lora_path=lora, dtype=torch.float32)
    assert all(p.device.type == "cpu" and not p.requires_grad for p in loaded.parameters())
    assert_close(outputs(loaded), outputs(model), rtol=1e-6)


def test_shards_without_index_and_a_single_file_load(tmp_path: Path) -> None:
    model = randomized()
    lora = write_official(model, tmp_path / "sharded", num_shards=2)
    (tmp_path / "sharded" / f"{STEM}.safetensors.index.json").unlink()
    torch.testing.assert_close(
        outputs(load_wan_dit(tmp_path / "sharded", CFG, lora_path=lora, dtype=torch.float32)),
        outputs(model),
    )
    single = tmp_path / "single.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if "_loras." not in k}, str(single))
    torch.testing.assert_close(
        outputs(load_wan_dit(single, CFG, lora_path=lora, dtype=torch.float32)), outputs(model)
    )


def test_loads_straight_into_the_requested_dtype(tmp_path: Path) -> None:
    model = randomized()
    lora = write_official(model, tmp_path)
    loaded = load_wan_dit(tmp_path, CFG, lora_path=lora, dtype=torch.bfloat16)
    # bf16 matmul weights; time embedding/projection, modulation, norms and head stay float32
    dtypes = {n: p.dtype for n, p in loaded.named_parameters()}
    assert {d for n, d in dtypes.items() if not keeps_float32(n)} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if keeps_float32(n)} == {torch.float32}
    assert any(keeps_float32(n) for n in dtypes) and not keeps_float32("blocks.0.self_attn.q.weight")
    assert_close(outputs(loaded), outputs(model), rtol=5e-2)


def test_without_standin_checkpoint_it_is_plain_wan(tmp_path: Path) -> None:
    model = randomized()
    write_official(model, tmp_path)
    loaded = load_wan_dit(tmp_path, CFG, dtype=torch.float32)
    assert loaded.config.lora_rank == 0
    latents, t, ctx, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(latents, t, ctx), model(latents, t, ctx))


# diffusers' names, written out independently of the loader's rename table.
def to_diffusers(key: str) -> str:
    top = {
        "text_embedding.0": "condition_embedder.text_embedder.linear_1",
        "text_embedding.2": "condition_embedder.text_embedder.linear_2",
        "time_embedding.0": "condition_embedder.time_embedder.linear_1",
        "time_embedding.2": "condition_embedder.time_embedder.linear_2",
        "time_projection.1": "condition_embedder.time_proj",
        "head.head": "proj_out",
    }
    if key == "head.modulation":
        return "scale_shift_table"
    for ours, theirs in top.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours) :]
    if key.startswith("blocks."):
        _, i, rest = key.split(".", 2)
        rest = (
            rest.replace("self_attn.o.", "attn1.to_out.0.")
            .replace("cross_attn.o.", "attn2.to_out.0.")
            .replace("self_attn.norm_", "attn1.norm_")
            .replace("cross_attn.norm_", "attn2.norm_")
            .replace("norm3.", "norm2.")
            .replace("ffn.0.", "ffn.net.0.proj.")
            .replace("ffn.2.", "ffn.net.2.")
            .replace("modulation", "scale_shift_table")
        )
        for m in "qkv":
            rest = rest.replace(f"self_attn.{m}.", f"attn1.to_{m}.")
            rest = rest.replace(f"cross_attn.{m}.", f"attn2.to_{m}.")
        return f"blocks.{i}.{rest}"
    return key


def test_diffusers_transformer_folder_loads(tmp_path: Path) -> None:
    model = randomized()
    lora = write_official(model, tmp_path / "official")
    base = load_file(str(tmp_path / "official" / f"{STEM}-00001-of-00006.safetensors"))
    for i in range(2, 7):
        base.update(load_file(str(tmp_path / "official" / f"{STEM}-0000{i}-of-00006.safetensors")))
    renamed = {to_diffusers(k): v for k, v in base.items()}
    assert "condition_embedder.time_proj.weight" in renamed and "blocks.0.attn1.to_out.0.weight" in renamed
    save_safetensors_shards(renamed, tmp_path / "transformer", 3, STEM)
    loaded = load_wan_dit(tmp_path / "transformer", CFG, lora_path=lora, dtype=torch.float32)
    assert_close(outputs(loaded), outputs(model), rtol=1e-6)
    # the checkpoint directory itself (what --checkpoint-dir names) finds its transformer/ folder
    from_dir = load_wan_dit(tmp_path, CFG, lora_path=lora, dtype=torch.float32)
    assert_close(outputs(from_dir), outputs(model), rtol=1e-6)


# -- strict loading -----------------------------------------------------------------------


def _rewrite_shard(directory: Path, edit) -> str:
    shard = directory / f"{STEM}-00002-of-00006.safetensors"
    sd = load_file(str(shard))
    edit(sd)
    save_file(sd, str(shard))
    return shard.name


def test_missing_key_names_key_and_files(tmp_path: Path) -> None:
    lora = write_official(randomized(), tmp_path)
    victim = {}

    def drop(sd):
        victim["key"] = next(iter(sd))
        del sd[victim["key"]]

    _rewrite_shard(tmp_path, drop)
    with pytest.raises(CheckpointError, match=rf"missing {victim.get('key', '')}.*00006\.safetensors"):
        load_wan_dit(tmp_path, CFG, lora_path=lora, dtype=torch.float32)


def test_unexpected_key_names_its_file(tmp_path: Path) -> None:
    lora = write_official(randomized(), tmp_path)
    name = _rewrite_shard(tmp_path, lambda sd: sd.update({"blocks.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=rf"unexpected key blocks\.0\.extra\.weight.*{name}"):
        load_wan_dit(tmp_path, CFG, lora_path=lora, dtype=torch.float32)


def test_misshaped_key_names_shapes_and_file(tmp_path: Path) -> None:
    lora = write_official(randomized(), tmp_path)
    keys = {}

    def reshape(sd):
        keys["k"] = k = next(k for k in sd if k.endswith(".weight") and sd[k].ndim == 2)
        sd[k] = sd[k][:, :-1].contiguous()

    name = _rewrite_shard(tmp_path, reshape)
    with pytest.raises(CheckpointError, match=rf"{keys.get('k', 'x')} in {name} has shape"):
        load_wan_dit(tmp_path, CFG, lora_path=lora, dtype=torch.float32)


def test_lora_checkpoint_for_another_model_is_rejected(tmp_path: Path) -> None:
    write_official(randomized(), tmp_path)
    torch.save({"blocks.0.self_attn.q_loras.down.weight": torch.zeros(128, CFG.dim)}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="shape|missing"):
        load_wan_dit(tmp_path, CFG, lora_path=tmp_path / "bad.ckpt", dtype=torch.float32)


def test_broken_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing DiT checkpoint"):
        load_wan_dit(tmp_path / "nope", CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model"):
        load_wan_dit(tmp_path / "empty", CFG)
    lora = write_official(randomized(), tmp_path / "ok")
    pointer = tmp_path / "ok" / f"{STEM}-00003-of-00006.safetensors"
    pointer.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    with pytest.raises(CheckpointError, match="git-lfs pointer.*00003"):
        load_wan_dit(tmp_path / "ok", CFG, lora_path=lora)
    pointer.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="cannot read.*00003"):
        load_wan_dit(tmp_path / "ok", CFG, lora_path=lora)
    write_official(randomized(), tmp_path / "ok2")
    (tmp_path / "ok2" / "garbage.ckpt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="garbage.ckpt"):
        load_wan_dit(tmp_path / "ok2", CFG, lora_path=tmp_path / "ok2" / "garbage.ckpt")
