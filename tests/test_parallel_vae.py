"""Parallel VAE decode (parallel/vae_decode.py): every rank decodes a band of latent rows,
exchanging one halo row with each neighbour before every spatial layer and gathering the
middle attention's keys and values; the stacked bands equal the single-process decode.

Each world (2 and 3 gloo ranks) is spawned once per module with a hard deadline; its ranks
run every scenario in lockstep and the tests read their measurements. The VAE is TINY_VAE with
random weights (the attention projections non-zero, so attention across bands matters); the
latents have several frames, so the causal time cache carries band frames with their halos.
"""

from __future__ import annotations

import datetime

import pytest
import torch

from parallel.vae_decode import RowBands
from standin.errors import InvalidRequestError
from tests.distributed import run_ranks

TOLERANCE = 1e-5
SPAWN_DEADLINE_S = 150
FRAMES = 3  # latent frames: 9 video frames, the cache is used by two later chunks
WIDTH = 5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _vae():
    from standin.vae import TINY_VAE, WanVAE
    from tests.test_vae import random_weights

    vae = WanVAE(TINY_VAE).eval()
    vae.load_state_dict(random_weights(vae, seed=3))
    return vae


def _latents(rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, FRAMES, rows, WIDTH, generator=g)


# ---------------------------------------------------------------------------------------------
# Single-process checks
# ---------------------------------------------------------------------------------------------


def test_rows_are_cut_into_contiguous_bands_the_first_ones_one_row_taller():
    bands = RowBands(60, 8)
    assert bands.sizes == [8, 8, 8, 8, 7, 7, 7, 7]
    assert [bands.bounds(i) for i in (0, 4, 7)] == [(0, 8), (32, 39), (53, 60)]
    assert RowBands(3, 3).sizes == [1, 1, 1]


def test_fewer_rows_than_ranks_is_refused():
    with pytest.raises(InvalidRequestError, match="2 rows, fewer than the 3 ranks"):
        RowBands(2, 3)


def test_one_band_without_a_process_group_is_the_plain_decode():
    from parallel import Collectives, DeviceMesh, ParallelConfig, decode_bands

    vae, z = _vae(), _latents(3)
    comm = Collectives(DeviceMesh(ParallelConfig(), num_heads=1))
    assert _rel(decode_bands(vae, z, comm), vae.decode(z)) == 0.0


def test_the_attention_projection_is_not_zero():
    # Zero-initialised in the module: the random weights must make attention count.
    assert _vae().decoder.middle[1].proj.weight.abs().max() > 0


# ---------------------------------------------------------------------------------------------
# What the spawned ranks run
# ---------------------------------------------------------------------------------------------


def _band_local_attention(comm, bands):
    """A split whose attention sees only its own band: what the decode would be without the
    K/V gather (to show that the gather is what makes it exact)."""
    from parallel.vae_decode import BandExchange

    class BandLocalAttention(BandExchange):
        def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
            return x

    return BandLocalAttention(comm, bands)


@torch.no_grad()
def _decode_scenarios(world: int, comm) -> dict:
    from parallel.vae_decode import decode_bands

    vae = _vae()
    out: dict = {}
    # uneven bands, and one latent row per rank (the minimum)
    for rows in (2 * world + 1, world):
        z = _latents(rows, seed=rows)
        ref = vae.decode(z)
        comm.stats.reset()
        video = decode_bands(vae, z, comm)
        calls, sent = dict(comm.stats.calls), dict(comm.stats.bytes_sent)
        bands = RowBands(rows, world)
        start, stop = bands.bounds(comm.mesh.rank)
        band = decode_bands(vae, z, comm, gather=False)
        comm.stats.reset()
        at_root = decode_bands(vae, z, comm, root=0)  # the runner's way: only rank 0 receives
        root_calls, root_sent = dict(comm.stats.calls), dict(comm.stats.bytes_sent)
        local = vae.decode_frames(z[..., start:stop, :], split=_band_local_attention(comm, bands))
        out[f"rows{rows}"] = {
            "shape": list(video.shape),
            "ref_shape": list(ref.shape),
            "rel": _rel(video, ref),
            "band_rel": _rel(band, ref[..., start * 8 : stop * 8, :]),
            "root_rel": _rel(at_root, ref if comm.mesh.rank == 0 else ref[..., start * 8 : stop * 8, :]),
            "root_shape": list(at_root.shape),
            "root_gather_calls": root_calls.get("gather", 0),
            "root_gather_bytes": root_sent.get("gather", 0),
            "band_rows": band.shape[-2],
            "local_attention_rel": _rel(local, ref[..., start * 8 : stop * 8, :]),
            "halo_calls": calls["neighbour_exchange"],
            "halo_bytes": sent["neighbour_exchange"],
            "gather_calls": calls["all_gather"],
        }
    # bf16 (the VAE's parameter dtype): the same layers, coarser numbers
    bf16 = vae.to(torch.bfloat16)
    z = _latents(2 * world + 1)
    out["bf16_rel"] = _rel(decode_bands(bf16, z, comm), bf16.decode(z))
    return out


