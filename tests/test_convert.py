"""One-time bf16 conversion of a checkpoint directory (standin/convert.py): loads to the same
bf16 model as the original, half the bytes, other files linked, never overwrites."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from standin.checkpoints import load_wan_dit, save_safetensors_shards
from standin.convert import convert_checkpoint
from standin.dit import WanDiT
from standin.errors import CheckpointError
from standin.presets import STANDIN_FILE, VAE_FILE, dit_preset


def _official_layout(root: Path) -> WanDiT:
    torch.manual_seed(0)
    model = WanDiT(dit_preset("tiny"))
    state = model.state_dict()
    lora = {k: v for k, v in state.items() if "_loras." in k}
    dit = {k: v for k, v in state.items() if k not in lora}
    save_safetensors_shards(dit, root, 3, "diffusion_pytorch_model")
    torch.save(lora, root / STANDIN_FILE)
    (root / VAE_FILE).write_bytes(b"vae weights")
    (root / "google" / "umt5-xxl").mkdir(parents=True)
    (root / "google" / "umt5-xxl" / "tokenizer.json").write_text("{}")
    return model


def test_converted_checkpoint_loads_the_same_bf16_model_from_half_the_bytes(tmp_path):
    src, dst = tmp_path / "official", tmp_path / "bf16"
    _official_layout(src)
    stats = convert_checkpoint(src, dst)
    config = dit_preset("tiny")
    original = load_wan_dit(src, config, lora_path=src / STANDIN_FILE, dtype=torch.bfloat16).state_dict()
    converted = load_wan_dit(dst, config, lora_path=dst / STANDIN_FILE, dtype=torch.bfloat16).state_dict()
    assert sorted(original) == sorted(converted)
    assert all(torch.equal(original[k], converted[k]) for k in original)
    shards = sorted(dst.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) == 3
    # bf16 except the parameters kept float32 (time embedding/projection, modulation, norms, head):
    # ≈ 0.63 of the bytes for the tiny preset, ≈ 0.51 for 14B
    assert sum(p.stat().st_size for p in shards) < 0.7 * sum(
        p.stat().st_size for p in src.glob("diffusion_pytorch_model-*.safetensors")
    )
    assert stats["bytes_written"] < stats["bytes_read"]
    # Everything else is linked, not copied.
    assert (dst / VAE_FILE).is_symlink() and (dst / VAE_FILE).read_bytes() == b"vae weights"
    assert (dst / "google" / "umt5-xxl" / "tokenizer.json").exists()
    assert not (tmp_path / "bf16.partial").exists()


def test_conversion_never_overwrites_and_needs_dit_shards(tmp_path):
    src = tmp_path / "official"
    _official_layout(src)
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="exists"):
        convert_checkpoint(src, tmp_path / "taken")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model"):
        convert_checkpoint(tmp_path / "empty", tmp_path / "out")
