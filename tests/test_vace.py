"""Specification of Wan2.1-VACE in the Stand-In DiT (standin/vace.py, standin/vace_conditioning.py).

The forward is checked against an independent float64 reference (tests/reference_vace.py):
hints from the VACE stack (before/after projections, the DiT's modulation, text and RoPE, no
identity) added after the listed blocks with the scale, while the identity branch runs as usual.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from standin.checkpoints import save_safetensors_shards
from standin.config import DiTConfig
from standin.dit import WanDiT
from standin.errors import CheckpointError, InvalidImageError, InvalidRequestError, InvalidVideoError
from standin.forward_plan import LOCAL, ForwardPlan
from standin.guidance import guided_velocity
from standin.presets import get_preset
from standin.vace import (
    WAN21_1_3B_VACE,
    WAN21_14B_VACE,
    VaceBranch,
    VaceConfig,
    VaceInputs,
    load_tiny_vace,
    load_vace_branch,
    load_vace_dit,
    save_tiny_vace,
    vace_call,
)
from standin.vace_conditioning import (
    control_from_arrays,
    control_from_bytes,
    control_noise,
    encode_control,
    fit_on_white,
    fold_mask,
)
from standin.vae import TINY_VAE, WanVAE
from standin.video import encode_mp4
from standin.video_input import VideoLimits
from tests.reference_dit import reference_forward
from tests.reference_vace import fold_mask_reference, reference_vace_forward

CFG = DiTConfig(dim=48, ffn_dim=96, num_heads=2, num_layers=4, text_dim=24, freq_dim=32, lora_rank=4)
VACE = VaceConfig(layers=(0, 2), in_dim=96)


def _models(seed: int = 0) -> tuple[WanDiT, VaceBranch]:
    torch.manual_seed(seed)
    dit, branch = WanDiT(CFG).eval(), VaceBranch(CFG, VACE).eval()
    for block in dit.blocks:  # make the identity LoRA matter
        for lora in (block.self_attn.q_loras, block.self_attn.k_loras, block.self_attn.v_loras):
            torch.nn.init.normal_(lora.up.weight, std=0.3)
    return dit, branch


def _inputs(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(batch, 16, 3, 4, 6, generator=g),
        "context": torch.randn(batch, 5, CFG.text_dim, generator=g),
        "vace": torch.randn(1, 96, 3, 4, 6, generator=g),
        "identity": torch.randn(1, 16, 1, 4, 4, generator=g),
        "t": torch.tensor([900.0, 250.0][:batch]),
    }


def _state(dit: WanDiT, branch: VaceBranch) -> dict[str, torch.Tensor]:
    return {**dit.state_dict(), **branch.state_dict()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).abs().max() / b.abs().max())


# -- the forward ------------------------------------------------------------------------------


@pytest.mark.parametrize("with_identity", [False, True])
def test_vace_forward_matches_float64_reference(with_identity):
    dit, branch = _models()
    x = _inputs()
    ident = dit.identity_cache(x["identity"], x["latents"].shape) if with_identity else None
    scale = 0.7
    with torch.no_grad():
        ours = vace_call(dit, branch, VaceInputs(x["vace"], scale), ident)(x["latents"], x["t"], x["context"])
    ref, hints = reference_vace_forward(
        _state(dit, branch), CFG, VACE.layers, x["latents"], x["t"], x["context"], x["vace"], scale,
        x["identity"] if with_identity else None,
    )
    assert _rel(ours, ref) < 1e-5
    # The hints must matter, or the equality would not show they are injected.
    plain, _ = reference_forward(_state(dit, branch), CFG, x["latents"], x["t"], x["context"],
                                 x["identity"] if with_identity else None)
    assert _rel(plain, ref) > 1e-2
    assert all(h.abs().max() > 1e-3 for h in hints)


def test_scale_zero_is_the_plain_forward_and_hints_scale_linearly_at_the_last_block():
    dit, branch = _models()
    x = _inputs()
    with torch.no_grad():
        plain = dit(x["latents"], x["t"], x["context"])
        zero = vace_call(dit, branch, VaceInputs(x["vace"], 0.0))(x["latents"], x["t"], x["context"])
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)


def test_identity_tokens_stay_out_of_the_vace_blocks():
    """The hints are the same with and without an identity: VACE blocks never see it."""
    dit, branch = _models()
    x = _inputs()
    seen = []

    def spy(fn, *args):
        out = fn(*args)
        if getattr(fn, "__name__", "") == "hint":
            seen.append(out[1])
        return out

    for ident in (None, dit.identity_cache(x["identity"], x["latents"].shape)):
        with torch.no_grad():
            vace_call(dit, branch, VaceInputs(x["vace"], 1.0), ident, plan=ForwardPlan(run_block=spy))(
                x["latents"], x["t"], x["context"]
            )
    assert len(seen) == 2 * len(VACE.layers)
    for a, b in zip(seen[:2], seen[2:], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_every_call_computes_its_own_hints_and_modules_hold_no_request_state():
    dit, branch = _models()
    x = _inputs()
    before = {k: v.clone() for k, v in _state(dit, branch).items()}
    attrs = (set(vars(dit)), set(vars(branch)))
    call_a = vace_call(dit, branch, VaceInputs(x["vace"], 1.0))
    call_b = vace_call(dit, branch, VaceInputs(-x["vace"], 1.0))
    with torch.no_grad():
        a1 = call_a(x["latents"], x["t"], x["context"])
        b1 = call_b(x["latents"], x["t"], x["context"])
        a2 = call_a(x["latents"], x["t"], x["context"])
        neg = call_a(x["latents"], x["t"], -x["context"])  # a CFG pass with another prompt
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)
    assert _rel(a1, b1.double()) > 1e-3 and _rel(a1, neg.double()) > 1e-3
    assert (set(vars(dit)), set(vars(branch))) == attrs
    assert all(torch.equal(v, before[k]) for k, v in _state(dit, branch).items())


def test_batched_cfg_equals_two_passes_with_vace():
    dit, branch = _models()
    x = _inputs(batch=1)
    call = vace_call(dit, branch, VaceInputs(x["vace"], 0.8))
    neg = torch.randn(1, 5, CFG.text_dim)
    with torch.no_grad():
        sep = guided_velocity(call, x["latents"], x["t"], x["context"], neg, 5.0, "separate")
        bat = guided_velocity(call, x["latents"], x["t"], x["context"], neg, 5.0, "batched")
    torch.testing.assert_close(bat, sep, rtol=1e-5, atol=1e-5)


def test_vace_context_must_match_the_latents():
    dit, branch = _models()
    x = _inputs()
    for bad in (torch.randn(1, 95, 3, 4, 6), torch.randn(1, 96, 2, 4, 6), torch.randn(3, 96, 3, 4, 6)):
        with pytest.raises(InvalidRequestError):
            vace_call(dit, branch, VaceInputs(bad, 1.0))(x["latents"], x["t"], x["context"])
    for scale in (float("nan"), -1.0, 11.0, True, "1"):
        with pytest.raises(InvalidRequestError, match="vace_scale"):
            vace_call(dit, branch, VaceInputs(x["vace"], scale))(x["latents"], x["t"], x["context"])


def test_a_plan_with_its_own_hook_is_refused():
    dit, branch = _models()
    with pytest.raises(ValueError, match="after_block"):
        vace_call(dit, branch, VaceInputs(torch.zeros(1)), plan=ForwardPlan(after_block=lambda i, x: x))
    assert LOCAL.after_block is None


def test_official_configurations():
    assert WAN21_14B_VACE.layers == (0, 5, 10, 15, 20, 25, 30, 35) and WAN21_14B_VACE.in_dim == 96
    assert WAN21_1_3B_VACE.layers == tuple(range(0, 30, 2))
    assert get_preset("wan2.1-vace-14b").vace == WAN21_14B_VACE
    assert get_preset("wan2.1-vace-1.3b").vace == WAN21_1_3B_VACE
    with pytest.raises(ValueError):
        VaceConfig(layers=(1, 2))
    with pytest.raises(ValueError):
        VaceBranch(CFG, VaceConfig(layers=(0, 4)))


def test_vace_keys_are_the_official_names():
    with torch.device("meta"):
        branch = VaceBranch(CFG, VACE)
    keys = set(branch.state_dict())
    assert "vace_patch_embedding.weight" in keys and "vace_blocks.0.before_proj.weight" in keys
    assert "vace_blocks.1.after_proj.bias" in keys and "vace_blocks.1.before_proj.weight" not in keys
    assert "vace_blocks.1.norm3.weight" in keys and "vace_blocks.0.modulation" in keys
    assert not any("_loras." in k for k in keys)  # Stand-In's LoRA lives in the main blocks only
    assert branch.state_dict()["vace_patch_embedding.weight"].shape == (CFG.dim, 96, 1, 2, 2)


# -- strict loading -----------------------------------------------------------------------------


def _write_official(tmp_path, state: dict[str, torch.Tensor]) -> None:
    base = {k: v for k, v in state.items() if "_loras." not in k}
    save_safetensors_shards(base, tmp_path, 3, "diffusion_pytorch_model")
    torch.save({k: v for k, v in state.items() if "_loras." in k}, tmp_path / "standin.ckpt")


def test_loads_dit_and_vace_from_one_official_checkpoint(tmp_path):
    dit, branch = _models()
    _write_official(tmp_path, _state(dit, branch))
    got_dit, got_branch = load_vace_dit(
        tmp_path, CFG, VACE, lora_path=tmp_path / "standin.ckpt", dtype=torch.float32
    )
    for k, v in _state(dit, branch).items():
        assert torch.equal({**got_dit.state_dict(), **got_branch.state_dict()}[k], v), k


def test_the_branch_alone_loads_from_the_same_files(tmp_path):
    dit, branch = _models()
    _write_official(tmp_path, _state(dit, branch))
    alone = load_vace_branch(tmp_path, CFG, VACE, dtype=torch.float32)
    for k, v in branch.state_dict().items():
        assert torch.equal(alone.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="missing vace_"):
        load_vace_branch(tmp_path, CFG, VaceConfig(layers=(0, 2, 3)), dtype=torch.float32)
    dit_only, none = load_vace_dit(
        tmp_path, CFG, VACE, lora_path=tmp_path / "standin.ckpt", dtype=torch.float32, with_branch=False
    )
    assert none is None
    for k, v in dit.state_dict().items():
        assert torch.equal(dit_only.state_dict()[k], v), k


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("vace_blocks.1.after_proj.weight"), "missing vace_blocks.1.after_proj.weight"),
        (lambda s: s.pop("vace_patch_embedding.bias"), "missing vace_patch_embedding.bias"),
        (lambda s: s.update({"vace_blocks.2.after_proj.weight": torch.zeros(48, 48)}),
         "unexpected key vace_blocks.2.after_proj.weight"),
        (lambda s: s.update({"vace_blocks.1.before_proj.weight": torch.zeros(48, 48)}),
         "unexpected key vace_blocks.1.before_proj.weight"),
        (lambda s: s.update({"vace_patch_embedding.weight": torch.zeros(48, 16, 1, 2, 2)}),
         r"vace_patch_embedding.weight in .* has shape \(48, 16, 1, 2, 2\)"),
    ],
)
def test_strict_loading_names_the_bad_key(tmp_path, edit, message):
    dit, branch = _models()
    state = _state(dit, branch)
    edit(state)
    _write_official(tmp_path, state)
    with pytest.raises(CheckpointError, match=message):
        load_vace_dit(tmp_path, CFG, VACE, lora_path=tmp_path / "standin.ckpt", dtype=torch.float32)


def test_a_t2v_checkpoint_is_not_a_vace_checkpoint(tmp_path):
    dit, _ = _models()
    _write_official(tmp_path, dict(dit.state_dict()))
    with pytest.raises(CheckpointError, match="missing vace_"):
        load_vace_dit(tmp_path, CFG, VACE, lora_path=tmp_path / "standin.ckpt", dtype=torch.float32)


def test_tiny_vace_file_round_trip_and_strictness(tmp_path):
    _, branch = _models()
    path = tmp_path / "v.safetensors"
    save_tiny_vace(path, branch, {"recipe": "vace"})
    loaded, meta = load_tiny_vace(path, CFG, VACE)
    assert meta == {"recipe": "vace"}
    for k, v in branch.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.half().float())
    bad = {k: v for k, v in branch.state_dict().items() if k != "vace_blocks.0.before_proj.bias"}
    save_file(bad, str(path))
    with pytest.raises(CheckpointError, match="missing vace_blocks.0.before_proj.bias"):
        load_tiny_vace(path, CFG, VACE)


# -- conditioning ------------------------------------------------------------------------------


def test_mask_folding_matches_explicit_loops():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(9, 16, 24, generator=g, dtype=torch.float64)
    ours = fold_mask(mask[None], 3)[0]
    torch.testing.assert_close(ours, fold_mask_reference(mask, 3), rtol=0, atol=0)
    # channel p·8 + q at latent pixel (r, c) is pixel (8r + p, 8c + q) of the picked frame
    assert ours[3 * 8 + 5, 1, 1, 2] == mask[4, 8 + 3, 16 + 5]


def test_control_context_has_96_channels_and_the_first_frame_prepended():
    torch.manual_seed(0)
    vae = WanVAE(TINY_VAE).eval()
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (7, 20, 40, 3), dtype=np.uint8)  # → 5 frames, 16×32
    mask = np.zeros((7, 20, 40), np.uint8)
    mask[:, :10] = 255
    control = control_from_arrays(frames, mask)
    assert control.frames.shape == (5, 16, 32, 3) and control.mask.shape == (5, 16, 32)
    ctx = encode_control(vae, control)
    assert ctx.shape == (1, 96, 2, 2, 4)
    m = torch.from_numpy(control.mask)[None, :, None].permute(0, 2, 1, 3, 4)  # [1, 1, F, H, W]
    video = torch.from_numpy(control.frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    torch.testing.assert_close(ctx[:, :16], vae.encode(video * (1 - m)))
    torch.testing.assert_close(ctx[:, 16:32], vae.encode(video * m))
    torch.testing.assert_close(ctx[:, 32:], fold_mask(torch.from_numpy(control.mask)[None], 2))

    ref = rng.integers(0, 256, (20, 10, 3), dtype=np.uint8)
    with_ref = encode_control(vae, control_from_arrays(frames, mask, ref))
    assert with_ref.shape == (1, 96, 3, 2, 4)
    torch.testing.assert_close(with_ref[:, :, 1:], ctx)
    assert with_ref[:, 16:, 0].abs().max() == 0  # zero reactive channels and a zero mask frame
    fitted = fit_on_white(ref, 16, 32)
    assert fitted.shape == (16, 32, 3) and (fitted[:, :8] == 255).all()  # centred: white sides


def test_default_mask_is_all_ones():
    torch.manual_seed(0)
    vae = WanVAE(TINY_VAE).eval()
    frames = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    a = encode_control(vae, control_from_arrays(frames))
    b = encode_control(vae, control_from_arrays(frames, np.full((5, 16, 16), 255, np.uint8)))
    torch.testing.assert_close(a, b)
    assert (a[:, 32:] == 1).all()


def test_first_frame_noise_is_one_frame_longer_and_rotated():
    plain = control_noise(7, (1, 16, 3, 4, 6), with_first_frame=False)
    longer = control_noise(7, (1, 16, 3, 4, 6), with_first_frame=True)
    draw = torch.randn((1, 16, 4, 4, 6), generator=torch.Generator().manual_seed(7))
    assert longer.shape == (1, 16, 4, 4, 6)
    torch.testing.assert_close(longer[:, :, 0], draw[:, :, -1])
    torch.testing.assert_close(longer[:, :, 1:], draw[:, :, :-1])
    alone = torch.randn((1, 16, 3, 4, 6), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(plain, alone)


def _mp4(frames: int, h: int = 36, w: int = 52) -> bytes:
    rng = np.random.default_rng(frames)
    return encode_mp4(rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8), fps=16)


def test_control_video_decides_size_and_frame_count():
    control = control_from_bytes(_mp4(12), _mp4(12))
    assert control.frames.shape == (9, 32, 48, 3) and control.mask.shape == (9, 32, 48)
    assert control.mask.dtype == np.float32 and control.mask.min() >= 0 and control.mask.max() <= 1


@pytest.mark.parametrize(
    ("video", "mask", "image", "error", "message"),
    [
        (b"not a video", None, None, InvalidVideoError, None),
        (b"", None, None, InvalidVideoError, "empty"),
        ("big", None, None, InvalidVideoError, "frames"),
        ("ok", b"\x00" * 64, None, InvalidVideoError, "control mask"),
        ("ok", "short", None, InvalidVideoError, "mask video has 5 frames"),
        ("ok", "other size", None, InvalidVideoError, "same size"),
        ("ok", None, b"not an image", InvalidImageError, None),
        ("tiny", None, None, InvalidVideoError, "16"),
    ],
)
def test_bad_control_input_is_a_clean_error(video, mask, image, error, message):
    named = {"big": _mp4(20), "ok": _mp4(9), "short": _mp4(5), "other size": _mp4(9, 40, 52),
             "tiny": _mp4(5, 12, 40)}
    video = named.get(video, video)
    mask = named.get(mask, mask)
    with pytest.raises(error, match=message):
        control_from_bytes(video, mask, image, VideoLimits(max_frames=16))