def _runner_scenarios(rank: int, world: int, comm) -> dict:
    from parallel import DenoiseRequest, SPRunner
    from standin.dit import WanDiT
    from standin.presets import dit_preset

    torch.manual_seed(0)
    model = WanDiT(dit_preset("tiny")).eval()
    vae = _vae()
    runner = SPRunner(model, comm, vae=vae)
    if rank != 0:
        runner.serve_forever()
        return {}
    cfg = model.config
    g = torch.Generator().manual_seed(7)
    # 4 latent rows: uneven over 3 ranks (2, 1, 1); the DiT's 2x2 patches need even rows
    lat = torch.randn(1, cfg.in_dim, FRAMES, 4, 6, generator=g)
    ctx = torch.randn(1, 7, cfg.text_dim, generator=g)
    neg = torch.randn(1, 5, cfg.text_dim, generator=g)

    def request(decode: bool, latents: torch.Tensor = lat, skip: int = 0) -> DenoiseRequest:
        return DenoiseRequest(latents, ctx, num_steps=2, negative_context=neg, guidance=3.0, decode=decode,
                              decode_skip=skip)

    out: dict = {}
    try:
        final = runner.generate(request(False))
        with torch.no_grad():
            reference = vae.decode(final)
        video = runner.generate(request(True))
        out["rel"] = _rel(video, reference)
        out["shape"] = list(video.shape)
        out["dtype"] = str(video.dtype)
        out["range"] = [float(video.min()), float(video.max())]
        # a leading conditioning frame (VACE's reference) is not decoded: the video of the rest
        with torch.no_grad():
            out["skip_rel"] = _rel(runner.generate(request(True, skip=1)), vae.decode(final[:, :, 1:]))
        refusals = {}
        try:
            SPRunner(model, comm).generate(request(True))  # rank 0 only: refused before sending
        except InvalidRequestError as exc:
            refusals["no_vae"] = str(exc)
        try:
            runner.generate(request(True, skip=FRAMES))
        except InvalidRequestError as exc:
            refusals["skip_all"] = str(exc)
        if world > 2:
            try:
                runner.generate(request(True, lat[..., :2, :]))
            except InvalidRequestError as exc:
                refusals["too_few_rows"] = str(exc)
        out["refusals"] = refusals
        # the group still serves after the refusals
        out["after_refusals_rel"] = _rel(runner.generate(request(True)), reference)
    finally:
        runner.shutdown()
    return out


def _rank_main(rank: int, world: int, init_method: str, cfg_degree: int) -> dict:
    from parallel import Collectives, DeviceMesh, ParallelConfig, init_distributed

    init_distributed(rank, world, init_method, timeout=datetime.timedelta(seconds=60))
    # The mesh of the runner test (tiny DiT: 2 heads); the decode uses all world ranks.
    mesh_config = ParallelConfig.for_world(world, num_heads=2, cfg=cfg_degree)
    comm = Collectives(DeviceMesh(mesh_config, num_heads=2))
    result = {"decode": _decode_scenarios(world, comm)}
    result["runner"] = _runner_scenarios(rank, world, comm)
    return result


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> list[dict]:
    # CFG 2: the two ranks run different CFG passes, yet both decode a band.
    return run_ranks(_rank_main, 2, tmp_path_factory.mktemp("vae2"), SPAWN_DEADLINE_S, 2)


@pytest.fixture(scope="module")
def world3(tmp_path_factory) -> list[dict]:
    return run_ranks(_rank_main, 3, tmp_path_factory.mktemp("vae3"), SPAWN_DEADLINE_S, 1)


@pytest.fixture(params=["world2", "world3"])
def world(request) -> list[dict]:
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------------------------
# The specification
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_parallel_decode_matches_single_process(world):
    n = len(world)
    for rows in (2 * n + 1, n):
        for rank, res in enumerate(world):
            case = res["decode"][f"rows{rows}"]
            assert case["shape"] == case["ref_shape"] == [2, 3, 1 + 4 * (FRAMES - 1), 8 * rows, 8 * WIDTH]
            assert case["rel"] <= TOLERANCE, (rows, rank, case["rel"])


