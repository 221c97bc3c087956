"""Specification of sequence parallelism (parallel/) on CPU with gloo.

Each world (2, 3 and 4 ranks) is spawned once per module, in its own processes, with a hard
deadline; its ranks run every scenario in lockstep and write their measurements to JSON. The
tests below read those measurements, so each names one property and can fail on its own. The
world of 3 runs a ring of 3 (the case separate sends and receives deadlock on NCCL), weights
read by one rank, and ends by killing rank 2 mid-step.

Reference: the single-process `WanDiT` (fp32) with the same weights, built in every rank.
Video: 3×3×5 = 45 tokens (divides by neither 2 nor 4); identity: 3×3 = 9 tokens.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from parallel import (
    CollectiveError,
    Collectives,
    DenoiseRequest,
    DeviceMesh,
    ParallelConfig,
    ParallelConfigError,
    RequestFailedError,
    ShardedDiT,
    SPRunner,
    TokenLayout,
    init_distributed,
)
from parallel.failures import apply_nccl_environment, collective_timeout_s, nccl_environment
from parallel.weights import load_once_per_node
from standin.checkpoints import load_wan_dit, save_safetensors_shards
from standin.config import DiTConfig
from standin.dit import WanDiT, keeps_float32
from standin.errors import CancelledError, CheckpointError, InvalidRequestError
from standin.presets import dit_preset
from standin.scheduler import FlowMatchSchedule
from tests.distributed import run_ranks

TOLERANCE = 1e-5
SPAWN_DEADLINE_S = 100
# The tiny preset has 2 heads; 4-way Ulysses needs 4.
FOUR_HEADS = DiTConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32, lora_rank=8)
PROBE_LEN = 8  # consecutive floats of an identity K/V or token row that mark a leak


# ---------------------------------------------------------------------------------------------
# Fast, single-process checks
# ---------------------------------------------------------------------------------------------


def test_ulysses_degree_must_divide_heads_and_error_lists_valid_degrees():
    with pytest.raises(ParallelConfigError, match=r"1, 2, 4, 5, 8, 10, 20, 40.*ulysses=2, ring=3"):
        ParallelConfig(ulysses=6).validate(num_heads=40)
    ParallelConfig(ulysses=8).validate(num_heads=40)


def test_mesh_size_must_equal_world_and_cfg_is_1_or_2():
    with pytest.raises(ParallelConfigError, match="= 4 ranks, but the world has 2"):
        ParallelConfig(ulysses=2, ring=2).validate(num_heads=4, world_size=2)
    with pytest.raises(ParallelConfigError, match="cfg degree"):
        ParallelConfig(cfg=3).validate(num_heads=4)
    with pytest.raises(ParallelConfigError, match="integer >= 1"):
        ParallelConfig(ring=0).validate(num_heads=4)


def test_for_world_prefers_ulysses_and_rings_the_rest():
    assert ParallelConfig.for_world(16, num_heads=40) == ParallelConfig(ulysses=8, ring=2)
    assert ParallelConfig.for_world(4, num_heads=12, cfg=2) == ParallelConfig(ulysses=2, ring=1, cfg=2)
    assert ParallelConfig.for_world(3, num_heads=2) == ParallelConfig(ulysses=1, ring=3)


def test_token_layout_pads_the_last_shards_with_zeros():
    layout = TokenLayout(num_tokens=5, shards=4)
    assert (layout.shard_len, layout.padded) == (2, 8)
    x = torch.arange(1, 6).view(1, 5, 1)
    shards = [layout.shard(x, i).flatten().tolist() for i in range(4)]
    assert shards == [[1, 2], [3, 4], [5, 0], [0, 0]]


def test_single_rank_mesh_runs_without_a_process_group():
    model = _model(dit_preset("tiny"))
    inputs = _inputs(model.config, batch=1)
    dit = ShardedDiT(model, Collectives(DeviceMesh(ParallelConfig(), model.config.num_heads)))
    cache = dit.identity_cache(inputs["identity"], inputs["latents"].shape)
    with torch.no_grad():
        ref = model(inputs["latents"], inputs["t"], inputs["context"], cache)
    assert _rel(dit(inputs["latents"], inputs["t"], inputs["context"], cache), ref) <= TOLERANCE


def test_collective_timeout_is_sized_from_the_step():
    assert collective_timeout_s(2.0) == 60.0  # the floor
    assert collective_timeout_s(60.0) == 240.0  # 4 × the step
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="step_s"):
            collective_timeout_s(bad)


def test_nccl_failure_settings_are_set_before_init_and_the_operator_wins():
    env = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "100"}
    applied = apply_nccl_environment(120.0, env, dump_dir="/tmp/nccl")
    assert applied["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert applied["TORCH_NCCL_BLOCKING_WAIT"] == "0"
    assert applied["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert applied["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "100"  # already set: kept
    assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == "/tmp/nccl/nccl_trace_rank_"
    assert int(nccl_environment(900.0)["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) >= 900


# ---------------------------------------------------------------------------------------------
# Shared model, inputs and reference (used by the spawned ranks too)
# ---------------------------------------------------------------------------------------------


def _model(config: DiTConfig) -> WanDiT:
    """Deterministic weights, identical in every process; LoRA made non-zero so it matters."""
    torch.manual_seed(0)
    model = WanDiT(config).eval()
    for block in model.blocks:
        attn = block.self_attn
        for lora in (attn.q_loras, attn.k_loras, attn.v_loras):
            torch.nn.init.normal_(lora.up.weight, std=0.5)
    return model


def _inputs(config: DiTConfig, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(batch, config.in_dim, 3, 6, 10, generator=g),
        "context": torch.randn(batch, 7, config.text_dim, generator=g),
        "negative": torch.randn(batch, 5, config.text_dim, generator=g),
        "identity": torch.randn(1, config.in_dim, 1, 6, 6, generator=g),
        "t": torch.full((batch,), 937.5),
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def _reference_denoise(model: WanDiT, request: DenoiseRequest) -> torch.Tensor:
    """The single-process sampling loop: cache built once, CFG as two passes, Euler steps."""
    schedule = FlowMatchSchedule(request.num_steps, shift=request.shift)
    cache = None
    if request.identity_latents is not None:
        cache = model.identity_cache(request.identity_latents, request.latents.shape)
    latents = request.latents
    for i in range(request.num_steps):
        t = schedule.timestep(i).expand(latents.shape[0])
        pos = model(latents, t, request.context, cache)
        v = pos
        if request.guidance != 1.0:
            neg = model(latents, t, request.negative_context, cache)
            v = neg + request.guidance * (pos - neg)
        latents = schedule.step(v, i, latents)
    return latents


def _request(inputs: dict[str, torch.Tensor], identity: bool = True, guidance: float = 5.0) -> DenoiseRequest:
    return DenoiseRequest(
        latents=inputs["latents"],
        context=inputs["context"],
        negative_context=inputs["negative"],
        identity_latents=inputs["identity"] if identity else None,
        num_steps=3,
        guidance=guidance,
    )


# ---------------------------------------------------------------------------------------------
# What each rank sends: recorded at the torch.distributed boundary, independent of parallel/
# ---------------------------------------------------------------------------------------------


class SendRecorder:
    """Wraps torch.distributed's collectives; keeps a copy of every float tensor a rank sends."""

    # name → index of the argument holding what this rank sends
    SENDING: ClassVar[dict[str, int]] = {
        "all_to_all_single": 1,
        "all_gather": 1,
        "broadcast": 0,
        "all_reduce": 0,
        "isend": 0,
        "batch_isend_irecv": 0,
    }

    def __init__(self) -> None:
        self.sent: list[torch.Tensor] = []
        self.calls: dict[str, int] = {}
        self.enabled = True
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name, arg in self.SENDING.items():
            original = getattr(c10d, name)
            wrapped = self._wrap(name, arg, original)
            setattr(c10d, name, wrapped)
            setattr(dist, name, wrapped)

    def _wrap(self, name, arg, original):
        def wrapped(*args, **kwargs):
            if self.enabled and not (name == "broadcast" and not self._is_root(*args, **kwargs)):
                tensor = args[arg] if len(args) > arg else kwargs.get("tensor", kwargs.get("input"))
                self.calls[name] = self.calls.get(name, 0) + 1
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    self.sent.append(tensor.detach().clone())
            return original(*args, **kwargs)

        return wrapped

    @staticmethod
    def _is_root(tensor, src=None, *args, **kwargs) -> bool:
        # A broadcast receiver's buffer is uninitialised memory, not something it sends.
        import torch.distributed as dist

        return src == dist.get_rank()

    def reset(self) -> None:
        self.sent.clear()
        self.calls.clear()


