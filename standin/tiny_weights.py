"""The tiny preset's shipped weights: one safetensors file holding its DiT and VAE.

`standin/weights/tiny.safetensors` is written by `standin train --recipe demo`
(standin/training/tiny_recipe.py) and read here, so inference never imports the trainer.
Keys are `dit.<official Wan2.1/Stand-In key>` and `vae.<official key>`, stored in fp16; the
file's metadata (`standin`, JSON) records how it was trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from standin.checkpoints import check_file, load_strict
from standin.dit import WanDiT
from standin.presets import ModelPreset
from standin.vae import WanVAE

__all__ = ["TINY_WEIGHTS", "load_tiny_weights", "save_tiny_weights"]

TINY_WEIGHTS = Path(__file__).resolve().parent / "weights" / "tiny.safetensors"


def save_tiny_weights(path: Path, dit: WanDiT, vae: WanVAE, metadata: dict) -> None:
    """One safetensors file, fp16: `dit.<official Wan2.1/Stand-In key>` and `vae.<official key>`."""
    tensors = {f"dit.{k}": v.detach().half().contiguous() for k, v in dit.state_dict().items()}
    tensors |= {f"vae.{k}": v.detach().half().contiguous() for k, v in vae.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"standin": json.dumps(metadata)})


def load_tiny_weights(path: Path, preset: ModelPreset) -> tuple[WanDiT, WanVAE, dict]:
    """The DiT and VAE of a `save_tiny_weights` file (float32, CPU), and its metadata."""
    check_file(path, "tiny preset weights")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = json.loads((f.metadata() or {}).get("standin", "{}"))
    with torch.device("meta"):
        dit, vae = WanDiT(preset.dit), WanVAE(preset.vae)
    for prefix, module in (("dit.", dit), ("vae.", vae)):
        part = {k[len(prefix) :]: (t.float(), path.name) for k, t in tensors.items() if k.startswith(prefix)}
        load_strict(module, part, expected_in=path.name)
    return dit.eval().requires_grad_(False), vae.eval().requires_grad_(False), metadata
