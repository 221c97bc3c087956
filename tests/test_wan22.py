"""Wan2.2 A14B with Stand-In: two experts, each with its own identity branch, one sampling loop.

The boundary rule on the real schedules, each expert's identity cache used only by that expert,
per-expert guidance and adapters, offloaded experts bit-identical to resident ones, strict
loading of both checkpoint layouts, the CLI on `tiny-a14b`, training one expert's timesteps, and
(distributed, own processes) the sequence-parallel runner equal to one process across the switch.
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from standin.checkpoints import save_safetensors_shards
from standin.config import TINY_DIT
from standin.dit import WanDiT, keeps_float32
from standin.errors import CheckpointError, InvalidRequestError
from standin.experts import (
    HIGH,
    LOW,
    SAMPLING_OPTIONS,
    ExpertRun,
    ExpertSet,
    OffloadedExperts,
    expert_adapters,
    expert_for_timestep,
    expert_per_step,
    expert_timestep_range,
)
from standin.pipeline import DenoiseInputs, GenerationParams, StandInPipeline
from standin.presets import T5_FILE, TOKENIZER_FILE, VAE_FILE, get_preset
from standin.scheduler import FlowMatchSchedule
from standin.wan22 import check_two_expert_dir, derive_low_expert, load_expert_dits, standin_paths
from tests.distributed import run_ranks

SMALL = GenerationParams("moves right on navy", width=32, height=32, num_frames=5, num_steps=8, seed=3)
STEM = "diffusion_pytorch_model"


def shifted_timesteps(num_steps: int, shift: float) -> list[float]:
    """The sampler's timesteps, written out independently: 1000 · shift·u / (1 + (shift−1)·u)."""
    us = [1 - i / num_steps for i in range(num_steps)]
    return [1000 * shift * u / (1 + (shift - 1) * u) for u in us]


# -- the boundary rule --------------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "shift", "high_steps"), [(20, 5.0, 9), (40, 12.0, 26), (8, 5.0, 4)])
def test_expert_per_step_follows_the_boundary_on_the_real_schedules(steps, shift, high_steps):
    # 20 steps, shift 5 (Stand-In): steps 0–8 high, 9–19 low. 40 steps, shift 12 (Wan2.2's
    # defaults): t_25 = 878.05 ≥ 875 > t_26 = 865.98, so steps 0–25 high, 26–39 low.
    expected = [HIGH if t >= 875 else LOW for t in shifted_timesteps(steps, shift)]
    assert expected == [HIGH] * high_steps + [LOW] * (steps - high_steps)
    assert expert_per_step(FlowMatchSchedule(steps, shift=shift), 0.875) == expected


def test_low_expert_runs_once_t_is_below_the_boundary():
    assert expert_for_timestep(875.0, 0.875) == HIGH
    assert expert_for_timestep(math.nextafter(875.0, 0), 0.875) == LOW
    assert expert_for_timestep(1000.0, None) == "base"
    assert expert_timestep_range(HIGH, 0.875)[0] == expert_timestep_range(LOW, 0.875)[1] == 875.0


def test_named_sampling_options():
    assert SAMPLING_OPTIONS["standin"] == replace(SAMPLING_OPTIONS["standin"], num_steps=20, shift=5.0)
    wan = SAMPLING_OPTIONS["wan2.2"]
    assert (wan.num_steps, wan.shift, wan.guidance_high, wan.guidance_low) == (40, 12.0, 4.0, 3.0)


# -- one request's experts, single process ------------------------------------------------------


@pytest.fixture(scope="module")
def pipe() -> StandInPipeline:
    return StandInPipeline.from_preset("tiny-a14b", device="cpu")