def _identity_probes(model: WanDiT, identity_latents: torch.Tensor, latent_shape) -> list[torch.Tensor]:
    """Rows of every identity K/V head vector and identity token: any of them in a sent tensor is a leak."""
    with torch.no_grad():
        cache = model.identity_cache(identity_latents, latent_shape)
        tokens = model.patchify(identity_latents)
    rows = [t.reshape(-1, t.shape[-1])[:, :PROBE_LEN] for t in cache.keys + cache.values]
    rows.append(tokens.reshape(-1, tokens.shape[-1])[:, :PROBE_LEN])
    return list(torch.cat(rows))


def _leaks(sent: list[torch.Tensor], probes: list[torch.Tensor]) -> int:
    """How many probe rows appear, as consecutive values, in any sent tensor."""
    found = 0
    for tensor in sent:
        flat = tensor.float().flatten()
        for probe in probes:
            for i in (flat == probe[0]).nonzero().flatten().tolist():
                if i + PROBE_LEN <= flat.numel() and torch.equal(flat[i : i + PROBE_LEN], probe):
                    found += 1
                    break
    return found


# ---------------------------------------------------------------------------------------------
# The scenarios every rank of a spawned world runs
# ---------------------------------------------------------------------------------------------


def _check_mesh(name: str, config: ParallelConfig, model: WanDiT, rec: SendRecorder, out: dict) -> SPRunner:
    """Forward equality (first and cached steps, ± identity), collectives per forward, leaks,
    and whole requests through the runner. Returns the runner for follow-up scenarios."""
    comm = Collectives(DeviceMesh(config, model.config.num_heads))
    runner = SPRunner(model, comm)
    inputs = _inputs(model.config)
    lat, ctx, ident = inputs["latents"], inputs["context"], inputs["identity"]
    probes = _identity_probes(model, ident, lat.shape)
    res: dict = {}
    mesh = comm.mesh
    res["new_groups"] = mesh.created  # new_group calls (the control group is always one)
    res["distinct_groups"] = len(mesh.groups)
    res["all_groups_are_the_default_group"] = all(
        g is None or g is torch.distributed.group.WORLD
        for g in (mesh.world_group, mesh.cpu_group, mesh.sp_group, mesh.ulysses_group, mesh.ring_group)
    )
    rec.reset()
    with torch.no_grad():
        cache = model.identity_cache(ident, lat.shape)
        t_later = torch.full_like(inputs["t"], 412.0)
        refs = [
            model(lat, inputs["t"], ctx, cache),
            model(lat, t_later, ctx, cache),
            model(lat, inputs["t"], ctx),
        ]
    my_cache = runner.dit.identity_cache(ident, lat.shape)
    res["cache_heads"] = my_cache.keys[0].shape[2]
    rec.reset()
    first = runner.dit(lat, inputs["t"], ctx, my_cache)
    res["calls_per_forward"] = dict(rec.calls)
    cached = runner.dit(lat, t_later, ctx, my_cache)
    plain = runner.dit(lat, inputs["t"], ctx, None)
    res["forward_err"] = [_rel(first, refs[0]), _rel(cached, refs[1]), _rel(plain, refs[2])]
    res["identity_effect"] = _rel(refs[0], refs[2])

    rank0 = comm.mesh.rank == 0
    requests = [_request(inputs), _request(_inputs(model.config, batch=1, seed=5), identity=False)]
    if rank0:
        res["request_err"] = [_rel(runner.generate(r), _reference_denoise(model, r)) for r in requests]
        runner.shutdown()
    else:
        runner.serve_forever()
    res["leaks"] = _leaks(rec.sent, probes)
    res["sent_tensors"] = len(rec.sent)
    # The detector itself must see a leak when one is planted (else the check proves nothing).
    res["detector_sees_planted_leak"] = (
        _leaks([torch.cat([first.flatten(), my_cache.keys[1].flatten()])], probes) > 0
    )
    out[name] = res
    return runner


