"""Which backend runs: the setting (`configure_attention`, else `STANDIN_ATTENTION`), what the
inputs allow, the once-per-process log line, and the fallback of a kernel that refused an input."""

from __future__ import annotations

import logging
import os
from collections import Counter

import torch

from standin.attention.backends import BACKENDS, PACKAGES, Backend, installed

__all__ = [
    "AUTO",
    "BACKEND_CALLS",
    "CHOICES",
    "ENV_VAR",
    "choose",
    "configure_attention",
    "configured_setting",
    "note_call",
    "note_failure",
    "select_backend",
    "select_lse_backend",
]

ENV_VAR = "STANDIN_ATTENTION"
AUTO = "auto"
CHOICES = (AUTO, *BACKENDS)
# Kernel calls that ran, by backend ("<name>+lse" for log-sum-exp calls). Eager calls only: a
# compiled graph runs its kernels without this Python.
BACKEND_CALLS: Counter = Counter()
# Where a refusing kernel's calls go instead: exact kernels that take any input.
FALLBACK = {False: "sdpa", True: "chunked"}

log = logging.getLogger(__name__)
_configured: str | None = None  # configure_attention's setting; None: the environment decides
_logged: set[tuple[str, ...]] = set()
_failed: set[tuple[str, bool]] = set()  # (backend, lse) that raised on an input: not tried again


def _validate(name: str, source: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(CHOICES)}; got {name!r}")
    if not installed(name):
        raise ValueError(f"{source}={name} needs the {PACKAGES[name]} package, which is not installed")
    return name


def configure_attention(name: str | None) -> str:
    """Set this process's attention backend (a server calls it once at replica start).

    name: one of `CHOICES` ("auto" picks by device, dtype and head dim); None hands the choice
    back to the `STANDIN_ATTENTION` environment variable. A name that is not a choice, or whose
    package is missing, raises ValueError now rather than at the first request. Returns the
    setting in force.
    """
    global _configured
    _configured = None if name is None else _validate(name, "attention backend")
    return configured_setting()


def configured_setting() -> str:
    """The setting in force: `configure_attention`'s, else `STANDIN_ATTENTION`, else "auto"."""
    if _configured is not None:
        return _configured
    forced = os.environ.get(ENV_VAR)
    return _validate(forced, ENV_VAR) if forced else AUTO


def _auto(q: torch.Tensor, lse: bool) -> Backend:
    """The first kernel in the package docstring's order that runs queries like q."""
    if q.is_cuda:
        half = q.dtype in (torch.float16, torch.bfloat16)
        order = ("flash3", "flash2", "sdpa_flash", "sdpa_efficient") if half else ("sdpa_efficient",)
    else:
        order = ("sdpa_flash",)
    for name in order:
        if BACKENDS[name].refuses(q) is None:
            return BACKENDS[name]
    return BACKENDS[FALLBACK[lse]]


def choose(q: torch.Tensor, lse: bool) -> Backend:
    """The backend for queries like q [B, S, H, D]; lse: the caller needs the log-sum-exp."""
    setting = configured_setting()
    if setting == AUTO:
        backend = _auto(q, lse)
    else:
        backend = BACKENDS[setting]
        reason = backend.refuses(q)
        if reason is None and lse and backend.with_lse is None:
            reason = "it returns no log-sum-exp"
        if reason is not None:
            backend = _auto(q, lse)
            _log_once(("refused", setting, str(lse), str(q.device.type), str(q.dtype)), logging.WARNING,
                      "attention: %s cannot run %s on %s (%s); using %s", setting, _dtype_name(q.dtype),
                      q.device.type, reason, backend.name)
    if (backend.name, lse) in _failed:
        return BACKENDS[FALLBACK[lse]]
    return backend


def select_backend(q: torch.Tensor) -> str:
    """The backend `attention` runs for queries like q [B, S, H, D]."""
    return choose(q, lse=False).name


def select_lse_backend(q: torch.Tensor) -> str:
    """The backend `attention_with_lse` runs for queries like q [B, S, H, D]."""
    return choose(q, lse=True).name


def _dtype_name(dtype: torch.dtype) -> str:
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
    return short.get(dtype, str(dtype).removeprefix("torch."))


def _log_once(key: tuple[str, ...], level: int, msg: str, *args: object) -> None:
    if torch.compiler.is_compiling():  # a log call would break the graph; eager calls log it
        return
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg, *args)


def note_call(backend: Backend, q: torch.Tensor, lse: bool) -> None:
    """Count one kernel call; log the first per backend, device and dtype.

    The line reads e.g. "attention: flash3 (bf16, cuda:0)".
    """
    if torch.compiler.is_compiling():  # traced once, run many times: a count here would be wrong
        return
    key = f"{backend.name}+lse" if lse else backend.name
    BACKEND_CALLS[key] += 1
    device = str(q.device)
    _log_once(("call", key, device, str(q.dtype)), logging.INFO, "attention: %s (%s, %s)",
              key.replace("+lse", " with log-sum-exp"), _dtype_name(q.dtype), device)


def note_failure(backend: Backend, lse: bool, exc: Exception) -> Backend:
    """A fused kernel raised on an input: log it once, send this and later calls to the fallback."""
    _failed.add((backend.name, lse))
    fallback = BACKENDS[FALLBACK[lse]]
    log.warning("attention: %s%s failed (%s); using %s from now on",
                backend.name, " with log-sum-exp" if lse else "", exc, fallback.name)
    return fallback