@pytest.mark.slow
def test_gathering_to_one_rank_gives_it_the_video_and_the_others_only_their_band(world):
    n = len(world)
    for rows in (2 * n + 1, n):
        for rank, res in enumerate(world):
            case = res["decode"][f"rows{rows}"]
            assert case["root_rel"] <= TOLERANCE, (rows, rank, case["root_rel"])
            if rank == 0:
                assert case["root_shape"] == case["ref_shape"] and case["root_gather_bytes"] == 0
            else:  # one send of its (padded) band, nothing received
                assert case["root_shape"][-2] == case["band_rows"]
                assert case["root_gather_calls"] == 1 and case["root_gather_bytes"] > 0


@pytest.mark.slow
def test_each_rank_decodes_its_band_of_pixel_rows(world):
    n = len(world)
    for rows in (2 * n + 1, n):
        bands = RowBands(rows, n)
        for rank, res in enumerate(world):
            case = res["decode"][f"rows{rows}"]
            assert case["band_rows"] == 8 * bands.sizes[rank]
            assert case["band_rel"] <= TOLERANCE, (rows, rank, case["band_rel"])


@pytest.mark.slow
def test_without_the_kv_gather_the_bands_differ(world):
    """The attention block is global over the frame: band-local attention is visibly wrong."""
    for res in world:
        assert res["decode"][f"rows{2 * len(world) + 1}"]["local_attention_rel"] > 1e-3


@pytest.mark.slow
def test_halo_bytes_are_one_row_to_each_neighbour(world3):
    """The middle rank has two neighbours, the end ranks one: twice the halo bytes, the same calls."""
    for rows in (7, 3):
        cases = [res["decode"][f"rows{rows}"] for res in world3]
        assert len({c["halo_calls"] for c in cases}) == 1 and cases[0]["halo_calls"] > 0
        assert cases[1]["halo_bytes"] == 2 * cases[0]["halo_bytes"] == 2 * cases[2]["halo_bytes"]
        # one K/V gather per latent frame, one gather of the pixel bands
        assert all(c["gather_calls"] == FRAMES + 1 for c in cases)


@pytest.mark.slow
def test_bf16_parallel_decode_is_close_to_bf16_single_process(world):
    for res in world:
        assert res["decode"]["bf16_rel"] <= 5e-2


@pytest.mark.slow
def test_runner_decodes_on_every_rank_and_returns_the_video(world):
    out = world[0]["runner"]
    assert out["shape"] == [1, 3, 1 + 4 * (FRAMES - 1), 32, 48]
    assert out["dtype"] == "torch.float32"
    assert out["range"][0] >= -1.0 and out["range"][1] <= 1.0
    assert out["rel"] <= TOLERANCE
    assert out["skip_rel"] <= TOLERANCE
    assert out["after_refusals_rel"] <= TOLERANCE


@pytest.mark.slow
def test_runner_refuses_decode_without_vae_or_with_fewer_rows_than_ranks(world2, world3):
    assert "needs a runner built with a vae" in world2[0]["runner"]["refusals"]["no_vae"]
    assert "decode_skip must be an int in [0, 3)" in world2[0]["runner"]["refusals"]["skip_all"]
    assert "fewer than the 3 ranks" in world3[0]["runner"]["refusals"]["too_few_rows"]


# ---------------------------------------------------------------------------------------------
# The benchmark (a smoke run: the numbers come from what ran, nothing asserts a speed)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_vae_decode_benchmark_writes_json_and_png(tmp_path):
    import json

    from benchmarks import vae_decode

    vae_decode.main(["--quick", "--out-dir", str(tmp_path), "--name", "vae"])
    saved = json.loads((tmp_path / "vae.json").read_text())
    assert (tmp_path / "vae.png").stat().st_size > 0
    rows = saved["measured"]["rows"]
    assert [r["ranks"] for r in rows] == [1, 1, 2]
    assert all(r["rel_error"] <= TOLERANCE for r in rows[1:])
    two = rows[2]["per_rank"]
    assert all(r["bytes_sent"]["neighbour_exchange"] > 0 for r in two)
    for size in saved["real_sizes"]:
        # the module-shape count and torch's counter agree; bands add only their halo rows
        assert abs(size["total_flop"] / size["torch_flop_counter"] - 1) < 1e-3
        assert size["band_flop"] < size["total_flop"] / 8 * 1.2
    assert saved["decision"]