def face(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def inputs_for(pipe: StandInPipeline, params: GenerationParams = SMALL, image=None, adapters=None):
    ctx, neg = pipe.encode_prompts(params.prompt, params.negative_prompt)
    identity = pipe.encode_identity(face() if image is None else image)
    return DenoiseInputs.for_request(params, ctx, neg, identity, adapters=adapters)


class Spy:
    """Records, per expert model, the identity caches it builds and the ones its forwards get."""

    def __init__(self, models: dict[str, WanDiT]) -> None:
        self.built: dict[str, list[int]] = {name: [] for name in models}
        self.used: dict[str, list[int | None]] = {name: [] for name in models}
        self.adapters: dict[str, list[object]] = {name: [] for name in models}
        for name, model in models.items():
            self._wrap(name, model)

    def _wrap(self, name: str, model: WanDiT) -> None:
        build, forward = model.identity_cache, model.forward

        def identity_cache(*args, **kwargs):
            cache = build(*args, **kwargs)
            self.built[name].append(id(cache))
            return cache

        def spy_forward(latents, timestep, context, identity=None, adapters=None, **kwargs):
            self.used[name].append(None if identity is None else id(identity))
            self.adapters[name].append(adapters)
            return forward(latents, timestep, context, identity, adapters, **kwargs)

        model.identity_cache = identity_cache
        model.forward = spy_forward


def test_tiny_a14b_has_two_distinct_experts(pipe: StandInPipeline):
    experts = pipe.experts
    assert experts is not None and experts.boundary == 0.875 and experts.names == (HIGH, LOW)
    high, low = (experts.residency.activate(n) for n in (HIGH, LOW))
    hs, ls = high.state_dict(), low.state_dict()
    lora = [k for k in hs if "_loras." in k]
    # Every trained LoRA matrix differs (the last block's q LoRA is unused, so it stayed zero).
    assert lora and all(not torch.equal(hs[k], ls[k]) for k in lora if hs[k].any())
    assert all(torch.equal(hs[k], ls[k]) for k in hs if "_loras." not in k)
    again = derive_low_expert(high).state_dict()
    assert all(torch.equal(again[k], ls[k]) for k in ls)  # deterministic


def test_each_expert_builds_its_own_cache_and_only_it_uses_it():
    pipe = StandInPipeline.from_preset("tiny-a14b", device="cpu")
    models = {n: pipe.experts.residency.activate(n) for n in (HIGH, LOW)}
    spy = Spy(models)
    pipe.denoise(inputs_for(pipe))
    # 8 steps, shift 5: 4 high then 4 low, CFG as two passes each.
    assert [len(spy.used[n]) for n in (HIGH, LOW)] == [8, 8]
    assert len(spy.built[HIGH]) == len(spy.built[LOW]) == 1
    assert set(spy.used[HIGH]) == {spy.built[HIGH][0]}
    assert set(spy.used[LOW]) == {spy.built[LOW][0]}
    # A second request builds fresh caches: nothing carries over.
    pipe.denoise(inputs_for(pipe, image=face(1)))
    assert len(spy.built[HIGH]) == len(spy.built[LOW]) == 2
    assert set(spy.used[LOW][8:]) == {spy.built[LOW][1]}


def test_the_two_identity_caches_differ(pipe: StandInPipeline):
    inputs = inputs_for(pipe)
    shape = inputs.noise.shape
    caches = [
        pipe.experts.residency.activate(n).identity_cache(inputs.identity_latents, shape) for n in (HIGH, LOW)
    ]
    assert not torch.equal(caches[0].keys[0], caches[1].keys[0])


def test_per_expert_guidance_reaches_each_expert_step(pipe: StandInPipeline):
    schedule = FlowMatchSchedule(8, shift=5.0)
    run = ExpertRun(pipe.experts, schedule, lambda m, a: None, guidance=4.0, guidance_low=3.0)
    assert [run.step(i).guidance for i in range(8)] == [4.0] * 4 + [3.0] * 4
    assert run.identity_builds == [HIGH, LOW]
    # The low expert's scale changes only the low steps' output, through the whole pipeline.
    same = pipe.denoise(inputs_for(pipe, replace(SMALL, guidance_scale=4.0)))
    split = pipe.denoise(inputs_for(pipe, replace(SMALL, guidance_scale=4.0, guidance_scale_low=3.0)))
    assert not torch.equal(same, split)
    with pytest.raises(InvalidRequestError, match="guidance_scale_low"):
        replace(SMALL, guidance_scale_low=float("nan")).validate()


class Tag:
    """A do-nothing `LinearAdapters` (y unchanged) with a name, to see which expert gets which."""

    def __init__(self, name: str) -> None:
        self.name = name

    def linear(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y


def test_each_expert_gets_its_own_adapters():
    pipe = StandInPipeline.from_preset("tiny-a14b", device="cpu")
    spy = Spy({n: pipe.experts.residency.activate(n) for n in (HIGH, LOW)})
    high, low = Tag("high style"), Tag("low style")
    pipe.denoise(inputs_for(pipe, adapters={HIGH: high, LOW: low}))
    assert set(map(id, spy.adapters[HIGH])) == {id(high)}
    assert set(map(id, spy.adapters[LOW])) == {id(low)}
    # One adapters object (not a pair) applies to both experts.
    pipe.denoise(inputs_for(pipe, adapters=high))
    assert set(map(id, spy.adapters[LOW][8:])) == {id(high)}


def test_schedules_that_go_back_to_a_finished_expert_are_refused(pipe: StandInPipeline):
    schedule = FlowMatchSchedule(8, shift=5.0)
    run = ExpertRun(pipe.experts, schedule, lambda m, a: None, guidance=5.0)
    run.plan = [HIGH, LOW, HIGH, *run.plan[3:]]
    run.step(0)
    run.step(1)
    with pytest.raises(InvalidRequestError, match="back to the high expert"):
        run.step(2)


# -- where the experts live ----------------------------------------------------------------------


def test_offloaded_experts_give_bit_identical_output_to_resident_ones(pipe: StandInPipeline):
    offloaded = StandInPipeline.from_preset("tiny-a14b", device="cpu", expert_residency="offload")
    residency = offloaded.experts.residency
    assert isinstance(residency, OffloadedExperts)
    assert offloaded.dit is residency.slot
    for seed in (0, 1):  # two requests: the slot swaps to low and back to high for the next one
        params = replace(SMALL, seed=seed)
        expected = pipe.denoise(inputs_for(pipe, params, face(seed)))
        got = offloaded.denoise(inputs_for(offloaded, params, face(seed)))
        assert torch.equal(got, expected)
    assert residency.swaps == 1 + 2 * 2  # the initial load, then low and high per request


def test_offloaded_bfloat16_experts_keep_their_dtype_and_stay_bit_identical():
    params = replace(SMALL, num_steps=4)
    resident = StandInPipeline.from_preset("tiny-a14b", device="cpu", dtype=torch.bfloat16)
    offloaded = StandInPipeline.from_preset(
        "tiny-a14b", device="cpu", dtype=torch.bfloat16, expert_residency="offload"
    )
    slot = offloaded.experts.residency.slot
    # not a float32 slot: bf16 matmul weights, float32 only where the official keeps it
    dtypes = {n: p.dtype for n, p in slot.named_parameters()}
    assert {d for n, d in dtypes.items() if not keeps_float32(n)} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if keeps_float32(n)} == {torch.float32}
    expected = resident.denoise(inputs_for(resident, params))
    assert torch.equal(offloaded.denoise(inputs_for(offloaded, params)), expected)


def test_offloaded_slot_copies_from_host_memory_not_from_the_experts():
    pipe = StandInPipeline.from_preset("tiny-a14b", device="cpu")
    high, low = (pipe.experts.residency.activate(n) for n in (HIGH, LOW))
    expected = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in ((HIGH, high), (LOW, low))}
    residency = OffloadedExperts({HIGH: high, LOW: low}, "cpu")
    with torch.no_grad():  # the originals may be freed or changed: the host copies are independent
        for p in list(high.parameters()) + list(low.parameters()):
            p.zero_()
    for name in (LOW, HIGH, LOW):
        slot = residency.activate(name).state_dict()
        assert all(torch.equal(slot[k], expected[name][k]) for k in slot)


