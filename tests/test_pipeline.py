"""Single-process generation on the tiny preset: determinism, the identity cache, CFG, errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from standin.checkpoints import save_safetensors_shards
from standin.cli import main
from standin.errors import CancelledError, CheckpointError, InvalidRequestError
from standin.pipeline import (
    DenoiseInputs,
    GenerationParams,
    StandInPipeline,
    check_checkpoint_dir,
)
from standin.presets import get_preset
from standin.video import read_mp4_info

SMALL = GenerationParams("a person waves", width=32, height=48, num_frames=5, num_steps=3, seed=7)


@pytest.fixture(scope="module")
def pipe() -> StandInPipeline:
    p = StandInPipeline.from_preset("tiny", device="cpu")
    # Random LoRA `up` (zero in a fresh model) so the identity LoRA path is exercised.
    with torch.no_grad():
        for block in p.dit.blocks:
            for name in ("q_loras", "k_loras", "v_loras"):
                getattr(block.self_attn, name).up.weight.normal_(0, 0.2)
    return p


def face(seed: int = 0, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def denoise_inputs(
    pipe: StandInPipeline, params: GenerationParams, image: np.ndarray | None
) -> DenoiseInputs:
    ctx, neg = pipe.encode_prompts(params.prompt, params.negative_prompt)
    identity = pipe.encode_identity(image) if image is not None else None
    return DenoiseInputs.for_request(params, ctx, neg, identity)


def test_same_seed_same_frames_other_seed_other_frames(pipe: StandInPipeline) -> None:
    a = pipe.generate(SMALL, face())
    b = pipe.generate(SMALL, face())
    c = pipe.generate(replace(SMALL, seed=8), face())
    assert a.shape == (1, 3, 5, 48, 32)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_cached_identity_equals_rebuilding_it_every_call(pipe: StandInPipeline) -> None:
    inputs = denoise_inputs(pipe, SMALL, face())
    cached = pipe.denoise(inputs)
    uncached = pipe.denoise(inputs, reuse_identity_cache=False)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)


def test_batched_cfg_equals_two_passes(pipe: StandInPipeline) -> None:
    separate = pipe.denoise(denoise_inputs(pipe, SMALL, face()))
    batched = pipe.denoise(denoise_inputs(pipe, replace(SMALL, cfg_mode="batched"), face()))
    # fp32 GEMMs of batch 2 and batch 1 round differently (by ~1e-5 absolute after 8 steps,
    # depending on the threads' blocking): compare relative to the output's scale.
    err = (batched - separate).abs().max() / separate.abs().max()
    assert err <= 2e-5, f"relative error {err:.2e}"


def test_guidance_combines_the_two_predictions(pipe: StandInPipeline) -> None:
    # One step from sigma 1 to 0: x0 = noise - v, with v = neg + g (pos - neg).
    params = replace(SMALL, num_steps=1)
    inputs = denoise_inputs(pipe, params, face())
    cache = pipe.dit.identity_cache(inputs.identity_latents, inputs.noise.shape)
    t = inputs.schedule.timestep(0)
    with torch.no_grad():
        pos = pipe.dit(inputs.noise, t, inputs.context, cache)
        neg = pipe.dit(inputs.noise, t, inputs.negative_context, cache)
    expected = inputs.noise - (neg + 5.0 * (pos - neg))
    torch.testing.assert_close(pipe.denoise(inputs), expected, rtol=1e-5, atol=1e-5)


def test_the_face_changes_the_video_and_a_request_without_one_sees_none(pipe: StandInPipeline) -> None:
    fresh = StandInPipeline.from_preset("tiny", device="cpu")
    plain_fresh = fresh.generate(SMALL)
    with_face = pipe.generate(SMALL, face(1))
    other_face = pipe.generate(SMALL, face(2))
    assert not torch.allclose(with_face, other_face)
    # Same base weights (the random LoRA only acts on identity tokens): no face → plain Wan.
    torch.testing.assert_close(pipe.generate(SMALL), plain_fresh, rtol=0, atol=0)


def test_progress_is_reported_per_step_and_cancel_stops_between_steps(pipe: StandInPipeline) -> None:
    seen: list[tuple[int, int]] = []
    pipe.generate(SMALL, face(), progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    seen.clear()
    with pytest.raises(CancelledError, match="before step 3 of 3"):
        pipe.generate(
            SMALL, face(), progress=lambda i, n: seen.append((i, n)), should_cancel=lambda: len(seen) >= 2
        )
    assert len(seen) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": "  "}, "prompt must be a non-empty string"),
        ({"width": 100}, "width must be a multiple of 16"),
        ({"height": 0}, "height must be a multiple of 16"),
        ({"num_frames": 80}, "num_frames must be 4k\\+1"),
        ({"num_frames": 1000}, "num_frames must be 4k\\+1"),
        ({"num_steps": 0}, "num_steps must be an integer"),
        ({"num_steps": 2.5}, "num_steps must be an integer"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"shift": -1.0}, "shift"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"cfg_mode": "merged"}, "cfg_mode"),
        ({"negative_prompt": "x" * 20_001}, "negative_prompt is 20001 characters"),
    ],
)
def test_bad_parameters_raise_clear_errors(pipe: StandInPipeline, change: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        pipe.generate(replace(SMALL, **change))


def test_bad_identity_image_is_rejected(pipe: StandInPipeline) -> None:
    with pytest.raises(InvalidRequestError, match="uint8"):
        pipe.generate(SMALL, face().astype(np.float32))
    with pytest.raises(InvalidRequestError, match="multiples of 16"):
        pipe.generate(SMALL, face(size=50))


# -- loading a real-layout checkpoint directory ---------------------------------------------


def write_checkpoint_dir(directory: Path, pipe: StandInPipeline) -> None:
    """The official Wan2.1 + Stand-In file layout, holding the tiny pipeline's weights."""
    sd = pipe.dit.state_dict()
    save_safetensors_shards(
        {k: v for k, v in sd.items() if "_loras." not in k}, directory, 2, "diffusion_pytorch_model"
    )
    torch.save({k: v for k, v in sd.items() if "_loras." in k}, directory / "Stand-In_wan2.1_T2V_14B.ckpt")
    torch.save(pipe.vae.state_dict(), directory / "Wan2.1_VAE.pth")
    torch.save(pipe.text_encoder.model.state_dict(), directory / "models_t5_umt5-xxl-enc-bf16.pth")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "person": 4, "waves": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (directory / "google" / "umt5-xxl").mkdir(parents=True)
    tok.save(str(directory / "google" / "umt5-xxl" / "tokenizer.json"))


