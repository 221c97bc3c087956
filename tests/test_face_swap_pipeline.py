"""Face swap through the whole model side (issue 14): prepared input → SDEdit denoising (single
process and sequence parallel) → output at the input's size, frame count and fps; the CLI; and
the tiny demonstration (a glyph's subject swapped for another held-out glyph).

The schedule and start-latent formulas themselves are specified in tests/test_face_swap.py; here
they are checked where the pipeline uses them.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from parallel import Collectives, DenoiseRequest, DeviceMesh, ParallelConfig, SPRunner, init_distributed
from standin import cli
from standin.dit import WanDiT
from standin.errors import InvalidRequestError, InvalidVideoError
from standin.face import FaceConfig, FacePreprocessor
from standin.face_swap_request import (
    FaceSwapLatents,
    FaceSwapOptions,
    FaceSwapVideo,
    decode_mask_video,
    face_swap_denoise_inputs,
    face_swap_latents,
    face_swap_params,
    generate_face_swap,
    prepare_face_swap,
    video_to_tensor,
)
from standin.image_io import decode_image
from standin.pipeline import GenerationParams, StandInPipeline, initial_noise
from standin.presets import dit_preset, get_preset
from standin.sdedit import hard_latent_mask
from standin.training.face_swap_demo import PROMPT, demo_params, glyph_swap_case
from standin.training.synthetic import Clip, render_clip, render_reference
from standin.training.tiny_recipe import tiny_identities
from standin.video import decode_mp4, encode_mp4, read_mp4_info, to_uint8_frames
from standin.video_input import VideoLimits, probe_video
from tests.distributed import run_ranks
from tests.test_face_swap import official_sigmas


@pytest.fixture(scope="module")
def pipe() -> StandInPipeline:
    torch.set_num_threads(1)
    return StandInPipeline.from_preset("tiny", device="cpu")


def glyph_swap(pair: int = 0) -> tuple[FaceSwapVideo, np.ndarray, Clip]:
    """Held-out glyph 2k moving right on navy and held-out glyph 2k + 1's reference pasted into
    its subject mask (subject "object" with a supplied mask): the README's demonstration."""
    return glyph_swap_case(pair)


def params(**kw) -> GenerationParams:
    """The demonstration's params (8 steps, guidance 3, seed 1) with `kw` replaced."""
    return dataclasses.replace(demo_params(), **kw)


# ---------------------------------------------------------------------------------------------
# SDEdit through the pipeline
# ---------------------------------------------------------------------------------------------


def test_start_latents_and_schedule_are_the_official_formulas(pipe: StandInPipeline) -> None:
    video, _, _ = glyph_swap()
    p = face_swap_params(params(), video)
    assert (p.width, p.height, p.num_frames) == (32, 32, 5)
    lat = face_swap_latents(pipe.vae, p, FaceSwapOptions(0.85), video)
    x0 = pipe.vae.encode(video_to_tensor(video.frames))
    noise = initial_noise(p)
    torch.testing.assert_close(lat.input_latents, x0, rtol=0, atol=0)
    torch.testing.assert_close(lat.noise, noise, rtol=0, atol=0)
    sigma0 = 5 * 0.85 / (1 + 4 * 0.85)  # the shifted strength
    torch.testing.assert_close(lat.start, (1 - sigma0) * x0 + sigma0 * noise, rtol=0, atol=1e-6)
    inputs = face_swap_denoise_inputs(p, torch.zeros(1), None, None, lat)
    np.testing.assert_allclose(
        inputs.schedule.sigmas[:-1].double().numpy(), official_sigmas(8, 0.85, 5.0), atol=2e-7
    )
    assert inputs.start_latents is lat.start and inputs.after_step is None  # consistency off


