"""VACE through the pipeline and the CLI, and the tiny demonstration: the glyph follows its control.

The regression test generates held-out identities with their silhouette track as the control video
and without it (same prompt, reference and seed): the subject's centroid must follow the control
far better than the baseline does, while its colours stay the reference's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from standin.cli import main
from standin.errors import InvalidRequestError
from standin.pipeline import GenerationParams, StandInPipeline
from standin.presets import get_preset
from standin.training.vace_recipe import (
    centroid_error,
    follow_videos,
    held_out_clips,
    identity_colour_score,
    silhouette_contexts,
    silhouette_frames,
)
from standin.vace import TINY_VACE_WEIGHTS, VaceBranch
from standin.vace_conditioning import control_from_arrays, encode_control
from standin.vace_pipeline import generate_with_control
from standin.video import encode_mp4, read_mp4_info

FRAMES = 5


@pytest.fixture(scope="module")
def pipe() -> StandInPipeline:
    torch.set_num_threads(1)
    return StandInPipeline.from_preset("tiny", device="cpu")


def _control(n: int = 7, h: int = 40, w: int = 36) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _params(**kw) -> GenerationParams:
    return GenerationParams("moves left on navy", num_steps=2, **kw)


def test_the_tiny_preset_ships_its_vace_branch(pipe):
    assert TINY_VACE_WEIGHTS.stat().st_size <= 2 * 1024 * 1024
    assert isinstance(pipe.vace, VaceBranch) and pipe.vace.config == get_preset("tiny").vace


def test_size_and_frames_come_from_the_control_and_the_first_frame_is_dropped(pipe):
    control = control_from_arrays(_control(), first_frame=np.full((8, 8, 3), 200, np.uint8))
    video = generate_with_control(pipe, _params(), control, identity_image=None)
    assert video.shape == (1, 3, 5, 32, 32)  # 7 frames → 5; 40×36 → 32×32
    plain = generate_with_control(pipe, _params(), control_from_arrays(_control()))
    assert plain.shape == video.shape and not torch.allclose(plain, video)


def test_a_pipeline_without_vace_refuses_a_control_video(pipe):
    bare = StandInPipeline(pipe.dit, pipe.vae, pipe.text_encoder, pipe.preset)
    with pytest.raises(InvalidRequestError, match="no VACE branch"):
        generate_with_control(bare, _params(), control_from_arrays(_control()))


def test_the_recipe_encodes_silhouettes_like_the_pipeline(pipe):
    clip = held_out_clips(1)[0]
    batched = silhouette_contexts(pipe.vae, [clip])
    single = encode_control(pipe.vae, control_from_arrays(silhouette_frames(clip)))
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_cli_generates_from_a_control_video(tmp_path, pipe):
    ctrl = tmp_path / "ctrl.mp4"
    ctrl.write_bytes(encode_mp4(_control(10, 36, 52), fps=16))
    out = tmp_path / "out.mp4"
    code = main(["generate", "--prompt", "moves up on gray", "--control-video", str(ctrl), "--steps", "2",
                 "--vace-scale", "0.5", "-o", str(out)])
    assert code == 0
    info = read_mp4_info(out.read_bytes())
    assert (info.width, info.height, info.num_frames) == (48, 32, 9)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--width", "64"], "--width: with --control-video"),
        (["--vace-scale", "nan"], "vace_scale"),
        (["--preset", "wan2.1-t2v-14b"], "has no VACE branch"),
    ],
)
def test_cli_refuses_bad_control_options(tmp_path, capsys, extra, message):
    ctrl = tmp_path / "ctrl.mp4"
    ctrl.write_bytes(encode_mp4(_control(), fps=16))
    args = ["generate", "--prompt", "p", "--control-video", str(ctrl), "-o", str(tmp_path / "o.mp4")]
    code = main([*args, *extra])
    assert code == 2 and message in capsys.readouterr().err


def test_cli_bad_control_video_is_one_line_error(tmp_path, capsys):
    ctrl = tmp_path / "ctrl.mp4"
    ctrl.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    code = main(["generate", "--prompt", "p", "--control-video", str(ctrl), "-o", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err


@pytest.mark.slow
def test_the_glyph_follows_its_control_track_and_keeps_its_colours(pipe):
    clips = held_out_clips(12)
    controlled = follow_videos(pipe, clips, control=True)
    baseline = follow_videos(pipe, clips, control=False)
    err_control = np.mean([centroid_error(v, c) for v, c in zip(controlled, clips, strict=True)])
    err_base = np.mean([centroid_error(v, c) for v, c in zip(baseline, clips, strict=True)])
    colour_control = np.mean([identity_colour_score(v, c) for v, c in zip(controlled, clips, strict=True)])
    colour_base = np.mean([identity_colour_score(v, c) for v, c in zip(baseline, clips, strict=True)])
    assert err_control < 0.5 * err_base, (err_control, err_base)
    assert colour_control > 0.8 * colour_base, (colour_control, colour_base)
