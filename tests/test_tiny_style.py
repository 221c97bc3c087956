"""The shipped tiny style LoRA (examples/tiny_palette_style.safetensors) on held-out identities,
end to end through the real sampler (identity cache built with the style, CFG with the style on
both passes): it visibly restyles the video, and the identity is still kept.

Measured when it was trained (32 held-out identities, seed 1, guidance 3, chance 1/32): the
style's background in 100 % of videos with it and 0 % without; identity top-1 retrieval 16 %
with the style against 19 % without. The thresholds leave room for other machines' rounding.
"""

from __future__ import annotations

import pytest
import torch

from standin.pipeline import StandInPipeline
from standin.styles import StyleLoRA
from standin.training.tiny_style import STYLE_FILE, style_report

# the identity may lose at most this much top-1 retrieval to the style (3 of 32 identities)
IDENTITY_MARGIN = 3 / 32


@pytest.fixture(scope="module")
def report() -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread beats two fighting over a loaded machine
    try:
        return style_report(StandInPipeline.from_preset("tiny", device="cpu"), STYLE_FILE, count=32)
    finally:
        torch.set_num_threads(before)


def test_the_shipped_style_is_a_small_kohya_file_on_cross_attention() -> None:
    info = StyleLoRA.load(STYLE_FILE, StandInPipeline.from_preset("tiny", device="cpu").dit).describe()
    assert info["bytes"] <= 1_000_000
    assert (info["format"], info["rank"], info["alpha"]) == ("kohya", 4, 4.0)
    assert info["layer_kinds"] == {"cross_attn": 8}


def test_the_style_redraws_the_background_in_its_palette(report: dict) -> None:
    assert report["style"]["style_background"] >= 0.8, report
    assert report["no_style"]["style_background"] <= 0.1, report
    assert report["no_style"]["prompted_background"] >= 0.8, report


def test_the_identity_is_kept_within_a_margin_of_no_style(report: dict) -> None:
    plain, styled = report["no_style"]["identity_top1"], report["style"]["identity_top1"]
    assert styled >= plain - IDENTITY_MARGIN, report
    assert styled >= 3 * report["chance"], report


def test_standin_train_recipe_style_writes_a_loadable_style(tmp_path) -> None:
    from standin.cli import main

    assert main(["train", "--recipe", "style", "--steps", "2", "--out", str(tmp_path)]) == 0
    path = tmp_path / STYLE_FILE.name
    info = StyleLoRA.load(path, StandInPipeline.from_preset("tiny", device="cpu").dit).describe()
    assert info["format"] == "kohya" and info["layers"] == 8