def test_background_consistency_keeps_the_input_latents_exactly_outside_the_mask(
    pipe: StandInPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    video, reference, _ = glyph_swap()
    finals: list[torch.Tensor] = []
    decode = pipe.decode
    monkeypatch.setattr(pipe, "decode", lambda latents: finals.append(latents) or decode(latents))
    for consistency in (True, False):
        generate_face_swap(pipe, params(), video, reference, FaceSwapOptions(0.85, consistency))
    kept, free = finals
    p = face_swap_params(params(), video)
    x0 = face_swap_latents(pipe.vae, p, FaceSwapOptions(), video).input_latents
    face = hard_latent_mask(video.masks, tuple(x0.shape)).bool().expand_as(x0)
    assert 0 < int(face.sum()) < face.numel()
    assert torch.equal(kept[~face], x0[~face])  # exactly, not approximately
    assert not torch.equal(kept[face], x0[face])  # the face was re-generated
    assert not torch.equal(free[~face], x0[~face])  # without it, the background is re-generated too


def test_the_identity_cache_is_built_once_per_request(
    pipe: StandInPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    video, reference, _ = glyph_swap()
    built = []
    real = WanDiT.identity_cache

    def counting(self, *args, **kwargs):
        built.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(WanDiT, "identity_cache", counting)
    generate_face_swap(pipe, params(), video, reference, FaceSwapOptions(0.85, True))
    assert len(built) == 1


def test_invalid_options_are_refused_before_any_work() -> None:
    for bad in (0.0, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(InvalidRequestError, match="denoising_strength"):
            FaceSwapOptions(bad).validate()  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="background_consistency"):
        FaceSwapOptions(0.5, "yes").validate()  # type: ignore[arg-type]  # the official bug: any string is on


# ---------------------------------------------------------------------------------------------
# The tiny demonstration
# ---------------------------------------------------------------------------------------------


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(float) - b.astype(float)) ** 2).mean())
    return 10 * np.log10(255**2 / mse)


def test_glyph_swap_takes_the_references_colours_and_keeps_the_rest(pipe: StandInPipeline) -> None:
    """Eight held-out pairs, seed 1, 8 steps, guidance 3, strength 0.85: the subject region of the
    output is closer to the reference glyph's colour than to the input glyph's, and outside the
    mask the output stays close to the input (PSNR), much closer with background consistency.
    Measured on this machine: 6/8 pairs closer to the reference, mean margin 43 (RGB distance);
    PSNR outside the mask 23.6 dB with consistency, 16.1 dB without."""
    _, held = tiny_identities()
    margins, closer, kept, free = [], 0, [], []
    for pair in range(8):
        video, reference, clip = glyph_swap(pair)
        source, target = held[2 * pair], held[2 * pair + 1]
        outs = {}
        for on in (True, False):
            out = generate_face_swap(pipe, params(), video, reference, FaceSwapOptions(0.85, on))
            outs[on] = to_uint8_frames(out)
        inside = outs[True][clip.mask].astype(float).mean(axis=0)
        to_source = np.linalg.norm(inside - np.array(source.colour))
        to_target = np.linalg.norm(inside - np.array(target.colour))
        margins.append(to_source - to_target)
        closer += int(to_target < to_source)
        kept.append(psnr(outs[True][~clip.mask], clip.video[~clip.mask]))
        free.append(psnr(outs[False][~clip.mask], clip.video[~clip.mask]))
    assert closer >= 5, margins
    assert np.mean(margins) > 20, margins
    assert np.mean(kept) > 21.0, kept
    assert np.mean(kept) > np.mean(free) + 4.0, (kept, free)


# ---------------------------------------------------------------------------------------------
# Preparing the input: decode, shape, paste, masks
# ---------------------------------------------------------------------------------------------


def test_paste_into_mask_puts_the_reference_subject_in_the_mask_only() -> None:
    video, _, clip = glyph_swap()
    _, held = tiny_identities()
    assert (video.frames[~clip.mask] == clip.video[~clip.mask]).all()
    inside = video.frames[clip.mask].astype(float)
    # The reference's body colour fills much of the mask (a triangle stretched onto a circle's
    # box leaves some of the reference's white and band); the input glyph's colour is gone.
    assert (np.linalg.norm(inside - held[1].colour, axis=1) < 40).mean() > 0.3
    assert (np.linalg.norm(inside - held[0].colour, axis=1) < 40).mean() < 0.05