def test_one_request_at_a_time_holds_the_offload_slot():
    pipe = StandInPipeline.from_preset("tiny-a14b", device="cpu", expert_residency="offload")
    experts: ExpertSet = pipe.experts
    entered = threading.Event()
    order: list[str] = []

    def second() -> None:
        with experts.request():
            order.append("second")

    with experts.request():
        thread = threading.Thread(target=second)
        thread.start()
        entered.wait(0.2)
        order.append("first done")
    thread.join(10)
    assert order == ["first done", "second"]


def test_unknown_residency_is_refused(pipe: StandInPipeline):
    high = pipe.experts.residency.activate(HIGH)
    with pytest.raises(ValueError, match="expert_residency"):
        ExpertSet.two(high, high, 0.875, "everywhere")  # type: ignore[arg-type]


# -- checkpoint layouts ---------------------------------------------------------------------------

TINY_A14B = replace(get_preset("wan2.2-t2v-a14b"), dit=TINY_DIT)


def random_expert(seed: int) -> WanDiT:
    torch.manual_seed(seed)
    model = WanDiT(TINY_DIT).eval()
    for name, p in model.named_parameters():
        if "_loras.up" in name:
            torch.nn.init.normal_(p, std=0.3)
    return model


def write_wan22(root: Path, layout: str = "official", shards: int = 6) -> dict[str, WanDiT]:
    """A tiny Wan2.2 directory: two experts' shards, Stand-In's two LoRA pickles, and the VAE /
    umT5 / tokenizer files (placeholders: only the experts are loaded from them here)."""
    experts = {HIGH: random_expert(1), LOW: random_expert(2)}
    dirs = {
        "official": ("high_noise_model", "low_noise_model"),
        "diffusers": ("transformer", "transformer_2"),
    }
    for (name, model), folder in zip(experts.items(), dirs[layout], strict=True):
        sd = model.state_dict()
        base = {k: v for k, v in sd.items() if "_loras." not in k}
        if layout == "diffusers":
            from tests.test_checkpoints import to_diffusers

            base = {to_diffusers(k): v for k, v in base.items()}
        save_safetensors_shards(base, root / folder, shards, STEM)
        torch.save(
            {k: v.clone() for k, v in sd.items() if "_loras." in k},
            root / f"Stand-In_wan2.2_T2V_A14B_{name}.ckpt",
        )
    for rel in (VAE_FILE, T5_FILE, TOKENIZER_FILE):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"placeholder")
    return experts