def _failure_scenarios(runner: SPRunner, model: WanDiT, fail_rank: int, out: dict) -> None:
    """Failures on one rank become agreed errors; the group then serves the next request."""
    mesh = runner.mesh
    rank0 = mesh.rank == 0
    inputs = _inputs(model.config)
    good = _request(inputs)
    expected = _reference_denoise(model, good) if rank0 else None
    res: dict = {}
    calls = {"n": 0}
    block = model.blocks[1]
    original_cross = block.cross_attn.forward
    original_cache = runner.dit.identity_cache

    def failing_cross(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # mid-forward, in the second step
            raise RuntimeError("injected failure inside the forward")
        return original_cross(*args, **kwargs)

    def failing_cache(*args, **kwargs):
        raise RuntimeError("injected failure building the identity cache")

    scenarios = [
        ("mid_forward", block.cross_attn, "forward", failing_cross, original_cross),
        ("setup", runner.dit, "identity_cache", failing_cache, original_cache),
    ]
    for label, obj, attr, failing, original in scenarios:
        if mesh.rank == fail_rank:
            setattr(obj, attr, failing)
        try:
            if rank0:
                try:
                    runner.generate(good)
                    res[label] = "no error"
                except RequestFailedError as exc:
                    res[label] = {str(r): m for r, m in exc.failures.items()}
            else:
                runner.serve_one()
                res[label] = repr(runner.last_error)
        finally:
            setattr(obj, attr, original)
        if rank0:
            res[label + "_next_err"] = _rel(runner.generate(good), expected)
        else:
            runner.serve_one()
            res[label + "_next_err"] = repr(runner.last_error)

    # Cancellation after the first step, agreed; then the next request.
    if rank0:
        steps: list[int] = []
        try:
            runner.generate(good, progress=lambda done, total: steps.append(done), should_cancel=lambda: True)
            res["cancel"] = "not cancelled"
        except CancelledError:
            res["cancel"] = f"cancelled after {len(steps)} steps"
        # An invalid request is refused on rank 0 before anything is sent.
        try:
            runner.generate(
                DenoiseRequest(inputs["latents"][:, :, :, :5], inputs["context"], 3, inputs["negative"])
            )
            res["invalid"] = "accepted"
        except InvalidRequestError as exc:
            res["invalid"] = str(exc)

        # A cancel check that raises is a failure every rank agrees on.
        def broken_check() -> bool:
            raise ValueError("job store unreachable")

        try:
            runner.generate(good, should_cancel=broken_check)
            res["cancel_check_raises"] = "no error"
        except RequestFailedError as exc:
            res["cancel_check_raises"] = {str(r): m for r, m in exc.failures.items()}
        steps.clear()
        latents = runner.generate(good, progress=lambda done, total: steps.append((done, total)))
        res["after_cancel_err"] = _rel(latents, expected)
        res["progress"] = steps
        runner.shutdown()
    else:
        runner.serve_one()
        res["cancel"] = repr(runner.last_error)
        runner.serve_one()
        res["cancel_check_raises"] = repr(runner.last_error)
        runner.serve_forever()
    res["broken"] = runner.broken
    out["failures"] = res


def _timeout_scenario(model: WanDiT, out: dict) -> None:
    """A rank stuck longer than the timeout: the others get CollectiveError, not a hang."""
    mesh = DeviceMesh(
        ParallelConfig(ulysses=2), model.config.num_heads, timeout=datetime.timedelta(seconds=2)
    )
    runner = SPRunner(model, Collectives(mesh))
    res: dict = {}
    if mesh.rank == 1:
        original = model.blocks[0].cross_attn.forward

        def stuck(*args, **kwargs):
            time.sleep(6)
            return original(*args, **kwargs)

        model.blocks[0].cross_attn.forward = stuck
    start = time.monotonic()
    try:
        if mesh.rank == 0:
            runner.generate(_request(_inputs(model.config)))
        else:
            runner.serve_one()
        res["error"] = "none"
    except CollectiveError as exc:
        res["error"] = f"CollectiveError: {exc}"
    res["seconds"] = time.monotonic() - start
    res["broken"] = runner.broken
    try:
        runner.generate(_request(_inputs(model.config))) if mesh.rank == 0 else runner.serve_one()
        res["after"] = "ran"
    except CollectiveError:
        res["after"] = "refused"
    out["timeout"] = res


def _world2(rank: int, rec: SendRecorder) -> dict:
    out: dict = {}
    model = _model(dit_preset("tiny"))
    runner = _check_mesh("ulysses2", ParallelConfig(ulysses=2), model, rec, out)
    _check_mesh("ring2", ParallelConfig(ring=2), model, rec, out)
    _check_mesh("cfg2", ParallelConfig(cfg=2), model, rec, out)
    rec.enabled = False
    _failure_scenarios(runner, model, fail_rank=1, out=out)
    _timeout_scenario(model, out)  # last: it breaks its own groups
    return out


def _world4(rank: int, rec: SendRecorder) -> dict:
    out: dict = {}
    model = _model(FOUR_HEADS)
    _check_mesh("ulysses4", ParallelConfig(ulysses=4), model, rec, out)
    runner = _check_mesh("ulysses2_ring2", ParallelConfig(ulysses=2, ring=2), model, rec, out)
    _check_mesh("cfg2_ulysses2", ParallelConfig(ulysses=2, cfg=2), model, rec, out)
    _check_mesh("cfg2_ring2", ParallelConfig(ring=2, cfg=2), model, rec, out)
    rec.enabled = False
    _failure_scenarios(runner, model, fail_rank=3, out=out)
    return out


def _weights_scenario(model: WanDiT, tmp: Path, out: dict) -> None:
    """Rank 0 reads a checkpoint (official layout: DiT shards + LoRA pickle) in bfloat16 and
    broadcasts it; the others never open a file and build the module in float32 (they receive
    rank 0's dtypes). Then a load that fails on rank 0 must fail on every rank."""
    ckpt = tmp / "ckpt"
    reads = {"n": 0}

    def load() -> WanDiT:
        reads["n"] += 1
        state = model.state_dict()
        lora = {k: v for k, v in state.items() if "_loras." in k}
        save_safetensors_shards(
            {k: v for k, v in state.items() if k not in lora}, ckpt, 2, "diffusion_pytorch_model"
        )
        torch.save(lora, ckpt / "lora.ckpt")
        return load_wan_dit(ckpt, model.config, lora_path=ckpt / "lora.ckpt", dtype=torch.bfloat16)

    loaded, stats = load_once_per_node(load, lambda: WanDiT(model.config), device="cpu")
    # bf16, except the parameters a bf16 DiT keeps in float32 (standin.dit.keeps_float32)
    expected = {
        k: v.to(torch.float32 if keeps_float32(k) else torch.bfloat16) for k, v in model.state_dict().items()
    }
    got = loaded.state_dict()
    res = {
        "reads": reads["n"],
        "equal": sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected),
        "bytes": stats.bytes,
        "read_s": stats.read_s,
    }

    def broken_load() -> WanDiT:
        raise FileNotFoundError("diffusion_pytorch_model-00001-of-00006.safetensors")

    try:
        load_once_per_node(broken_load, lambda: WanDiT(model.config), device="cpu")
        res["failed_load"] = "no error"
    except CheckpointError as exc:
        res["failed_load"] = str(exc)
    out["weights"] = res


