"""Opt-in step caching (standin/step_cache.py): off by default, exact at threshold 0, per request,
the same decisions on every sequence-parallel rank."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from parallel import Collectives, DenoiseRequest, DeviceMesh, ParallelConfig, SPRunner, init_distributed
from standin.dit import WanDiT
from standin.errors import InvalidRequestError
from standin.pipeline import DenoiseInputs, GenerationParams, StandInPipeline
from standin.presets import dit_preset
from standin.scheduler import FlowMatchSchedule
from standin.step_cache import FirstBlockCache, StepCache, make_step_cache, parse_step_cache
from tests.distributed import run_ranks
from tests.test_dit import inputs, randomized

SMALL = GenerationParams("a person waves", width=32, height=48, num_frames=5, num_steps=4, seed=7)


@pytest.fixture(scope="module")
def pipe() -> StandInPipeline:
    return StandInPipeline.from_preset("tiny", device="cpu")


def face(seed: int = 0, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _inputs(pipe: StandInPipeline, params: GenerationParams, image: np.ndarray | None) -> DenoiseInputs:
    ctx, neg = pipe.encode_prompts(params.prompt, params.negative_prompt)
    identity = pipe.encode_identity(image) if image is not None else None
    return DenoiseInputs.for_request(params, ctx, neg, identity)


class FullCalls:
    """Counts the DiT calls that ran block 1 (a skipped call stops after block 0)."""

    def __init__(self, model: WanDiT) -> None:
        self.count = 0
        self.handle = model.blocks[1].register_forward_hook(self._hook)

    def _hook(self, *args: object) -> None:
        self.count += 1


@torch.no_grad()
def _sample(model: WanDiT, cache: FirstBlockCache | None, steps: int = 4, seed: int = 1) -> torch.Tensor:
    """A small CFG sampling loop over `model` (two passes per step) with or without a cache."""
    latents, _, ctx, face_latents = inputs(seed)
    latents, ctx = latents[:1], ctx[:1]
    neg = -ctx
    identity = model.identity_cache(face_latents, latents.shape)
    schedule = FlowMatchSchedule(steps, shift=5.0)
    for i in range(steps):
        t = schedule.timestep(i).expand(1)
        if cache is None:
            pos, negv = model(latents, t, ctx, identity), model(latents, t, neg, identity)
        else:
            cache.begin_step(i)
            call = cache.call(model, identity)
            pos, negv = call(latents, t, ctx), call(latents, t, neg)
        latents = schedule.step(negv + 5.0 * (pos - negv), i, latents)
    return latents


# -- the setting ------------------------------------------------------------------------------


def test_cache_setting_is_validated_and_parsed() -> None:
    assert parse_step_cache("first_block:0.1") == StepCache("first_block", 0.1)
    assert parse_step_cache("first_block") == StepCache("first_block", 0.05)
    for bad in ("teacache:0.1", "first_block:-0.1", "first_block:2", "first_block:nan", "first_block:x"):
        with pytest.raises(InvalidRequestError, match="cache"):
            parse_step_cache(bad)
    with pytest.raises(InvalidRequestError, match="cache"):
        replace(SMALL, cache=StepCache("first_block", 5.0)).validate()
    assert SMALL.cache is None and make_step_cache(None) is None  # off by default


# -- exactness and the skip pattern ---------------------------------------------------------


def test_threshold_zero_is_bit_identical_to_no_cache(pipe: StandInPipeline) -> None:
    inp = _inputs(pipe, SMALL, face())
    off = pipe.denoise(inp)
    counter = FullCalls(pipe.dit)
    zero = pipe.denoise(replace(inp, cache=StepCache("first_block", 0.0)))
    counter.handle.remove()
    assert torch.equal(off, zero)
    assert counter.count == 2 * SMALL.num_steps  # every call ran every block


def test_huge_threshold_skips_every_call_after_the_first_of_each_pass() -> None:
    model = randomized()
    cache = FirstBlockCache(threshold=1e9)
    _sample(model, cache, steps=4)
    # Step 0: both passes run fully (nothing to compare with); then both passes always skip.
    assert cache.decisions == [[False, False], [True, True], [True, True], [True, True]]
    assert (cache.calls, cache.skipped) == (8, 6)


def test_a_skipped_call_with_unchanged_inputs_reproduces_the_full_call() -> None:
    model = randomized()
    latents, t, ctx, _ = inputs()
    cache = FirstBlockCache(threshold=1e-3)
    with torch.no_grad():
        full = model(latents, t, ctx)
        cache.begin_step(0)
        first = cache.call(model)(latents, t, ctx)
        cache.begin_step(1)
        again = cache.call(model)(latents, t, ctx)  # same inputs: distance 0 → skip
    assert cache.decisions == [[False], [True]] and cache.distances[1] == [0.0]
    torch.testing.assert_close(first, full, rtol=0, atol=0)
    torch.testing.assert_close(again, full, rtol=1e-5, atol=1e-5)  # x0 + (xN − x0) vs xN


def test_moderate_threshold_skips_some_calls_and_stays_close(pipe: StandInPipeline) -> None:
    params = replace(SMALL, num_steps=8)
    inp = _inputs(pipe, params, face())
    off = pipe.denoise(inp)
    counter = FullCalls(pipe.dit)
    cached = pipe.denoise(replace(inp, cache=StepCache("first_block", 0.2)))
    counter.handle.remove()
    assert 2 <= counter.count < 2 * params.num_steps
    assert (cached - off).abs().max() < 0.2 * off.abs().max()


def test_a_new_expert_starts_without_cached_residuals() -> None:
    model = randomized()
    cache = FirstBlockCache(threshold=1e9)
    latents, t, ctx, _ = inputs()
    with torch.no_grad():
        for i, expert in enumerate(["high", "high", "low", "low"]):
            cache.begin_step(i, expert)
            cache.call(model)(latents, t, ctx)
    assert cache.decisions == [[False], [True], [False], [True]]


# -- per request ----------------------------------------------------------------------------


def test_two_interleaved_requests_equal_each_alone() -> None:
    model = randomized()
    alone_a = _sample(model, FirstBlockCache(0.2), seed=1)
    alone_b = _sample(model, FirstBlockCache(0.2), seed=2)
    # Interleave the two requests call by call on the same model.
    a, b = FirstBlockCache(0.2), FirstBlockCache(0.2)
    la, _, ca, fa = inputs(1)
    lb, _, cb, fb = inputs(2)
    la, ca, lb, cb = la[:1], ca[:1], lb[:1], cb[:1]
    schedule = FlowMatchSchedule(4, shift=5.0)
    with torch.no_grad():
        ia, ib = model.identity_cache(fa, la.shape), model.identity_cache(fb, lb.shape)
        for i in range(4):
            t = schedule.timestep(i).expand(1)
            a.begin_step(i)
            b.begin_step(i)
            call_a, call_b = a.call(model, ia), b.call(model, ib)
            pa = call_a(la, t, ca)
            pb = call_b(lb, t, cb)
            na = call_a(la, t, -ca)
            nb = call_b(lb, t, -cb)
            la = schedule.step(na + 5.0 * (pa - na), i, la)
            lb = schedule.step(nb + 5.0 * (pb - nb), i, lb)
    assert torch.equal(la, alone_a) and torch.equal(lb, alone_b)


def test_a_request_inside_another_request_leaves_both_unchanged(pipe: StandInPipeline) -> None:
    setting = StepCache("first_block", 0.2)
    params = replace(SMALL, num_steps=6)
    inp_a = replace(_inputs(pipe, params, face(0)), cache=setting)
    inp_b = replace(_inputs(pipe, replace(params, seed=9), face(1)), cache=setting)
    alone_a, alone_b = pipe.denoise(inp_a), pipe.denoise(inp_b)
    nested: list[torch.Tensor] = []

    def progress(done: int, total: int) -> None:
        if done == 3:  # request B runs whole between A's steps 3 and 4
            nested.append(pipe.denoise(inp_b))

    assert torch.equal(pipe.denoise(inp_a, progress=progress), alone_a)
    assert torch.equal(nested[0], alone_b)


def test_vace_and_step_caching_are_refused_together() -> None:
    from standin.forward_plan import ForwardPlan

    cache = FirstBlockCache(0.1)
    with pytest.raises(InvalidRequestError, match="after_block"):
        cache.plan(3, ForwardPlan(after_block=lambda i, x: x))


# -- sequence parallelism -------------------------------------------------------------------


def _sp_rank(rank: int, world: int, init_method: str) -> dict:
    init_distributed(rank, world, init_method)
    torch.manual_seed(0)
    model = WanDiT(dit_preset("tiny")).eval()
    for block in model.blocks:
        for lora in (block.self_attn.q_loras, block.self_attn.k_loras, block.self_attn.v_loras):
            torch.nn.init.normal_(lora.up.weight, std=0.5)
    g = torch.Generator().manual_seed(1)
    request = DenoiseRequest(
        latents=torch.randn(1, 16, 3, 6, 10, generator=g),  # 45 tokens: padding on rank 1
        context=torch.randn(1, 7, model.config.text_dim, generator=g),
        negative_context=torch.randn(1, 5, model.config.text_dim, generator=g),
        identity_latents=torch.randn(1, 16, 1, 6, 6, generator=g),
        num_steps=6,
        guidance=5.0,
    )
    out: dict = {}
    for name, config in (("ulysses2", ParallelConfig(ulysses=2)), ("cfg2", ParallelConfig(cfg=2))):
        runner = SPRunner(model, Collectives(DeviceMesh(config, model.config.num_heads)))
        seen: list[FirstBlockCache] = []
        real = make_step_cache

        def spy(setting: StepCache | None, seen: list = seen, real=real) -> FirstBlockCache | None:
            state = real(setting)
            seen.append(state)
            return state

        import parallel.runner as runner_module

        runner_module.make_step_cache = spy
        for threshold in (0.0, 0.15):
            req = replace(request, cache=StepCache("first_block", threshold))
            latents = runner.generate(req) if rank == 0 else (runner.serve_one(), None)[1]
            out[f"{name}_{threshold}_decisions"] = seen[-1].decisions
            if rank == 0:
                out[f"{name}_{threshold}_latents"] = latents.flatten().tolist()
        runner_module.make_step_cache = real
        if rank == 0:
            runner.shutdown()
        else:
            runner.serve_forever()
    return out


@pytest.mark.distributed
def test_sequence_parallel_caching_decides_alike_and_matches_one_process(tmp_path: Path) -> None:
    ranks = run_ranks(_sp_rank, 2, tmp_path, 120)
    torch.manual_seed(0)
    model = WanDiT(dit_preset("tiny")).eval()
    for block in model.blocks:
        for lora in (block.self_attn.q_loras, block.self_attn.k_loras, block.self_attn.v_loras):
            torch.nn.init.normal_(lora.up.weight, std=0.5)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 3, 6, 10, generator=g)
    ctx = torch.randn(1, 7, model.config.text_dim, generator=g)
    neg = torch.randn(1, 5, model.config.text_dim, generator=g)
    face_latents = torch.randn(1, 16, 1, 6, 6, generator=g)
    for threshold in (0.0, 0.15):
        cache = FirstBlockCache(threshold)
        x = latents
        schedule = FlowMatchSchedule(6, shift=5.0)
        with torch.no_grad():
            identity = model.identity_cache(face_latents, x.shape)
            for i in range(6):
                t = schedule.timestep(i).expand(1)
                cache.begin_step(i)
                call = cache.call(model, identity)
                pos, negv = call(x, t, ctx), call(x, t, neg)
                x = schedule.step(negv + 5.0 * (pos - negv), i, x)
        for name in ("ulysses2", "cfg2"):
            key = f"{name}_{threshold}"
            # every rank takes the same decisions; with CFG-parallel each half holds its own pass
            assert ranks[0][f"{key}_decisions"] == ranks[1][f"{key}_decisions"] or name == "cfg2"
            if name == "ulysses2":
                assert ranks[0][f"{key}_decisions"] == cache.decisions
            else:
                assert [d[0] for d in cache.decisions] == [d[0] for d in ranks[0][f"{key}_decisions"]]
                assert [d[1] for d in cache.decisions] == [d[0] for d in ranks[1][f"{key}_decisions"]]
            sp = torch.tensor(ranks[0][f"{key}_latents"]).reshape(x.shape)
            assert float((sp - x).abs().max() / x.abs().max()) < 1e-5
        if threshold > 0:
            assert any(any(d) for d in cache.decisions), "the test threshold must skip something"


# -- the request field: CLI and HTTP API ----------------------------------------------------


def test_cli_cache_flag_reaches_the_request() -> None:
    from standin.cli import build_parser
    from standin.generate_args import generation_params

    parser = build_parser()[0]
    args = parser.parse_args(["generate", "--prompt", "p", "--preset", "tiny", "--cache", "first_block:0.1"])
    assert generation_params(args).cache == StepCache("first_block", 0.1)
    args = parser.parse_args(["generate", "--prompt", "p", "--preset", "tiny"])
    assert generation_params(args).cache is None
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--prompt", "p", "--cache", "first_block:7"])


def test_http_cache_field_is_validated_and_survives_the_job_round_trip() -> None:
    from serve_app.api import APIError, params_from_job, parse_video_request
    from serve_app.settings import ServeSettings

    settings = ServeSettings(max_width=256, max_height=256, max_frames=33, max_steps=10)
    as_json = parse_video_request(
        {"prompt": "hi", "cache": {"kind": "first_block", "threshold": 0.1}}, None, settings, form=False
    )
    as_form = parse_video_request(
        {"prompt": "hi", "seed": str(as_json.params.seed), "cache": '{"threshold": 0.1}'},
        None,
        settings,
        form=True,
    )
    assert as_json.params.cache == as_form.params.cache == StepCache("first_block", 0.1)
    assert params_from_job(as_json.to_job_request()) == as_json.params
    off = parse_video_request({"prompt": "hi", "cache": None}, None, settings, form=False)
    assert off.params.cache is None and params_from_job(off.to_job_request()).cache is None
    for bad, status in (
        ({"kind": "first_block", "threshold": 1.5}, 422),
        ({"kind": "first_block", "threshold": -0.1}, 422),
        ({"kind": "teacache"}, 422),
        ({"kind": "first_block", "threshold": True}, 400),
        ({"threshold": 0.1, "extra": 1}, 400),
        ([0.1], 400),
        ("{not json", 400),
    ):
        with pytest.raises(APIError) as err:
            parse_video_request({"prompt": "hi", "cache": bad}, None, settings, form=False)
        assert err.value.status == status and err.value.param == "cache", bad


@pytest.mark.slow
def test_the_step_cache_benchmark_runs_its_smoke_size(tmp_path: Path) -> None:
    from benchmarks.step_cache import main

    report = main(["--identities", "2", "--steps", "4", "--reps", "1", "--thresholds", "0,1", "--out-dir",
                   str(tmp_path)])
    rows = {r["threshold"]: r for r in report["results"]["rows"]}
    assert rows[0.0]["skipped_calls"] == 0 and rows[0.0]["identical_videos"] == 2
    assert rows[1.0]["skipped_calls"] > 0  # threshold 1: most calls after the first skip
    assert (tmp_path / "step_cache_tiny_cpu.png").stat().st_size > 0