def load(root: Path, residency: str = "resident", **standin) -> ExpertSet:
    files = standin_paths(root, TINY_A14B.experts, standin.get(HIGH), standin.get(LOW))
    return load_expert_dits(
        root, TINY_A14B, standin=files, dtype=torch.float32, device=torch.device("cpu"), residency=residency
    )


def assert_same_weights(experts: ExpertSet, expected: dict[str, WanDiT]) -> None:
    for name, model in expected.items():
        got = experts.residency.activate(name).state_dict()
        want = model.state_dict()
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want), name


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_both_layouts_load_each_expert_with_its_own_standin_file(tmp_path: Path, layout: str):
    expected = write_wan22(tmp_path, layout)
    assert (
        len(
            list(
                (tmp_path / ("high_noise_model" if layout == "official" else "transformer")).glob(f"{STEM}-*")
            )
        )
        == 6
    )
    assert_same_weights(load(tmp_path), expected)
    assert_same_weights(load(tmp_path, "offload"), expected)


def test_standin_files_can_be_given_by_path(tmp_path: Path):
    expected = write_wan22(tmp_path)
    elsewhere = tmp_path / "mine"
    elsewhere.mkdir()
    for name in (HIGH, LOW):
        (tmp_path / f"Stand-In_wan2.2_T2V_A14B_{name}.ckpt").rename(elsewhere / f"{name}.ckpt")
    assert_same_weights(load(tmp_path, high=elsewhere / "high.ckpt", low=elsewhere / "low.ckpt"), expected)


def test_every_missing_file_is_named_in_one_error_before_anything_loads(tmp_path: Path):
    files = standin_paths(tmp_path, TINY_A14B.experts)
    with pytest.raises(CheckpointError) as err:
        check_two_expert_dir(tmp_path, TINY_A14B.experts, files)
    message = str(err.value)
    for part in (
        "high_noise_model/",
        "low_noise_model/",
        VAE_FILE,
        T5_FILE,
        TOKENIZER_FILE,
        "Stand-In_wan2.2_T2V_A14B_high.ckpt",
        "Stand-In_wan2.2_T2V_A14B_low.ckpt",
    ):
        assert part in message, (part, message)


def test_a_missing_shard_of_one_expert_is_named(tmp_path: Path):
    write_wan22(tmp_path)
    (tmp_path / "low_noise_model" / f"{STEM}-00004-of-00006.safetensors").unlink()
    (tmp_path / "Stand-In_wan2.2_T2V_A14B_high.ckpt").unlink()
    with pytest.raises(CheckpointError) as err:
        load(tmp_path)
    message = str(err.value)
    assert "low-noise expert" in message and "00004-of-00006" in message
    assert "Stand-In_wan2.2_T2V_A14B_high.ckpt" in message


def _edit_shard(root: Path, folder: str, edit) -> str:
    shard = root / folder / f"{STEM}-00002-of-00006.safetensors"
    sd = load_file(str(shard))
    edit(sd)
    save_file(sd, str(shard))
    return shard.name


def test_missing_extra_and_misshaped_keys_are_named_with_their_expert_and_file(tmp_path: Path):
    write_wan22(tmp_path)
    dropped = {}

    def drop(sd):
        dropped["key"] = next(iter(sd))
        del sd[dropped["key"]]

    _edit_shard(tmp_path, "high_noise_model", drop)
    with pytest.raises(
        CheckpointError, match=rf"high-noise expert.*missing {dropped['key']}.*00006\.safetensors"
    ):
        load(tmp_path)

    write_wan22(tmp_path)
    name = _edit_shard(
        tmp_path, "low_noise_model", lambda sd: sd.update({"blocks.0.extra.weight": torch.zeros(2)})
    )
    with pytest.raises(
        CheckpointError, match=rf"low-noise expert.*unexpected key blocks\.0\.extra\.weight.*{name}"
    ):
        load(tmp_path)

    write_wan22(tmp_path)
    lora_file = tmp_path / "Stand-In_wan2.2_T2V_A14B_low.ckpt"
    lora = torch.load(lora_file)
    key = "blocks.1.self_attn.k_loras.up.weight"
    lora[key] = lora[key][:, :-1].contiguous()
    torch.save(lora, lora_file)
    with pytest.raises(CheckpointError, match=rf"low-noise expert.*{key} in {lora_file.name} has shape"):
        load(tmp_path)