def _kill_scenario(model: WanDiT, out: dict) -> None:
    """Rank 2 dies (os._exit) in the middle of a forward; the survivors must raise, not hang.
    The collective timeout is an hour: only the dead peer's closed connections can end this."""
    mesh = DeviceMesh(ParallelConfig(ring=3), model.config.num_heads, timeout=datetime.timedelta(hours=1))
    runner = SPRunner(model, Collectives(mesh))
    calls = {"n": 0}
    if mesh.rank == 2:
        original = model.blocks[1].cross_attn.forward

        def die(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:  # the first forward of the second step
                out["kill"] = {"died": True}
                _RESULT["path"].write_text(json.dumps(out))
                os._exit(0)
            return original(*args, **kwargs)

        model.blocks[1].cross_attn.forward = die
    res: dict = {}
    start = time.monotonic()
    try:
        if mesh.rank == 0:
            runner.generate(_request(_inputs(model.config)))
        else:
            runner.serve_forever()
        res["error"] = "none"
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
    res["seconds"] = time.monotonic() - start
    res["broken"] = runner.broken
    if mesh.rank == 0:
        try:
            runner.generate(_request(_inputs(model.config)))
            res["after"] = "ran"
        except CollectiveError as exc:
            res["after"] = f"refused: {exc}"
    out["kill"] = res


def _world3(rank: int, rec: SendRecorder) -> dict:
    out: dict = {}
    model = _model(dit_preset("tiny"))
    _check_mesh("ring3", ParallelConfig(ring=3), model, rec, out)
    rec.enabled = False
    _weights_scenario(model, _RESULT["path"].parent, out)
    _kill_scenario(model, out)  # last: rank 2 exits inside it
    return out


_RESULT: dict = {}


def _rank_main(rank: int, world: int, init_method: str, scenario: str, out_dir: str) -> dict:
    _RESULT["path"] = Path(out_dir, f"rank{rank}.json")
    rec = SendRecorder()
    init_distributed(rank, world, init_method, timeout=datetime.timedelta(seconds=60))
    return {"world2": _world2, "world3": _world3, "world4": _world4}[scenario](rank, rec)


def _spawn(scenario: str, world: int, out_dir: Path) -> list[dict]:
    return run_ranks(_rank_main, world, out_dir, SPAWN_DEADLINE_S, scenario, str(out_dir))


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> list[dict]:
    return _spawn("world2", 2, tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="module")
def world3(tmp_path_factory) -> list[dict]:
    return _spawn("world3", 3, tmp_path_factory.mktemp("world3"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> list[dict]:
    return _spawn("world4", 4, tmp_path_factory.mktemp("world4"))


# ---------------------------------------------------------------------------------------------
# The distributed specification
# ---------------------------------------------------------------------------------------------

W2_MESHES = ["ulysses2", "ring2", "cfg2"]
W3_MESHES = ["ring3"]
W4_MESHES = ["ulysses4", "ulysses2_ring2", "cfg2_ulysses2", "cfg2_ring2"]
distributed = pytest.mark.distributed


def _results(request, world: str) -> list[dict]:
    return request.getfixturevalue(world)


def _all_meshes():
    return (
        [("world2", m) for m in W2_MESHES]
        + [("world3", m) for m in W3_MESHES]
        + [("world4", m) for m in W4_MESHES]
    )


@distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize(("world", "mesh"), _all_meshes())
def test_sequence_parallel_forward_matches_single_process(request, world, mesh):
    """First step (fresh cache), a cached step and a step without identity, on every rank."""
    for rank, res in enumerate(_results(request, world)):
        errors = res[mesh]["forward_err"]
        assert max(errors) <= TOLERANCE, f"rank {rank}: relative errors {errors}"
        # The identity must matter, or the equality above would not prove it is applied.
        assert res[mesh]["identity_effect"] > 100 * TOLERANCE


@distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize(("world", "mesh"), _all_meshes())
def test_runner_requests_match_single_process_sampling(request, world, mesh):
    """3 Euler steps with CFG 5 and identity (batch 2), then batch 1 without identity."""
    errors = _results(request, world)[0][mesh]["request_err"]
    assert max(errors) <= TOLERANCE, errors


@distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize(("world", "mesh"), _all_meshes())
def test_identity_tokens_and_kv_never_enter_a_collective(request, world, mesh):
    for rank, res in enumerate(_results(request, world)):
        assert res[mesh]["detector_sees_planted_leak"], "leak detector is blind"
        assert res[mesh]["sent_tensors"] > 0
        assert res[mesh]["leaks"] == 0, f"rank {rank} sent identity data {res[mesh]['leaks']} times"


@distributed
@pytest.mark.timeout(240)
def test_each_rank_keeps_only_its_ulysses_head_slice_of_the_identity_cache(world2, world4):
    assert [r["ulysses2"]["cache_heads"] for r in world2] == [1, 1]
    assert [r["ring2"]["cache_heads"] for r in world2] == [2, 2]
    assert [r["ulysses4"]["cache_heads"] for r in world4] == [1, 1, 1, 1]
    assert [r["ulysses2_ring2"]["cache_heads"] for r in world4] == [2, 2, 2, 2]


@distributed
@pytest.mark.timeout(240)
def test_collectives_per_forward(world2, world4):
    layers = 2
    # Ulysses: two all-to-alls per block, one all-gather of the output; gates are all-reduces.
    u4 = world4[0]["ulysses4"]["calls_per_forward"]
    assert (u4["all_to_all_single"], u4["all_gather"]) == (2 * layers, 1)
    assert u4["all_reduce"] == 2 * layers + 1
    # Ring of 2: one K/V shift per block, no all-to-all.
    r2 = world2[0]["ring2"]["calls_per_forward"]
    assert (r2["isend"], r2.get("all_to_all_single", 0), r2["all_gather"]) == (layers, 0, 1)
    # Ulysses 2 × ring 2: both.
    ur = world4[0]["ulysses2_ring2"]["calls_per_forward"]
    assert (ur["all_to_all_single"], ur["isend"]) == (2 * layers, layers)


@distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", ["world2", "world4"])
def test_failure_on_one_rank_is_an_error_on_every_rank_and_the_group_serves_on(request, world):
    results = _results(request, world)
    fail_rank = str(len(results) - 1)
    rank0 = results[0]["failures"]
    for label in ("mid_forward", "setup"):
        assert list(rank0[label]) == [fail_rank], rank0[label]
        assert "injected failure" in rank0[label][fail_rank]
        assert rank0[label + "_next_err"] <= TOLERANCE
        for rank, res in enumerate(results[1:], start=1):
            assert res["failures"][label].startswith("RequestFailedError"), (rank, res["failures"][label])
            assert res["failures"][label + "_next_err"] == "None"
    assert all(not res["failures"]["broken"] for res in results)


@distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", ["world2", "world4"])
def test_cancellation_and_invalid_requests_leave_the_group_usable(request, world):
    results = _results(request, world)
    rank0 = results[0]["failures"]
    assert rank0["cancel"] == "cancelled after 0 steps"
    assert all(r["failures"]["cancel"].startswith("CancelledError") for r in results[1:])
    assert "not divisible by the patch size" in rank0["invalid"]
    assert rank0["after_cancel_err"] <= TOLERANCE
    assert rank0["progress"] == [[1, 3], [2, 3], [3, 3]]


@distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", ["world2", "world4"])
def test_a_raising_cancel_check_on_rank_0_fails_the_request_everywhere(request, world):
    results = _results(request, world)
    assert results[0]["failures"]["cancel_check_raises"] == {"0": "ValueError: job store unreachable"}
    assert all(r["failures"]["cancel_check_raises"].startswith("RequestFailedError") for r in results[1:])


@distributed
@pytest.mark.timeout(240)
def test_stuck_rank_times_out_instead_of_hanging(world2):
    res = world2[0]["timeout"]
    assert res["error"].startswith("CollectiveError"), res
    assert res["seconds"] < 5.5, res  # 2 s timeout; the stuck rank sleeps 6 s
    assert res["broken"] and res["after"] == "refused"
    assert world2[1]["timeout"]["error"].startswith("CollectiveError")


@distributed
@pytest.mark.timeout(240)
def test_ring_shifts_are_grouped_send_receive_pairs(world2, world3):
    """One batch_isend_irecv per block and step of the ring (NCCL-safe for rings of 3+)."""
    layers = 2
    for world, name, ring in ((world2, "ring2", 2), (world3, "ring3", 3)):
        calls = world[0][name]["calls_per_forward"]
        assert calls["batch_isend_irecv"] == layers * (ring - 1), calls
        assert calls["isend"] == layers * (ring - 1), calls


@distributed
@pytest.mark.timeout(240)
def test_groups_with_the_same_members_share_one_communicator(world2, world4):
    # Ulysses over the whole world (the Ulysses-8 case on 8 GPUs): world, agreement, SP and
    # Ulysses groups are all the default group; only the long-timeout control group is new.
    for res in world2:
        assert res["ulysses2"]["all_groups_are_the_default_group"]
        assert res["ulysses2"]["new_groups"] == 1
        assert res["ulysses2"]["distinct_groups"] == 2
    # Distinct members still get their own groups: 2 Ulysses pairs + 2 ring pairs + control.
    for res in world4:
        assert res["ulysses2_ring2"]["new_groups"] == 5
        assert res["ulysses2_ring2"]["distinct_groups"] == 4  # world, control, my Ulysses, my ring


@distributed
@pytest.mark.timeout(240)
def test_weights_are_read_by_one_rank_and_broadcast(world3):
    assert [r["weights"]["reads"] for r in world3] == [1, 0, 0]
    assert all(r["weights"]["equal"] for r in world3)
    assert world3[1]["weights"]["bytes"] == world3[0]["weights"]["bytes"] > 0
    for res in world3:
        assert "rank 0 could not load" in res["weights"]["failed_load"]
        assert "00001-of-00006" in res["weights"]["failed_load"]


@distributed
@pytest.mark.timeout(240)
def test_a_rank_killed_mid_step_makes_the_survivors_fail_fast_and_the_replica_refuse_work(world3):
    """Crash-only: survivors raise CollectiveError (the collective timeout is an hour, the spawn
    deadline 100 s: only the dead peer's closed connections can have ended the step), mark the
    runner broken (the replica's health check fails) and refuse the next request."""
    assert world3[2]["kill"] == {"died": True}
    for rank in (0, 1):
        res = world3[rank]["kill"]
        assert res["error"].startswith("CollectiveError"), (rank, res)
        assert res["broken"], (rank, res)
    assert world3[0]["kill"]["after"].startswith("refused")
