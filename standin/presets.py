"""The one registry of named model presets: which DiT, VAE and text encoder, the generation
defaults that suit them, and the files a checkpoint directory holds. Every lookup by name
goes through `get_preset` (or `dit_preset`) and fails with `UnknownPresetError`."""

from __future__ import annotations

from dataclasses import dataclass, replace

from standin.config import TINY_DIT, WAN21_1_3B_DIT, WAN21_14B_DIT, DiTConfig
from standin.errors import UnknownPresetError
from standin.experts import ExpertLayout
from standin.text_encoder import TINY as TINY_TEXT
from standin.text_encoder import UMT5_XXL, TextEncoderConfig
from standin.vace import TINY_VACE, WAN21_1_3B_VACE, WAN21_14B_VACE, VaceConfig
from standin.vae import TINY_VAE, WAN21_VAE, VAEConfig

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
    # tiny: trained weights shipped in the package (standin/weights/); others: a checkpoint dir.
    needs_checkpoint: bool = True
    # side of the square reference image the identity branch was trained on (512: the paper's)
    reference_size: int = 512
    # two-expert models (Wan2.2 A14B): where the high/low-noise DiTs live and when each runs;
    # None: one DiT (Wan2.1). `dit` is then the architecture of both experts.
    experts: ExpertLayout | None = None
    # Wan2.1-VACE: the control branch (standin/vace.py) in the same checkpoint; None: no control
    vace: VaceConfig | None = None


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        "tiny",
        TINY_DIT,
        # one residual block per stage: the tiny VAE is fitted on a CPU in minutes (tiny_recipe.py)
        replace(TINY_VAE, num_res_blocks=1),
        # tiny prompts are a closed vocabulary of a few words: 32 tokens keep training cheap
        replace(TINY_TEXT, text_len=32),
        # what the shipped weights were trained on (standin/training/tiny_recipe.py)
        width=32,
        height=32,
        num_frames=5,
        num_steps=8,
        needs_checkpoint=False,
        reference_size=32,
        # VACE blocks trained on the glyph clips (standin/weights/tiny_vace.safetensors)
        vace=TINY_VACE,
    ),
    **{
        name: ModelPreset(name, dit, WAN21_VAE, UMT5_XXL, width=832, height=480, num_frames=81, num_steps=20)
        for name, dit in (("wan2.1-t2v-1.3b", WAN21_1_3B_DIT), ("wan2.1-t2v-14b", WAN21_14B_DIT))
    },
    # Wan2.1-VACE: the T2V DiT plus `vace_*` keys in the same shards (standin/vace.py)
    **{
        name: ModelPreset(
            name, dit, WAN21_VAE, UMT5_XXL, width=832, height=480, num_frames=81, num_steps=20, vace=vace
        )
        for name, dit, vace in (
            ("wan2.1-vace-1.3b", WAN21_1_3B_DIT, WAN21_1_3B_VACE),
            ("wan2.1-vace-14b", WAN21_14B_DIT, WAN21_14B_VACE),
        )
    },
    # Wan2.2-T2V-A14B: two DiTs of the Wan2.1-14B architecture, the Wan2.1 VAE, the same umT5
    # (standin/wan22.py loads it; standin/experts.py samples it).
    "wan2.2-t2v-a14b": ModelPreset(
        "wan2.2-t2v-a14b", WAN21_14B_DIT, WAN21_VAE, UMT5_XXL, width=832, height=480, num_frames=81,
        num_steps=20, experts=ExpertLayout(),
    ),
}
# Two tiny experts (the trained tiny DiT and a deterministic sibling with its own identity LoRA,
# standin/wan22.py), so the two-expert path runs on a CPU. At 8 steps, shift 5: steps 0-3 high.
PRESETS["tiny-a14b"] = replace(PRESETS["tiny"], name="tiny-a14b", experts=ExpertLayout())


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def dit_preset(name: str) -> DiTConfig:
    """The DiT configuration of a named preset."""
    return get_preset(name).dit