def back_and_forth(ident, num_frames: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A glyph moving right then back, `num_frames` long: frames uint8 [N, S, S, 3], masks bool."""
    clip = render_clip(ident, 3, size=size, num_frames=5, direction="right", background="navy")
    order = [*range(5), *range(4, -1, -1)] * (num_frames // 10 + 1)
    return clip.video[order[:num_frames]], clip.mask[order[:num_frames]]


def mp4(frames: np.ndarray, fps: float = 12.0) -> bytes:
    return encode_mp4(np.ascontiguousarray(frames), fps=fps, crf=0, preset="ultrafast")


def test_mask_video_is_cropped_like_the_video_and_must_match_it() -> None:
    mask = np.zeros((10, 36, 40, 3), np.uint8)
    mask[:, 10:20, 12:24] = 255
    got = decode_mask_video(mp4(mask), (9, 32, 32, 3))
    assert got.shape == (9, 32, 32) and got.dtype == np.uint8
    # centre crop: 2 rows off the top, 4 columns off the left
    assert (got[:, 8:18, 8:20] >= 192).all() and (got[:, :6] < 64).all()
    with pytest.raises(InvalidVideoError, match="must match the video"):
        decode_mask_video(mp4(mask[:, :32, :32]), (9, 48, 32, 3))
    with pytest.raises(InvalidVideoError, match="must match the video"):
        decode_mask_video(mp4(mask[:5]), (9, 32, 32, 3))
    with pytest.raises(InvalidVideoError, match="^mask video: "):
        decode_mask_video(b"not a video at all", (9, 32, 32, 3))


def test_prepare_keeps_the_largest_4k_plus_1_frames_the_cropped_size_and_the_fps() -> None:
    clip_frames, _ = back_and_forth(tiny_identities()[1][0], 12, size=48)
    frames = np.ascontiguousarray(clip_frames[:, 3:45, 1:47])  # 42 × 46 → 32 × 32 after the crop
    pre = FacePreprocessor(FaceConfig(subject="object"))
    image = decode_image(encode_png(render_reference(tiny_identities()[1][1], 64)))
    video, reference = prepare_face_swap(mp4(frames, fps=12.5), image, pre)
    assert (video.num_frames, video.height, video.width) == (9, 32, 32)
    assert video.fps == pytest.approx(12.5)
    assert video.mask_source == "none" and not video.masks.any()  # an object without a mask
    assert reference.to_array().shape == (512, 512, 3)


def encode_png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_a_real_face_video_takes_the_landmark_path() -> None:
    """The astronaut photo as a 5-frame "video" that pans, the camera man's face as the
    reference: every frame finds a face, the mask is the pasted alpha, the rest is untouched."""
    from PIL import Image

    faces = Path(__file__).parent / "data" / "faces"
    astronaut = np.asarray(Image.open(faces / "astronaut.jpg").convert("RGB").resize((256, 256)))
    frames = np.stack([np.roll(astronaut, 4 * k, axis=1) for k in range(5)])
    pre = FacePreprocessor(FaceConfig())
    image = decode_image((faces / "camera.png").read_bytes())
    video, _ = prepare_face_swap(mp4(frames, fps=16), image, pre)
    assert video.paths == ("landmarks",) * 5 and video.mask_source == "paste"
    assert all(m.max() == 255 for m in video.masks)
    outside = video.masks == 0
    decoded = decode_mp4(mp4(frames, fps=16))[: video.num_frames]
    assert (video.frames[outside] == decoded[outside]).all()  # untouched outside the face


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------


def test_cli_round_trip_with_a_real_mp4_and_mask(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, held = tiny_identities()
    clip_frames, clip_masks = back_and_forth(held[0], 10, size=48)
    frames = np.ascontiguousarray(clip_frames[:, 5:41, 4:44])  # 40 × 36 → 32 × 32
    masks = np.repeat((clip_masks[:, 5:41, 4:44].astype(np.uint8) * 255)[..., None], 3, axis=-1)
    (tmp_path / "in.mp4").write_bytes(mp4(frames, fps=12.0))
    (tmp_path / "mask.mp4").write_bytes(mp4(masks, fps=12.0))
    (tmp_path / "face.png").write_bytes(encode_png(render_reference(held[1], 64)))
    out = tmp_path / "out.mp4"
    argv = [
        "generate", "--prompt", PROMPT, "--image", str(tmp_path / "face.png"), "--subject", "object",
        "--video", str(tmp_path / "in.mp4"), "--mask", str(tmp_path / "mask.mp4"),
        "--denoising-strength", "0.7", "--background-consistency", "--steps", "4", "-o", str(out),
    ]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    info = read_mp4_info(out.read_bytes())
    assert (info.width, info.height, info.num_frames) == (32, 32, 9)
    assert info.fps == pytest.approx(12.0)


@pytest.mark.parametrize(
    ("video", "extra", "message"),
    [
        (b"\x00\x00\x00\x18ftypmp42 garbage", [], "^error: .*video"),
        (None, ["--width", "64"], "^error: --width: with --video the size"),
        (None, ["--denoising-strength", "0"], "^error: denoising_strength must be"),
    ],
)
def test_cli_bad_video_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, video: bytes | None, extra: list[str], message: str
) -> None:
    frames = np.zeros((5, 32, 32, 3), np.uint8)
    (tmp_path / "in.mp4").write_bytes(video if video is not None else mp4(frames))
    (tmp_path / "face.png").write_bytes(encode_png(np.full((32, 32, 3), 200, np.uint8)))
    argv = ["generate", "--prompt", PROMPT, "--image", str(tmp_path / "face.png"), "--subject", "object"]
    assert cli.main([*argv, "--video", str(tmp_path / "in.mp4"), *extra, "-o", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(message, err[0]), err


# ---------------------------------------------------------------------------------------------
# The SP runner carries the same request
# ---------------------------------------------------------------------------------------------


def random_model() -> WanDiT:
    torch.manual_seed(0)
    model = WanDiT(dit_preset("tiny")).eval()
    for block in model.blocks:
        for lora in (block.self_attn.q_loras, block.self_attn.k_loras, block.self_attn.v_loras):
            torch.nn.init.normal_(lora.up.weight, std=0.5)
    return model


def swap_case(consistency: bool) -> tuple[GenerationParams, FaceSwapLatents, dict[str, torch.Tensor]]:
    """Random latents on a 3×4×6 grid (72 tokens), a random face mask, prompts and identity."""
    g = torch.Generator().manual_seed(3)
    p = params(width=48, height=32, num_frames=9, num_steps=3, guidance_scale=5.0)
    x0 = torch.randn(p.latent_shape, generator=g)
    noise = initial_noise(p)
    strength = 0.6
    from standin.sdedit import sdedit_schedule, sdedit_start_latents

    start = sdedit_start_latents(sdedit_schedule(p.num_steps, strength, p.shift), x0, noise)
    mask = (torch.rand(1, 1, *x0.shape[2:], generator=g) > 0.5).float() if consistency else None
    lat = FaceSwapLatents(start, x0, noise, mask, strength)
    cond = {
        "context": torch.randn(1, 7, 32, generator=g),
        "negative": torch.randn(1, 5, 32, generator=g),
        "identity": torch.randn(1, 16, 1, 4, 4, generator=g),
    }
    return p, lat, cond


def single_process(model: WanDiT, p: GenerationParams, lat: FaceSwapLatents, cond: dict) -> torch.Tensor:
    pipeline = StandInPipeline(model, None, None, get_preset("tiny"))  # type: ignore[arg-type]  # DiT only
    inputs = face_swap_denoise_inputs(p, cond["context"], cond["negative"], cond["identity"], lat)
    return pipeline.denoise(inputs)


def sp_request(p: GenerationParams, lat: FaceSwapLatents, cond: dict) -> DenoiseRequest:
    return DenoiseRequest(
        context=cond["context"],
        negative_context=cond["negative"],
        identity_latents=cond["identity"],
        num_steps=p.num_steps,
        guidance=p.guidance_scale,
        shift=p.shift,
        **lat.denoise_request_fields(),
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("consistency", [True, False])
def test_one_rank_runner_equals_the_pipeline(consistency: bool) -> None:
    model = random_model()
    p, lat, cond = swap_case(consistency)
    runner = SPRunner(model, Collectives(DeviceMesh(ParallelConfig(), model.config.num_heads)))
    got = runner.generate(sp_request(p, lat, cond))
    assert rel(got, single_process(model, p, lat, cond)) <= 1e-6
    if consistency:
        outside = ~lat.hard_mask.bool().expand_as(got)
        assert torch.equal(got[outside], lat.input_latents[outside])


def test_runner_refuses_a_partial_background_request() -> None:
    model = random_model()
    p, lat, cond = swap_case(True)
    runner = SPRunner(model, Collectives(DeviceMesh(ParallelConfig(), model.config.num_heads)))
    request = sp_request(p, lat, cond)
    request.background_noise = None
    with pytest.raises(InvalidRequestError, match="needs background_latents, background_noise"):
        runner.generate(request)
    request = sp_request(p, lat, cond)
    request.background_mask = torch.ones(1, 1, 2, 2, 2)
    with pytest.raises(InvalidRequestError, match="does not fit latents"):
        runner.generate(request)
    request = sp_request(p, lat, cond)
    request.denoising_strength = 0.0
    with pytest.raises(InvalidRequestError, match="denoising_strength"):
        runner.generate(request)


SPAWN_DEADLINE_S = 100


def _rank_main(rank: int, world: int, init_method: str) -> dict:
    init_distributed(rank, world, init_method, timeout=datetime.timedelta(seconds=60))
    model = random_model()
    result: dict = {}
    for name, config in (("ulysses2", ParallelConfig(ulysses=2)), ("cfg2", ParallelConfig(cfg=2))):
        runner = SPRunner(model, Collectives(DeviceMesh(config, model.config.num_heads)))
        for consistency in (True, False):
            p, lat, cond = swap_case(consistency)
            key = f"{name}/{'consistency' if consistency else 'plain'}"
            if rank == 0:
                got = runner.generate(sp_request(p, lat, cond))
                res = {"err": rel(got, single_process(model, p, lat, cond))}
                if consistency:
                    outside = ~lat.hard_mask.bool().expand_as(got)
                    res["outside_exact"] = bool(torch.equal(got[outside], lat.input_latents[outside]))
                result[key] = res
            else:
                runner.serve_one()
        if rank == 0:
            runner.shutdown()
        else:
            runner.serve_forever()
    return result


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_sequence_parallel_face_swap_equals_single_process(tmp_path: Path) -> None:
    """Two gloo ranks (Ulysses 2, then CFG-parallel 2), each in its own process with a hard
    deadline: the runner's result equals the single-process pipeline's, and with background
    consistency the latents outside the mask are the input latents exactly."""
    got = run_ranks(_rank_main, 2, tmp_path, SPAWN_DEADLINE_S)[0]
    assert set(got) == {"ulysses2/consistency", "ulysses2/plain", "cfg2/consistency", "cfg2/plain"}
    for key, res in got.items():
        assert res["err"] <= 1e-5, (key, res)
        if key.endswith("consistency"):
            assert res["outside_exact"], key


# ---------------------------------------------------------------------------------------------
# The cheap check a server makes when the upload arrives
# ---------------------------------------------------------------------------------------------


def test_probe_reads_the_header_and_refuses_what_the_limits_forbid_without_decoding() -> None:
    frames = np.zeros((9, 48, 64, 3), np.uint8)
    data = mp4(frames, fps=12.0)
    header = probe_video(data)
    assert (header.container, header.codec, header.width, header.height, header.frames) == (
        "mp4/mov", "h264", 64, 48, 9,
    )  # fmt: skip
    assert header.duration_s == pytest.approx(0.75, abs=0.1)
    with pytest.raises(InvalidVideoError, match="more than the limit of 8"):
        probe_video(data, VideoLimits(max_frames=8))
    with pytest.raises(InvalidVideoError, match="pixels per frame"):
        probe_video(data, VideoLimits(max_pixels_per_frame=64 * 47))
    with pytest.raises(InvalidVideoError, match="bytes, more than"):
        probe_video(data, VideoLimits(max_bytes=len(data) - 1))
    with pytest.raises(InvalidVideoError, match="playlists"):
        probe_video(b"#EXTM3U\nhttp://example.com/a.ts\n")
    with pytest.raises(InvalidVideoError):
        probe_video(data[:40])  # cut inside the header


def test_the_insightface_backend_pastes_with_scrfd_keypoints(tmp_path: Path) -> None:
    """antelopev2's SCRFD (here a constant SCRFD-shaped model: one face, always at the same
    place) gives the landmarks of both the reference and every frame."""
    from standin.face_detectors import SCRFD_FILE
    from standin.face_landmarks import ScrfdLandmarkDetector
    from standin.face_swap_request import landmark_detector_for
    from tests.test_face_swap import constant_scrfd

    constant_scrfd(tmp_path / SCRFD_FILE)
    pre = FacePreprocessor(FaceConfig(backend="insightface", model_dir=tmp_path))
    assert isinstance(landmark_detector_for(pre), ScrfdLandmarkDetector)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (5, 128, 160, 3), dtype=np.uint8)
    image = decode_image(encode_png(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)))
    video, _ = prepare_face_swap(mp4(frames, fps=16), image, pre)
    assert video.paths == ("landmarks",) * 5 and video.mask_source == "paste"
    assert all(m.max() > 128 for m in video.masks)
    assert landmark_detector_for(FacePreprocessor(FaceConfig(subject="object"))) is None