def test_a_one_dit_preset_is_not_loaded_as_two_experts(tmp_path: Path):
    with pytest.raises(CheckpointError, match="one DiT"):
        load_expert_dits(
            tmp_path,
            get_preset("wan2.1-t2v-14b"),
            standin=None,
            dtype=torch.float32,
            device=torch.device("cpu"),
        )


# -- the command line -----------------------------------------------------------------------------


def test_generate_tiny_a14b_from_the_cli(tmp_path: Path):
    from standin.cli import main
    from standin.video import read_mp4_info

    out = tmp_path / "two_experts.mp4"
    reference = Path(__file__).resolve().parents[1] / "examples" / "glyph_reference.png"
    argv = [
        "generate",
        "--preset",
        "tiny-a14b",
        "--prompt",
        "moves right on navy",
        "--image",
        str(reference),
        "--subject",
        "object",
        "--steps",
        "4",
        "--guidance",
        "3",
        "--guidance-low",
        "2",
        "--expert-residency",
        "offload",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    info = read_mp4_info(out.read_bytes())
    assert (info.num_frames, info.width, info.height) == (5, 32, 32)


def test_cli_sampling_option_sets_the_wan22_defaults():
    from standin.cli import build_parser, generation_params

    args = build_parser()[0].parse_args(
        ["generate", "--preset", "tiny-a14b", "--prompt", "x", "--sampling", "wan2.2"]
    )
    params = generation_params(args)
    assert (params.num_steps, params.shift, params.guidance_scale, params.guidance_scale_low) == (
        40,
        12.0,
        4.0,
        3.0,
    )
    args = build_parser()[0].parse_args(["generate", "--preset", "tiny-a14b", "--prompt", "x"])
    params = generation_params(args)
    assert (params.num_steps, params.shift, params.guidance_scale, params.guidance_scale_low) == (
        8,
        5.0,
        5.0,
        5.0,
    )
    args = build_parser()[0].parse_args(["generate", "--prompt", "x", "--sampling", "wan2.2", "--steps", "6"])
    with pytest.raises(SystemExit, match="two-expert"):
        generation_params(args)


# -- training one expert ----------------------------------------------------------------------


def test_training_draws_timesteps_from_one_experts_range():
    from standin.training.trainer import sample_sigmas

    gen = torch.Generator().manual_seed(0)
    high = sample_sigmas(4000, 5.0, gen, expert_timestep_range(HIGH, 0.875)) * 1000
    low = sample_sigmas(4000, 5.0, gen, expert_timestep_range(LOW, 0.875)) * 1000
    assert high.min() >= 875 and low.max() < 875
    assert high.max() > 990 and low.min() < 10  # each covers its whole range
    both = sample_sigmas(4000, 5.0, gen) * 1000
    assert both.min() < 875 <= both.max()


# -- sequence parallelism across the switch (own processes, gloo, hard deadline) ---------------

SPAWN_DEADLINE_S = 150
SP_TOLERANCE = 1e-5


def _sp_request(config, seed: int = 4):
    from parallel import DenoiseRequest

    g = torch.Generator().manual_seed(seed)
    return DenoiseRequest(
        latents=torch.randn(1, config.in_dim, 2, 6, 10, generator=g),  # 2×3×5 = 30 video tokens
        context=torch.randn(1, 7, config.text_dim, generator=g),
        negative_context=torch.randn(1, 5, config.text_dim, generator=g),
        identity_latents=torch.randn(1, config.in_dim, 1, 4, 4, generator=g),
        num_steps=8,
        guidance=4.0,
        guidance_low=3.0,
    )


@torch.no_grad()
def _reference_two_experts(models: dict[str, WanDiT], request) -> torch.Tensor:
    """One process, written out: expert by t ≥ 875, each expert's own cache, CFG, Euler."""
    schedule = FlowMatchSchedule(request.num_steps, shift=request.shift)
    latents = request.latents
    caches = {n: m.identity_cache(request.identity_latents, latents.shape) for n, m in models.items()}
    for i in range(request.num_steps):
        t = schedule.timestep(i)
        name, scale = (HIGH, request.guidance) if float(t) >= 875 else (LOW, request.guidance_low)
        model, cache = models[name], caches[name]
        pos = model(latents, t, request.context, cache)
        neg = model(latents, t, request.negative_context, cache)
        latents = schedule.step(neg + scale * (pos - neg), i, latents)
    return latents


def _sp_rank(rank: int, world: int, init_method: str) -> dict:
    import datetime

    from parallel import Collectives, DeviceMesh, ParallelConfig, SPRunner, init_distributed

    out: dict = {}
    init_distributed(rank, world, init_method, timeout=datetime.timedelta(seconds=60))
    pipe = StandInPipeline.from_preset("tiny-a14b", device="cpu")
    models = {n: pipe.experts.residency.activate(n) for n in (HIGH, LOW)}
    offload = ExpertSet.two(models[HIGH], models[LOW], 0.875, "offload", "cpu")
    request = _sp_request(models[HIGH].config)
    expected = _reference_two_experts(models, request)
    # Without the switch (the high expert alone), for the "switch matters" check.
    only_high = _reference_two_experts({HIGH: models[HIGH], LOW: models[HIGH]}, request)
    for label, config, experts in (
        ("ulysses2", ParallelConfig(ulysses=2), pipe.experts),
        ("cfg2", ParallelConfig(cfg=2), pipe.experts),
        ("ulysses2_offload", ParallelConfig(ulysses=2), offload),
    ):
        comm = Collectives(DeviceMesh(config, models[HIGH].config.num_heads))
        runner = SPRunner(experts.residency.activate(HIGH), comm, experts)
        if rank == 0:
            got = [runner.generate(request), runner.generate(request)]  # twice: nothing carries over
            runner.shutdown()
            out[label] = {
                "err": [float((g - expected).abs().max() / expected.abs().max()) for g in got],
                "repeat_equal": torch.equal(got[0], got[1]),
                "latents": got[0].flatten().tolist(),
            }
        else:
            runner.serve_forever()
    out["switch_effect"] = float((only_high - expected).abs().max() / expected.abs().max())
    out["offload_swaps"] = offload.residency.swaps
    return out


@pytest.fixture(scope="module")
def sp_world(tmp_path_factory) -> list[dict]:
    return run_ranks(_sp_rank, 2, tmp_path_factory.mktemp("wan22_sp"), SPAWN_DEADLINE_S)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mesh", ["ulysses2", "cfg2", "ulysses2_offload"])
def test_sequence_parallel_two_experts_match_one_process_across_the_switch(sp_world, mesh):
    res = sp_world[0][mesh]
    assert max(res["err"]) <= SP_TOLERANCE, res["err"]
    assert res["repeat_equal"]
    # The low expert must matter, or the equality would not prove the switch happened.
    assert sp_world[0]["switch_effect"] > 100 * SP_TOLERANCE


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_sequence_parallel_offload_is_bit_identical_to_resident(sp_world):
    assert sp_world[0]["ulysses2_offload"]["latents"] == sp_world[0]["ulysses2"]["latents"]
    # Per rank: the initial load, then low and back to high for each of the two requests.
    assert [r["offload_swaps"] for r in sp_world] == [5, 5]


@pytest.mark.slow
def test_standin_train_trains_one_expert_on_its_timesteps(tmp_path: Path, monkeypatch):
    import standin.training.trainer as trainer
    from standin.checkpoints import read_torch_pickle
    from standin.cli import main
    from tests.test_training import _write_clip_folder

    drawn: list[torch.Tensor] = []
    real = trainer.sample_sigmas

    def spy(*args, **kwargs):
        sigmas = real(*args, **kwargs)
        drawn.append(sigmas * 1000)
        return sigmas

    monkeypatch.setattr(trainer, "sample_sigmas", spy)
    data, out = tmp_path / "clips", tmp_path / "run"
    _write_clip_folder(data, 2)
    argv = ["train", "--recipe", "lora", "--preset", "tiny-a14b", "--expert", "low", "--data", str(data)]
    argv += ["--out", str(out), "--steps", "3", "--batch-size", "2", "--lr", "1e-2", "--device", "cpu"]
    assert main(argv) == 0
    timesteps = torch.cat(drawn)
    assert len(drawn) == 3 and timesteps.max() < 875
    lora = read_torch_pickle(out / "Stand-In_wan2.2_T2V_A14B_low.ckpt", dtype=None)
    low = StandInPipeline.from_preset("tiny-a14b", device="cpu").experts.residency.activate(LOW)
    key = "blocks.0.self_attn.k_loras.up.weight"
    assert set(lora) == {k for k in low.state_dict() if "_loras." in k}
    assert not torch.equal(lora[key][0], low.state_dict()[key])  # trained from the low expert on


def test_train_refuses_a_two_expert_preset_without_expert_and_expert_on_one_dit(tmp_path: Path):
    from standin.cli import main

    with pytest.raises(SystemExit, match="one expert at a time"):
        main(["train", "--recipe", "lora", "--preset", "tiny-a14b", "--data", str(tmp_path)])
    with pytest.raises(SystemExit, match="two-expert presets, not tiny"):
        main(["train", "--recipe", "lora", "--expert", "high", "--data", str(tmp_path)])


def test_memory_plan_keeps_both_experts_resident_when_they_fit_and_the_guide_shows_it():
    from benchmarks.wan22_plan import choose_residency, wan22_memory, wan22_table

    assert choose_residency("720p", 1, 80) == "offload"  # 81.3 GB with both experts
    assert choose_residency("480p", 8, 80) == "resident"
    assert all(choose_residency(s, sp, 141) == "resident" for s in ("480p", "720p") for sp in (1, 2, 4, 8))
    m = wan22_memory("480p", 8)
    assert m.total("resident") - m.total("offload") == pytest.approx(m.expert_weights)
    guide = (Path(__file__).resolve().parents[1] / "cluster" / "README.md").read_text()
    assert wan22_table() in guide


# -- serving ---------------------------------------------------------------------------------------


def test_gpu_wan22_profile_serves_the_two_expert_model_on_the_gpu_profiles_resources():
    import yaml

    from serve_app.launcher import PROFILES
    from serve_app.settings import ServeSettings, replicas_of

    config = yaml.safe_load(PROFILES["gpu-wan2.2"].read_text())
    app = config["applications"][0]
    settings = ServeSettings.from_args(app["args"], env={}, replicas=replicas_of(app["deployments"]))
    assert settings.preset == "wan2.2-t2v-a14b" and settings.model_name == "stand-in-wan2.2-t2v-a14b"
    assert settings.expert_residency == "resident" and settings.world_size == 8
    wan21 = yaml.safe_load(PROFILES["gpu"].read_text())["applications"][0]
    assert app["deployments"] == wan21["deployments"]  # same placement on one 8-GPU node


@pytest.mark.parametrize("residency", ["resident", "offload"])
def test_a_dit_rank_of_the_server_runs_both_experts_like_one_process(residency):
    from serve_app.dit import RankState
    from serve_app.settings import ServeSettings

    settings = ServeSettings.from_args(
        {"preset": "tiny-a14b", "device": "cpu", "dtype": "float32", "expert_residency": residency}, env={}
    )
    state = RankState(settings, 0, None)
    experts = state.runner.experts
    assert experts.is_pair and (residency == "offload") == isinstance(experts.residency, OffloadedExperts)
    request = _sp_request(state.runner.model.config)
    got = state.runner.generate(request)
    reference = StandInPipeline.from_preset("tiny-a14b", device="cpu").experts
    expected = _reference_two_experts({n: reference.residency.activate(n) for n in (HIGH, LOW)}, request)
    assert float((got - expected).abs().max() / expected.abs().max()) <= SP_TOLERANCE


def test_a_style_pair_from_the_cli_gives_each_expert_its_own_style(tmp_path: Path, monkeypatch):
    from standin.cli import main
    from standin.styles import StyleSet

    seen: list[object] = []
    real_generate = StandInPipeline.generate

    def spy(self, params, image=None, progress=None, should_cancel=None, styles=None):
        seen.append(styles)
        return real_generate(self, params, image, progress, should_cancel, styles=styles)

    monkeypatch.setattr(StandInPipeline, "generate", spy)
    style = Path(__file__).resolve().parents[1] / "examples" / "tiny_palette_style.safetensors"
    base = ["generate", "--preset", "tiny-a14b", "--prompt", "moves right on navy", "--steps", "2"]
    assert main([*base, "--lora-low", f"{style}:0.5", "-o", str(tmp_path / "a.mp4")]) == 0
    pair = seen[-1]
    assert isinstance(pair, dict) and pair[HIGH] is None and isinstance(pair[LOW], StyleSet)
    with pytest.raises(SystemExit, match="two-expert presets"):
        main(["generate", "--prompt", "x", "--lora-low", str(style), "-o", str(tmp_path / "b.mp4")])


def test_the_gpu_measurement_of_both_residencies_runs_its_smoke_size_on_the_cpu(tmp_path: Path):
    from benchmarks.wan22_gpu import main

    result = main(["--smoke", "--out", "smoke", "--out-dir", str(tmp_path)])
    assert result["plan"] == [HIGH, LOW]  # 2 steps, shift 5: the switch is inside the run
    runs = {r["residency"]: r for r in result["runs"]}
    assert set(runs) == {"resident", "offload"} and all(r["finite"] for r in runs.values())
    assert runs["offload"]["swap_s"] is not None and runs["resident"]["swap_s"] is None
    assert (tmp_path / "smoke.json").is_file()


def test_the_http_api_takes_the_low_experts_guidance_for_two_expert_models_only():
    from serve_app.api import APIError, params_from_job, parse_video_request
    from serve_app.settings import ServeSettings

    two = ServeSettings(preset="tiny-a14b")
    fields = {"prompt": "x", "size": "32x32", "num_frames": 5, "guidance_scale": 1, "guidance_scale_low": 3}
    request = parse_video_request(fields, None, two, form=False)
    assert (request.params.guidance_scale, request.params.guidance_scale_low) == (1.0, 3.0)
    assert request.params.uses_guidance  # the low expert's steps need the negative prompt
    assert params_from_job(request.to_job_request()) == request.params  # survives the job store
    form = {k: str(v) for k, v in fields.items()}
    assert parse_video_request(form, None, two, form=True).params.guidance_scale_low == 3.0
    with pytest.raises(APIError) as err:
        parse_video_request({"prompt": "x", "guidance_scale_low": 3}, None, ServeSettings(), form=False)
    assert (err.value.status, err.value.param) == (422, "guidance_scale_low")


def _serve_rank(rank: int, world: int, init_method: str, out_dir: str) -> dict:
    """A DiT replica's rank of a (tiny-sized) Wan2.2 checkpoint directory, resident experts:
    rank 0 reads each expert and broadcasts it; the runner then serves one request."""
    from serve_app import models
    from serve_app.dit import RankState
    from serve_app.settings import ServeSettings
    from standin import presets

    out: dict = {}
    presets.PRESETS["test-wan2.2-tiny"] = replace(TINY_A14B, name="test-wan2.2-tiny")
    reads: list[str] = []
    real = models.load_expert

    def counting(settings, name):
        reads.append(name)
        return real(settings, name)

    models.load_expert = counting
    root = Path(out_dir) / "ckpt"
    expected_models = write_wan22(root) if rank == 0 else None
    settings = ServeSettings.from_args(
        {
            "preset": "test-wan2.2-tiny",
            "checkpoint_dir": str(root),
            "device": "cpu",
            "dtype": "float32",
            "sp_degree": world,
            "dist_backend": "gloo",
            "collective_timeout_s": 60,
        },
        env={},
    )
    state = RankState(settings, rank, init_method)
    out["reads"] = reads
    experts = state.runner.experts
    request = _sp_request(TINY_DIT)
    if rank == 0:
        got = state.runner.generate(request)
        state.runner.shutdown()
        expected = _reference_two_experts(expected_models, request)
        out["err"] = float((got - expected).abs().max() / expected.abs().max())
    else:
        state.runner.serve_forever()
    out["same_as_written"] = all(
        torch.equal(a, b)
        for name in (HIGH, LOW)
        for a, b in zip(
            experts.residency.activate(name).state_dict().values(),
            random_expert(1 if name == HIGH else 2).state_dict().values(),
            strict=True,
        )
    )
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_a_two_rank_server_replica_reads_each_expert_once_and_serves_the_switch(tmp_path: Path):
    results = run_ranks(_serve_rank, 2, tmp_path, SPAWN_DEADLINE_S, str(tmp_path))
    assert [r["reads"] for r in results] == [[HIGH, LOW], []]  # rank 0 reads, rank 1 receives
    assert all(r["same_as_written"] for r in results)
    assert results[0]["err"] <= SP_TOLERANCE


def test_per_expert_styles_on_a_one_dit_model_are_refused() -> None:
    pipe = StandInPipeline.from_preset("tiny")
    params = GenerationParams(prompt="a face", width=32, height=32, num_frames=5, num_steps=2)
    ctx, neg = pipe.encode_prompts(params.prompt, params.negative_prompt)
    inputs = DenoiseInputs.for_request(params, ctx, neg, None, adapters=expert_adapters(None, None))
    with pytest.raises(InvalidRequestError, match="two-expert model"):
        pipe.denoise(inputs)
