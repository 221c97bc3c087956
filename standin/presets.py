"""Named model presets: which DiT, VAE and text encoder, and the files a checkpoint dir holds."""

from __future__ import annotations

from dataclasses import dataclass

from standin.config import DiTConfig, dit_preset
from standin.text_encoder import TextEncoderConfig
from standin.vae import VAEConfig

# The official Wan2.1 checkpoint directory layout (and Stand-In's file beside it).
DIT_SHARDS = "diffusion_pytorch_model*.safetensors"
VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_FILE = "google/umt5-xxl/tokenizer.json"
STANDIN_FILE = "Stand-In_wan2.1_T2V_14B.ckpt"


@dataclass(frozen=True)
class ModelPreset:
    """A model family plus the generation defaults that suit it."""

    name: str
    dit: DiTConfig
    vae: VAEConfig
    text: TextEncoderConfig
    width: int
    height: int
    num_frames: int
    num_steps: int
    # tiny: deterministic random weights built in memory; others: a checkpoint directory.
    needs_checkpoint: bool = True


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        "tiny",
        dit_preset("tiny"),
        VAEConfig.from_name("tiny"),
        TextEncoderConfig.from_name("tiny"),
        width=128,
        height=128,
        num_frames=17,
        num_steps=8,
        needs_checkpoint=False,
    ),
    **{
        name: ModelPreset(
            name,
            dit_preset(name),
            VAEConfig.from_name("wan2.1"),
            TextEncoderConfig.from_name("umt5-xxl"),
            width=832,
            height=480,
            num_frames=81,
            num_steps=20,
        )
        for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b")
    },
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
