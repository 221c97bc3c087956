"""The GPU path, as far as a CPU can show it: the GPU suite's plan, refusal and machinery (a CPU
smoke run), the memory table in the deployment guide, the image recipe; and `gpu`-marked tests
that run the same kernels and an NCCL ring on a CUDA machine (skipped without one)."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_levers, gpu_suite
from benchmarks.gpu_plan import NODE_BUDGET_S, Case, estimate_seconds, memory_estimate, memory_table, plan

REPO = Path(__file__).resolve().parent.parent
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


# -- the suite's plan -----------------------------------------------------------------------


def test_node_mode_runs_14b_at_every_sp_degree_and_both_sizes_and_the_ring_path():
    cases = gpu_suite.node_cases("node", 8, ("480p", "720p"))
    names = {c.name for c in cases}
    for sp in (1, 2, 4, 8):
        for size in ("480p", "720p"):
            assert f"wan2.1-t2v-14b_{size}_sp{sp}" in names
    # 1.3B has 12 heads: SP 8 is Ulysses 4 × ring 2, the NCCL ring shift path.
    assert "wan2.1-t2v-1.3b_480p_sp8" in names
    assert all(c.config.num_layers == 40 for c in cases if c.preset == "wan2.1-t2v-14b")
    assert [sp for sp, _ in gpu_suite.worlds(cases)] == [1, 2, 4, 8]


def test_node_mode_is_planned_to_fit_in_8_minutes():
    args = gpu_suite.parse_args([])
    cases = gpu_suite.node_cases("node", 8, ("480p", "720p"))
    assert estimate_seconds(cases, args.reps, args.warmup) < NODE_BUDGET_S


def test_single_gpu_mode_and_degrees_beyond_the_gpus_present():
    assert gpu_suite.resolve_mode("auto", 1) == "single"
    assert gpu_suite.resolve_mode("auto", 8) == "node"
    single = plan("single", 1)
    assert {c.sp for c in single} == {1}
    assert any(c.preset == "wan2.1-t2v-14b" and c.config.num_layers < 40 for c in single)
    assert {c.sp for c in plan("node", 4)} == {1, 2, 4}
    with pytest.raises(ValueError, match="unknown mode"):
        plan("cluster", 8)
    with pytest.raises(ValueError, match="unknown size"):
        plan("node", 8, ("1080p",))


def test_argument_parsing_and_dry_run(capsys):
    args = gpu_suite.parse_args(["--mode", "single", "--sizes", "480p", "--reps", "3", "--skip-vae"])
    assert (args.mode, args.sizes, args.reps, args.skip_vae) == ("single", ["480p"], 3, True)
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--reps", "0"])
    assert gpu_suite.main(["--dry-run", "--gpus", "8"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["mode"] == "node" and planned["estimated_s"] < planned["node_budget_s"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_the_suite_refuses_cleanly_without_cuda(tmp_path, capsys):
    assert gpu_suite.main(["--out-dir", str(tmp_path)]) == gpu_suite.NO_CUDA_EXIT
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh")], cwd=REPO,
                          env={**os.environ, "RESULTS_DIR": str(tmp_path)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == gpu_suite.NO_CUDA_EXIT and "no CUDA GPU" in proc.stderr


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_the_suites_machinery_runs_on_cpu(tmp_path):
    """--smoke: the same worlds, cases, report and summary with a tiny model on gloo (SP 1 and
    ring 3). Times mean nothing; what is checked is that every field is produced."""
    assert gpu_suite.main(["--smoke", "--out-dir", str(tmp_path), "--skip-vae", "--skip-load"]) == 0
    report = json.loads((tmp_path / "gpu_suite_smoke.json").read_text())
    rows = [row for world in report["worlds"] for row in world["cases"]]
    assert [r["case"] for r in rows] == ["tiny_smoke_sp1", "tiny_smoke_sp3"]
    for row in rows:
        assert row["step_s"] > 0 and row["identity_overhead"] > 0
        assert len(row["peak_allocated_gb_per_rank"]) == row["sp"]
    assert rows[1]["mesh"] == {**rows[1]["mesh"], "ulysses": 1, "ring": 3}
    assert rows[1]["attention"]["ring_block_kernels"]  # the ring ran its LSE kernels
    assert report["worlds"][1]["weight_broadcast"]["bytes"] > 0


def test_the_levers_run_plans_every_lever_and_refuses_without_cuda(tmp_path, capsys):
    assert gpu_levers.main(["--dry-run"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["levers"] == ["attention", "step", "compile", "step_cache", "vae", "sp"]
    if not torch.cuda.is_available():
        assert gpu_levers.main(["--out-dir", str(tmp_path)]) == gpu_levers.NO_CUDA_EXIT
        assert "no CUDA GPU" in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_the_levers_machinery_runs_on_cpu(tmp_path):
    """--smoke: every lever of the GPU run, on the tiny model and 2 gloo ranks (compiles once per
    process). Times mean nothing; what is checked is that every lever produced its numbers."""
    assert gpu_levers.main(["--smoke", "--reps", "1", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_levers_smoke.json").read_text())
    one = report["one_gpu"]
    assert {"sdpa", "sdpa_flash"} <= set(one["attention"]["backends"])
    assert all(row["max_rel_error_vs_fp32_math"] < 1e-5 for row in one["attention"]["backends"].values())
    assert set(one["attention"]["identity"]) == {"concat", "split_kv"}
    assert set(one["step"]["cfg_step"]) == {"eager_sdpa", "eager_auto", "compiled_auto"}
    assert one["step"]["step_cache"]["skipped"] >= 1 and one["step"]["compile_first_call_s"] > 0
    assert set(one["vae"]["decode"]) == {"whole_frame_fp32", "one_band_of_8"}
    sp = report["sp"]
    assert "errors" not in sp, sp.get("errors")
    assert sp["forward_agreements_per_cfg_step"]["gated_eager"] > 0
    assert sp["forward_agreements_per_cfg_step"]["per_step_compiled"] == 0
    assert sp["parallel_vae"]["bytes_sent_per_rank"]["neighbour_exchange"] > 0


# -- memory table ---------------------------------------------------------------------------


def test_memory_estimate_adds_up_and_shrinks_with_the_sp_degree():
    one = memory_estimate(Case("wan2.1-t2v-14b", "720p", 1).config, "720p", 1)
    eight = memory_estimate(Case("wan2.1-t2v-14b", "720p", 8).config, "720p", 8)
    assert 28e9 < one.weights == eight.weights < 30e9  # every rank holds the whole 14B model
    assert eight.activations < one.activations / 7
    parts = one.weights + one.identity_cache + one.text + one.activations + one.runtime
    assert one.total == pytest.approx(parts)


def test_the_deployment_guide_shows_the_computed_memory_table():
    guide = (REPO / "cluster" / "README.md").read_text()
    assert "## Memory per GPU" in guide
    assert memory_table() in guide, "regenerate it: python -m benchmarks.gpu_plan"


def test_the_deployment_guide_states_the_nccl_failure_semantics():
    guide = (REPO / "cluster" / "README.md").read_text()
    section = guide.split("## Failure semantics (NCCL)", 1)[1].split("\n## ", 1)[0]
    from parallel.failures import nccl_environment

    for variable in nccl_environment(60.0, dump_dir="/tmp"):
        assert variable in section, variable
    assert "collective_timeout_s" in section and "crash-only" in section


# -- the image --------------------------------------------------------------------------------


def test_the_image_carries_the_benchmarks_and_the_fast_attention_kernels():
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert "COPY benchmarks ./benchmarks" in dockerfile
    assert "flash-attn" in dockerfile and "pip wheel" in dockerfile
    # the wheel built in the flash-attn stage is installed in the runtime image
    assert "COPY --from=flash-attn /wheels" in dockerfile
    ignore = (REPO / "cluster" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "benchmarks/results/" in ignore


# -- on a GPU -----------------------------------------------------------------------------------


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ring_block_kernels_on_cuda_equal_full_attention(dtype):
    from standin.attention import attention_with_lse, merge, select_lse_backend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 4, 64, generator=g) for n in (300, 517, 517))
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 64**-0.5
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())
    qd, kd, vd = (t.to("cuda", dtype) for t in (q, k, v))
    acc = None
    for start, stop in ((0, 200), (200, 517)):
        acc = merge(acc, attention_with_lse(qd, kd[:, start:stop], vd[:, start:stop]))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert float((acc[0].double().cpu() - ref).abs().max()) <= tol * float(ref.abs().max())
    assert select_lse_backend(qd) != "chunked"  # a fused CUDA kernel ran the blocks


def _nccl_rank(rank: int, port: int, out: str) -> None:
    """Two NCCL ranks: device binding, one communicator for Ulysses over the world, weights read by
    rank 0 and broadcast, the SP forward against one GPU, a ring shift; then rank 1 dies mid-step
    and rank 0 must raise instead of hanging."""
    import datetime
    import time

    result: dict = {}
    try:
        from parallel import (
            CollectiveError,
            Collectives,
            DenoiseRequest,
            DeviceMesh,
            ParallelConfig,
            ShardedDiT,
            SPRunner,
            init_distributed,
        )
        from parallel.devices import device_environment, resolve_device
        from parallel.weights import load_once_per_node
        from standin.dit import WanDiT
        from standin.presets import dit_preset

        env = device_environment(environ={"LOCAL_RANK": str(rank)})
        device = resolve_device("cuda", env)
        torch.cuda.set_device(device)
        init_distributed(rank, 2, f"tcp://127.0.0.1:{port}", backend="nccl",
                         timeout=datetime.timedelta(seconds=120))
        result["device"] = str(device)
        result["nccl_env"] = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
        config = dit_preset("tiny")

        def load() -> WanDiT:
            torch.manual_seed(0)
            return WanDiT(config)

        model, _ = load_once_per_node(load, lambda: WanDiT(config), device)
        mesh = DeviceMesh(ParallelConfig(ulysses=2), config.num_heads, device=device)
        result["new_groups"] = mesh.created
        g = torch.Generator().manual_seed(1)
        lat = torch.randn(1, 16, 3, 6, 10, generator=g).to(device)
        ctx = torch.randn(1, 7, config.text_dim, generator=g).to(device)
        ident = torch.randn(1, 16, 1, 6, 6, generator=g).to(device)
        t = torch.full((1,), 500.0, device=device)
        with torch.no_grad():
            ref = model(lat, t, ctx, model.identity_cache(ident, lat.shape))
        dit = ShardedDiT(model, Collectives(mesh))
        got = dit(lat, t, ctx, dit.identity_cache(ident, lat.shape))
        result["forward_err"] = float((got - ref).abs().max() / ref.abs().max())
        ring = Collectives(DeviceMesh(ParallelConfig(ring=2), config.num_heads, device=device))
        result["received"] = ring.ring_shift(torch.full((4,), float(rank), device=device)).wait().tolist()

        runner = SPRunner(model, Collectives(mesh))
        if rank == 1:
            original = model.blocks[1].cross_attn.forward
            calls = {"n": 0}

            def die(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == 3:
                    Path(out, "rank1.json").write_text(json.dumps(result))
                    os._exit(0)
                return original(*args, **kwargs)

            model.blocks[1].cross_attn.forward = die
        start = time.monotonic()
        try:
            if rank == 0:
                runner.generate(DenoiseRequest(lat, ctx, 3, ctx, ident))
            else:
                runner.serve_forever()
            result["kill"] = "no error"
        except CollectiveError as exc:
            result["kill"] = f"CollectiveError: {exc}"
        result["kill_s"] = time.monotonic() - start
        result["broken"] = runner.broken
    except BaseException:
        result["crash"] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)


@pytest.mark.gpu
@pytest.mark.distributed
@two_gpus
@pytest.mark.timeout(240)
def test_nccl_path_on_two_gpus(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_nccl_rank, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "NCCL ranks hung"
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all("crash" not in r for r in results), results
    assert [r["device"] for r in results] == ["cuda:0", "cuda:1"]
    assert results[0]["nccl_env"] == "3"
    assert all(r["new_groups"] == 1 for r in results)  # only the control group is new
    assert all(r["forward_err"] <= 1e-4 for r in results), results
    assert [r["received"] for r in results] == [[1.0] * 4, [0.0] * 4]
    assert results[0]["kill"].startswith("CollectiveError") and results[0]["broken"], results[0]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
