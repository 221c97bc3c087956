"""The attention entry point (standin/attention/): every backend this machine can run against a
float64 softmax and against PyTorch's SDPA, log-sum-exp blocks merged exactly, the identity
block merged by LSE (split-KV) equal to the concatenation, the setting and its validation, the
once-per-process log line and the fallback of a kernel that refuses an input. `gpu` tests run
the CUDA kernels (flash3, flash2, sage, cuDNN, …) where a CUDA device and the package exist."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F

import standin.attention.backends as backends
import standin.attention.selection as selection
from standin.attention import (
    BACKEND_CALLS,
    BACKENDS,
    CHOICES,
    attention,
    attention_with_lse,
    configure_attention,
    merge,
    restricted_attention,
    select_backend,
    select_lse_backend,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# max |error| / max |reference| per input dtype (bf16: 8 mantissa bits on inputs and output)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
SAGE_TOLERANCE = 5e-2  # INT8 Q·K: quantised, not exact


@pytest.fixture(autouse=True)
def fresh_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts as a new process would: no setting, nothing logged, failed or counted."""
    monkeypatch.delenv("STANDIN_ATTENTION", raising=False)
    monkeypatch.setattr(selection, "_configured", None)
    monkeypatch.setattr(selection, "_failed", set())
    monkeypatch.setattr(selection, "_logged", set())
    BACKEND_CALLS.clear()


