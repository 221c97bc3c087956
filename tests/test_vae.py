"""The Wan2.1 causal VAE: shapes, causality, chunked == whole-sequence, tiling, loading."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from standin.errors import CheckpointError, InvalidRequestError
from standin.vae import (
    TINY_VAE,
    WAN21_LATENT_MEAN,
    WAN21_LATENT_STD,
    VAEConfig,
    WanVAE,
    load_wan_vae,
)

KEYS_FILE = Path(__file__).parent / "data" / "wan21_vae_keys.txt"
TINY = TINY_VAE


def random_weights(vae: WanVAE, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights drawn in key order from one generator (independent of module init), scaled so
    activations stay O(1); the zero-initialised attention projections become non-zero."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, p in vae.state_dict().items():
        noise = torch.randn(p.shape, generator=g)
        if key.endswith("gamma"):
            out[key] = 1.0 + 0.2 * noise
        elif key.endswith("bias"):
            out[key] = 0.02 * noise
        else:
            out[key] = noise / (p[0].numel() ** 0.5)
    return out


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    model = WanVAE(TINY).eval()
    model.load_state_dict(random_weights(model))
    return model


def video(f: int, h: int, w: int, seed: int = 1, b: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, f, h, w, generator=g) * 2 - 1


def stats() -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(WAN21_LATENT_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN21_LATENT_STD).view(1, -1, 1, 1, 1)
    return mean, std


@torch.no_grad()
def encode_whole_sequence(vae: WanVAE, x: torch.Tensor) -> torch.Tensor:
    """All frames in one pass: causal zero padding instead of the per-chunk cache."""
    mean, std = stats()
    mu = vae.conv1(vae.encoder(x))[:, :16]
    return (mu - mean) / std


@torch.no_grad()
def decode_whole_sequence(vae: WanVAE, z: torch.Tensor) -> torch.Tensor:
    mean, std = stats()
    return vae.decoder(vae.conv2(z * std + mean)).clamp(-1, 1)


def test_encode_decode_shapes(vae: WanVAE) -> None:
    z = vae.encode(video(9, 32, 48, b=2))
    assert z.shape == (2, 16, 3, 4, 6)
    assert z.dtype == torch.float32
    x = vae.decode(z)
    assert x.shape == (2, 3, 9, 32, 48)
    assert x.min() >= -1 and x.max() <= 1


def test_single_image_encodes_to_one_latent_frame(vae: WanVAE) -> None:
    image = video(1, 64, 64)
    z = vae.encode(image)
    assert z.shape == (1, 16, 1, 8, 8)
    torch.testing.assert_close(z, encode_whole_sequence(vae, image), rtol=1e-5, atol=1e-5)
    # An image is encoded exactly like the first frame of a video that starts with it.
    clip = torch.cat([image, video(4, 64, 64, seed=7)], dim=2)
    torch.testing.assert_close(vae.encode(clip)[:, :, :1], z, rtol=1e-5, atol=1e-5)


def test_encoder_is_causal(vae: WanVAE) -> None:
    x = video(13, 16, 16)
    y = x.clone()
    y[:, :, 5:] = video(8, 16, 16, seed=9)  # frames 5.. feed latent frames 2 and 3
    zx, zy = vae.encode(x), vae.encode(y)
    torch.testing.assert_close(zx[:, :, :2], zy[:, :, :2], rtol=0, atol=1e-6)
    assert (zx[:, :, 2:] - zy[:, :, 2:]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-3


def test_decoder_is_causal(vae: WanVAE) -> None:
    z = torch.randn(1, 16, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    z2 = z.clone()
    z2[:, :, 2] += 1.0  # latent frame 2 decodes to video frames 5..8
    x, x2 = vae.decode(z), vae.decode(z2)
    torch.testing.assert_close(x[:, :, :5], x2[:, :, :5], rtol=0, atol=1e-6)
    assert (x[:, :, 5:9] - x2[:, :, 5:9]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-3


def test_chunked_encode_equals_whole_sequence(vae: WanVAE) -> None:
    x = video(17, 24, 16)
    torch.testing.assert_close(vae.encode(x), encode_whole_sequence(vae, x), rtol=1e-5, atol=1e-5)


def test_chunked_decode_equals_whole_sequence(vae: WanVAE) -> None:
    z = torch.randn(2, 16, 5, 3, 5, generator=torch.Generator().manual_seed(3))
    whole = decode_whole_sequence(vae, z)
    assert (whole.abs() < 1).float().mean() > 0.5  # not saturated by the clamp
    torch.testing.assert_close(vae.decode(z), whole, rtol=1e-5, atol=1e-5)


def test_matches_official_wan21_implementation(vae: WanVAE) -> None:
    """Reference values computed by the official wan/modules/vae.py (fp32) with the same
    random_weights(seed=0) and inputs, outside this repository."""
    z = vae.encode(video(5, 16, 24, seed=4))
    x = vae.decode(z)
    assert z.abs().mean().item() == pytest.approx(OFFICIAL_LATENT_ABS_MEAN, rel=1e-4)
    assert x.abs().mean().item() == pytest.approx(OFFICIAL_VIDEO_ABS_MEAN, rel=1e-4)
    got_z = [z[0, c, t, i, j].item() for c, t, i, j in PROBES_Z]
    got_x = [x[0, c, t, i, j].item() for c, t, i, j in PROBES_X]
    assert got_z == pytest.approx(OFFICIAL_LATENT_PROBES, abs=1e-4)
    assert got_x == pytest.approx(OFFICIAL_VIDEO_PROBES, abs=1e-4)


PROBES_Z = [(0, 0, 0, 0), (3, 1, 1, 2), (9, 0, 1, 1), (15, 1, 0, 2)]
PROBES_X = [(0, 0, 0, 0), (0, 1, 6, 8), (2, 2, 9, 13), (0, 3, 15, 23), (1, 4, 8, 12)]
OFFICIAL_LATENT_ABS_MEAN = 0.2934524
OFFICIAL_VIDEO_ABS_MEAN = 0.3178722
OFFICIAL_LATENT_PROBES = [0.323116, 0.119058, -0.060512, 0.279727]
OFFICIAL_VIDEO_PROBES = [-0.080577, -0.354452, 0.075022, 0.081959, -0.671284]


def damped_vae(reach: float) -> WanVAE:
    """The test VAE with every off-centre spatial tap scaled by `reach` and attention off, so
    that a pixel depends mostly on the latents right under it (as a trained VAE's does, more or
    less); reach=0 makes decoding spatially pointwise."""
    model = WanVAE(TINY).eval()
    weights = random_weights(model)
    for key, w in weights.items():
        if key.endswith("proj.weight"):
            w.zero_()
        if w.ndim >= 4 and w.shape[-1] == 3:
            taps = torch.full(w.shape[-2:], reach)
            taps[1, 1] = 1.0
            w.mul_(taps)
    model.load_state_dict(weights)
    return model


def test_tiled_decode_blends_to_untiled() -> None:
    # Pointwise decoder: tiles (including the shifted last ones) must reassemble exactly.
    vae = damped_vae(0.0)
    z = torch.randn(1, 16, 2, 8, 11, generator=torch.Generator().manual_seed(5))
    full = vae.decode(z)
    for tile, overlap in [(6, 3), (4, 0)]:  # 2 x 3 tiles each; the last column is shifted
        tiled = vae.decode(z, tile_size=tile, tile_overlap=overlap)
        torch.testing.assert_close(tiled, full, rtol=0, atol=1e-6)


def test_tiled_decode_close_to_untiled() -> None:
    vae = damped_vae(0.05)
    z = torch.randn(1, 16, 2, 8, 11, generator=torch.Generator().manual_seed(5))
    full = vae.decode(z)
    assert full.std() > 0.1
    err = (vae.decode(z, tile_size=6, tile_overlap=3) - full).abs()
    assert err.mean() < 0.005 and err.max() < 0.2
    # Overlap + blending hides the tile borders that plain tiling shows.
    seams = (vae.decode(z, tile_size=4, tile_overlap=0) - full).abs()
    assert seams.mean() > 3 * err.mean()
    # A tile at least as big as the frame is the untiled decode.
    torch.testing.assert_close(vae.decode(z, tile_size=11), full, rtol=0, atol=1e-6)


def test_interleaved_decodes_do_not_share_state(vae: WanVAE) -> None:
    zs = [torch.randn(1, 16, 6, 4, 4, generator=torch.Generator().manual_seed(s)) for s in (6, 7)]
    expected = [vae.decode(z) for z in zs]
    results: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        results[i] = vae.decode(zs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        torch.testing.assert_close(results[i], expected[i], rtol=0, atol=1e-6)
    assert not any(isinstance(v, torch.Tensor) for v in vars(vae).values())


def test_state_dict_round_trip(vae: WanVAE, tmp_path: Path) -> None:
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(vae.state_dict(), path)
    loaded = load_wan_vae(path, dtype=torch.float32, device="cpu", config=TINY)
    assert not loaded.training
    for (k, a), (k2, b) in zip(vae.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    x = video(5, 16, 16)
    torch.testing.assert_close(loaded.encode(x), vae.encode(x), rtol=0, atol=1e-6)


def test_bfloat16_load_decodes_close_to_float32(vae: WanVAE, tmp_path: Path) -> None:
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(vae.state_dict(), path)
    loaded = load_wan_vae(path, dtype=torch.bfloat16, device="cpu", config=TINY)
    assert loaded.conv2.weight.dtype == torch.bfloat16
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    x16 = loaded.decode(z)
    assert x16.dtype == torch.float32
    assert (x16 - vae.decode(z)).abs().mean() < 0.05


def test_strict_load_names_missing_key_and_file(vae: WanVAE, tmp_path: Path) -> None:
    sd = vae.state_dict()
    del sd["decoder.upsamples.3.resample.1.weight"]
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(sd, path)
    key = r"decoder\.upsamples\.3\.resample\.1\.weight"
    with pytest.raises(CheckpointError, match=key + r".*Wan2\.1_VAE\.pth"):
        load_wan_vae(path, dtype=torch.float32, device="cpu", config=TINY)


def test_strict_load_names_misshaped_key(vae: WanVAE, tmp_path: Path) -> None:
    sd = vae.state_dict()
    sd["encoder.head.2.weight"] = torch.zeros(32, 16, 3, 3, 3)
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"encoder\.head\.2\.weight in Wan2\.1_VAE\.pth"):
        load_wan_vae(path, dtype=torch.float32, device="cpu", config=TINY)


def test_strict_load_rejects_unexpected_key(vae: WanVAE, tmp_path: Path) -> None:
    sd = vae.state_dict()
    sd["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"unexpected key decoder\.extra\.weight"):
        load_wan_vae(path, dtype=torch.float32, device="cpu", config=TINY)


def test_state_dict_matches_official_wan21_keys_and_shapes() -> None:
    expected = []
    for line in KEYS_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split()
            expected.append((name, tuple(int(s) for s in shape.split(","))))
    with torch.device("meta"):
        model = WanVAE(VAEConfig())
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 3, 8, 16, 16), r"1 \+ 4k"),
        ((1, 3, 5, 20, 16), "multiples of 8"),
        ((1, 4, 5, 16, 16), r"\[B, 3, F, H, W\]"),
        ((3, 5, 16, 16), r"\[B, 3, F, H, W\]"),
    ],
)
def test_encode_rejects_malformed_video(vae: WanVAE, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        vae.encode(torch.zeros(shape))


def test_decode_rejects_malformed_latents(vae: WanVAE) -> None:
    with pytest.raises(InvalidRequestError, match=r"\[B, 16, T, h, w\]"):
        vae.decode(torch.zeros(1, 8, 2, 4, 4))
    with pytest.raises(InvalidRequestError, match="tile_overlap"):
        vae.decode(torch.zeros(1, 16, 2, 4, 4), tile_size=4, tile_overlap=4)