def test_checkpoint_directory_loads_into_a_working_pipeline(pipe: StandInPipeline, tmp_path: Path) -> None:
    write_checkpoint_dir(tmp_path, pipe)
    # a Wan2.1 T2V directory (tiny's VACE branch ships apart: a VACE preset would look for vace_* keys)
    preset = replace(get_preset("tiny"), needs_checkpoint=True, vace=None)
    loaded = StandInPipeline.from_preset(preset, tmp_path, device="cpu", dtype=torch.float32)
    assert not any(p.is_meta for p in loaded.dit.parameters())
    inputs = denoise_inputs(pipe, SMALL, face())
    torch.testing.assert_close(loaded.denoise(inputs), pipe.denoise(inputs), rtol=1e-5, atol=1e-6)
    video = loaded.generate(SMALL, face())
    assert video.shape == (1, 3, 5, 48, 32)


def test_missing_checkpoint_files_are_all_listed(tmp_path: Path) -> None:
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"x")
    with pytest.raises(CheckpointError) as err:
        check_checkpoint_dir(tmp_path, tmp_path / "Stand-In_wan2.1_T2V_14B.ckpt")
    text = str(err.value)
    for name in (
        "diffusion_pytorch_model",
        "models_t5_umt5-xxl-enc-bf16.pth",
        "tokenizer.json",
        "Stand-In_wan2.1_T2V_14B.ckpt",
    ):
        assert name in text
    assert "Wan2.1_VAE.pth" not in text
    with pytest.raises(CheckpointError, match="does not exist"):
        check_checkpoint_dir(tmp_path / "nope", None)


# -- the CLI ---------------------------------------------------------------------------------

FACE_PHOTO = Path(__file__).parent / "data" / "faces" / "astronaut.jpg"


def test_cli_generates_an_mp4_on_tiny(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "clip.mp4"
    argv = [
        "generate",
        "--image",
        str(FACE_PHOTO),
        "--prompt",
        "an astronaut waves",
        "-o",
        str(out),
        "--width",
        "48",
        "--height",
        "32",
        "--frames",
        "9",
        "--steps",
        "2",
        "--fps",
        "25",
    ]
    assert main(argv) == 0
    info = read_mp4_info(out.read_bytes())
    assert (info.num_frames, info.width, info.height, info.fps) == (9, 48, 32, 25.0)
    assert "wrote" in capsys.readouterr().out


def test_cli_reports_bad_input_and_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--prompt", "x", "--frames", "10", "-o", str(tmp_path / "a.mp4")]) == 2
    assert "num_frames must be 4k+1" in capsys.readouterr().err
    argv = ["generate", "--prompt", "x", "--preset", "wan2.1-t2v-14b", "--checkpoint-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "Wan2.1_VAE.pth" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    assert main(["generate", "--prompt", "x", "--image", str(bad), "-o", str(tmp_path / "b.mp4")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "b.mp4").exists()