def _qkv(
    dtype: torch.dtype, device: str = "cpu", sq: int = 37, sk: int = 50, b: int = 2, h: int = 3, d: int = 16
) -> tuple[torch.Tensor, ...]:
    """q [b, sq, h, d], k/v [b, sk, h, d], drawn in float64 (the same values in every dtype)."""
    g = torch.Generator().manual_seed(0)
    draws = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for n in (sq, sk, sk))
    return tuple(t.to(device, dtype) for t in draws)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 softmax attention and its log-sum-exp [B, Sq, H], on the CPU."""
    q, k, v = (t.double().cpu() for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v), torch.logsumexp(scores, -1).transpose(1, 2)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max() / b.double().cpu().abs().max())


def _runnable(name: str, q: torch.Tensor, lse: bool = False) -> None:
    reason = BACKENDS[name].refuses(q)
    if reason is None and lse and BACKENDS[name].with_lse is None:
        reason = "no log-sum-exp"
    if reason is not None:
        pytest.skip(f"{name}: {reason}")


# -- every backend against float64 and SDPA ------------------------------------------------------


def _check_backend(name: str, dtype: torch.dtype, device: str) -> None:
    q, k, v = _qkv(dtype, device)
    _runnable(name, q)
    configure_attention(name)
    assert select_backend(q) == name
    out = attention(q, k, v)
    tol = SAGE_TOLERANCE if name == "sage" else TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert _rel(out, _reference(q, k, v)[0]) <= tol
    assert _rel(out, _sdpa(q, k, v)) <= tol
    assert BACKEND_CALLS[name] == 1  # it ran, not a fallback


ON_CPU = [n for n, b in BACKENDS.items() if b.refuses(torch.zeros(1, 1, 1, 16)) is None]  # sdpa*, chunked
ON_CPU_LSE = [n for n in ON_CPU if BACKENDS[n].with_lse is not None]


@pytest.mark.parametrize("name", ON_CPU)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_every_cpu_backend_equals_float64_softmax_and_sdpa(name, dtype):
    _check_backend(name, dtype, "cpu")


@pytest.mark.parametrize("name", ON_CPU_LSE)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_lse_blocks_merged_over_uneven_key_blocks_equal_one_softmax(name, dtype, monkeypatch):
    """Each LSE kernel over three uneven key blocks, merged, is the softmax over all keys."""
    monkeypatch.setattr(backends, "CHUNK_ELEMENTS", 3 * 2 * 50)  # chunked: one query row per chunk
    q, k, v = _qkv(dtype)
    _runnable(name, q, lse=True)
    ref_out, ref_lse = _reference(q, k, v)
    acc = None
    for start, stop in ((0, 7), (7, 31), (31, 50)):
        acc = merge(acc, attention_with_lse(q, k[:, start:stop], v[:, start:stop], backend=name))
    out, lse = acc
    assert out.dtype == lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == q.shape[:3]
    tol = TOLERANCE[dtype]
    assert _rel(out, ref_out) <= tol
    assert float((lse.double() - ref_lse).abs().max()) <= tol * 10


def test_chunked_kernel_never_holds_more_scores_than_its_budget(monkeypatch):
    budget = 4 * 64  # 64 keys × 2 heads × batch 2: one query row per chunk
    monkeypatch.setattr(backends, "CHUNK_ELEMENTS", budget)
    biggest = []
    real_einsum = torch.einsum

    def spy(eq, *ops):
        out = real_einsum(eq, *ops)
        if eq.endswith("->bhqk"):
            biggest.append(out.numel())
        return out

    monkeypatch.setattr(torch, "einsum", spy)
    q = torch.randn(2, 40, 2, 8)
    k = v = torch.randn(2, 64, 2, 8)
    attention_with_lse(q, k, v, backend="chunked")
    assert len(biggest) == 40 and max(biggest) <= budget


# -- the identity block: split-KV (LSE merge) == concatenation ------------------------------------


@pytest.mark.parametrize("name", ON_CPU_LSE)
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)]
)
def test_split_kv_identity_equals_concatenated_identity(name, dtype, tol):
    """bf16: the split path rounds each partial output to fp32 and the result once to bf16, the
    concat path rounds once; both are within one bf16 step of the other (≤ 1e-2 of the max)."""
    configure_attention(name)
    q, k, v = _qkv(dtype, sq=45, sk=45)
    k_id, v_id = _qkv(dtype, sq=1, sk=9, b=1)[1:]
    concat = restricted_attention(q, k, v, (k_id, v_id), split_kv=False)
    split = restricted_attention(q, k, v, (k_id, v_id), split_kv=True)
    assert split.dtype == concat.dtype == dtype
    assert _rel(split, concat) <= tol
    both = [torch.cat([x, x_id.expand(2, -1, -1, -1)], 1) for x, x_id in ((k, k_id), (v, v_id))]
    ref = _reference(q, *both)
    assert _rel(split, ref[0]) <= max(tol, TOLERANCE[dtype])
    assert BACKEND_CALLS[f"{name}+lse"] == 2  # the split path ran two LSE calls, no concatenation


@pytest.mark.parametrize("split_kv", [False, True])
def test_one_identity_broadcasts_over_the_batch(split_kv):
    """Identity K/V [1, S_id] serves every batch row, as the same K/V repeated per row would."""
    q, k, v = _qkv(torch.float64, sq=20, sk=20, b=3)
    k_id, v_id = _qkv(torch.float64, sq=1, sk=6, b=1)[1:]
    shared = restricted_attention(q, k, v, (k_id, v_id), split_kv=split_kv)
    per_row = (k_id.repeat(3, 1, 1, 1), v_id.repeat(3, 1, 1, 1))
    repeated = restricted_attention(q, k, v, per_row, split_kv=split_kv)
    assert _rel(shared, repeated) <= 1e-12
    for row in range(3):  # each row alone equals its row of the batch
        alone = restricted_attention(q[row : row + 1], k[row : row + 1], v[row : row + 1], (k_id, v_id))
        assert _rel(shared[row : row + 1], alone) <= 1e-12


def test_concatenation_is_the_default_for_every_backend():
    """Measured (benchmarks/attention.py): the merge's traffic exceeds the copy's, so no split."""
    assert not any(b.split_kv for b in BACKENDS.values())
    q, k, v = _qkv(torch.float32)
    restricted_attention(q, k, v, _qkv(torch.float32, sk=5, b=1)[1:])
    assert dict(BACKEND_CALLS) == {"sdpa_flash": 1}


# -- the setting ---------------------------------------------------------------------------------


def test_auto_picks_the_cpu_flash_kernel_for_every_float_dtype():
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        q = torch.zeros(1, 4, 2, 128, dtype=dtype)
        assert select_backend(q) == select_lse_backend(q) == "sdpa_flash"


def test_environment_variable_forces_a_backend_and_rejects_unknown_names(monkeypatch):
    q = torch.zeros(1, 4, 2, 8)
    monkeypatch.setenv("STANDIN_ATTENTION", "chunked")
    assert select_backend(q) == select_lse_backend(q) == "chunked"
    monkeypatch.setenv("STANDIN_ATTENTION", "xformers")
    with pytest.raises(ValueError, match="STANDIN_ATTENTION must be one of auto, flash3, .*chunked"):
        select_backend(q)
    monkeypatch.setenv("STANDIN_RING_ATTENTION", "chunked")  # no longer a setting of its own
    monkeypatch.setenv("STANDIN_ATTENTION", "auto")
    assert select_lse_backend(q) == "sdpa_flash"


def test_configure_attention_overrides_the_environment_and_validates(monkeypatch):
    q = torch.zeros(1, 4, 2, 8)
    monkeypatch.setenv("STANDIN_ATTENTION", "chunked")
    assert configure_attention("sdpa_math") == "sdpa_math"
    assert select_backend(q) == "sdpa_math"
    assert configure_attention(None) == "chunked"  # back to the environment
    with pytest.raises(ValueError, match="one of auto, flash3, flash2, sage, sdpa"):
        configure_attention("flash4")
    assert set(CHOICES) == {"auto", *BACKENDS}


@pytest.mark.parametrize("name", ["flash3", "flash2", "sage"])
def test_a_backend_whose_package_is_missing_is_refused_at_configuration(name):
    if backends.installed(name):
        pytest.skip(f"{backends.PACKAGES[name]} is installed here")
    with pytest.raises(ValueError, match=f"needs the {backends.PACKAGES[name]} package"):
        configure_attention(name)


def test_a_named_backend_that_cannot_run_the_input_gives_way_to_auto_with_one_warning(caplog):
    configure_attention("sdpa_efficient")  # CUDA only
    q, k, v = _qkv(torch.float32)
    with caplog.at_level(logging.WARNING, logger="standin.attention"):
        for _ in range(3):
            out = attention(q, k, v)
    assert _rel(out, _reference(q, k, v)[0]) <= 1e-5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "attention: sdpa_efficient cannot run fp32 on cpu (runs on cuda, not cpu); using sdpa_flash"
    ]


def test_sdpa_for_plain_calls_leaves_lse_calls_to_an_lse_kernel():
    configure_attention("sdpa")
    q, k, v = _qkv(torch.float64)
    assert select_backend(q) == "sdpa" and select_lse_backend(q) == "sdpa_flash"
    assert _rel(attention_with_lse(q, k, v)[0], _reference(q, k, v)[0]) <= 1e-12


def test_the_choice_is_logged_once_per_backend_device_and_dtype(caplog):
    q, k, v = _qkv(torch.float32)
    with caplog.at_level(logging.INFO, logger="standin.attention"):
        for _ in range(3):
            attention(q, k, v)
            attention_with_lse(q, k, v)
        attention(*(t.double() for t in (q, k, v)))
    assert [r.getMessage() for r in caplog.records] == [
        "attention: sdpa_flash (fp32, cpu)",
        "attention: sdpa_flash with log-sum-exp (fp32, cpu)",
        "attention: sdpa_flash (fp64, cpu)",
    ]
    assert dict(BACKEND_CALLS) == {"sdpa_flash": 4, "sdpa_flash+lse": 3}


def test_a_fused_kernel_that_raises_falls_back_to_the_exact_one_once(monkeypatch, caplog):
    def refusing(q, k, v):
        raise RuntimeError("head dim not supported")

    refuses_lse = dataclasses.replace(BACKENDS["sdpa_flash"], with_lse=refusing)
    monkeypatch.setitem(BACKENDS, "sdpa_flash", refuses_lse)
    q, k, v = _qkv(torch.float64, sq=5, sk=9, b=1)
    with caplog.at_level(logging.WARNING, logger="standin.attention"):
        out, _ = attention_with_lse(q, k, v)
        attention_with_lse(q, k, v)
    assert _rel(out, _reference(q, k, v)[0]) <= 1e-12
    assert dict(BACKEND_CALLS) == {"chunked+lse": 2}  # the refusing kernel is not retried
    assert len([r for r in caplog.records if "failed (head dim not supported)" in r.getMessage()]) == 1
    assert select_lse_backend(q) == "chunked"
    assert select_backend(q) == "sdpa_flash"  # its plain kernel did not fail
    with pytest.raises(RuntimeError, match="head dim"):
        attention_with_lse(q, k, v, backend="sdpa_flash")  # a named backend is used as is


# -- on a GPU ---------------------------------------------------------------------------------------

GPU_BACKENDS = ["flash3", "flash2", "sage", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math"]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_cuda_backend_equals_float64_softmax_and_sdpa(name, dtype):
    _check_backend(name, dtype, "cuda")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", [n for n in GPU_BACKENDS if BACKENDS[n].with_lse is not None])
def test_every_cuda_lse_kernel_splits_the_identity_like_the_concatenation(name):
    q, k, v = _qkv(torch.bfloat16, "cuda", sq=300, sk=300, h=4, d=128)
    _runnable(name, q, lse=True)
    configure_attention(name)
    k_id, v_id = _qkv(torch.bfloat16, "cuda", sq=1, sk=40, b=1, h=4, d=128)[1:]
    split = restricted_attention(q, k, v, (k_id, v_id), split_kv=True)
    concat = restricted_attention(q, k, v, (k_id, v_id), split_kv=False)
    assert _rel(split, concat) <= (SAGE_TOLERANCE if name == "sage" else 1e-2)
    assert BACKEND_CALLS[f"{name}+lse"] == 2


# -- the benchmark ----------------------------------------------------------------------------------


def test_the_benchmark_reports_every_cpu_backend_and_both_identity_paths(tmp_path):
    from benchmarks import attention as bench

    report = bench.main(["--tokens", "42", "--heads", "2", "--reps", "1", "--dtypes", "fp32",
                         "--out-dir", str(tmp_path)])
    (row,) = report["rows"]
    assert set(row["backend_s"]) == set(ON_CPU) and row["backend_over_auto"]["sdpa_flash"] == 1.0
    assert row["identity_tokens"] == 2 and row["split_over_concat"] > 0
    assert (tmp_path / "attention_cpu.json").exists() and (tmp_path / "attention_cpu.png").exists()
    real = report["real_case"]["bytes_per_call_per_gpu"]
    # Wan 14B 480p on 8 GPUs: the copy moves 4·(S + S_id) video-sized rows, the merge more
    assert real["concat_copy"] == 4 * (32760 + 1560) * 5 * 128 * 2
    assert real["concat_copy"] < real["split_fused_bf16_merge"] < real["split_as_implemented"]
