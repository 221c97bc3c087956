"""Flow-matching training of the Stand-In DiT: base text-to-video, then the identity branch.

Recipes (which parameters train, and how the reference is used):

- ``base``: plain Wan2.1 text-to-video (stage 1 of the tiny preset); no reference, LoRA untouched.
- ``lora``: the paper's recipe: the base DiT frozen, only the rank-r identity LoRA on Q/K/V of
  identity tokens trains; every example has its reference.
- ``demo``: everything unfrozen, with reference dropout (some examples train without their
  reference, so the model still draws plain text-to-video). On the tiny preset, with the same
  CPU budget, it keeps identity clearly better than ``lora`` on the frozen, weak base (README).

Timesteps are drawn the way the sampler visits them: a uniform index into the shifted sigma
schedule of `FlowMatchSchedule` (shift 5 by default), ``x_t = (1 - s) x_0 + s noise``, target
velocity ``noise - x_0``. The identity K/V come from the same `WanDiT.identity_cache` inference
uses, with autograd on, so gradients reach the LoRA (and, in ``demo``, the base) through them.

Data parallel: each rank draws its own batches; gradients are averaged with one all-reduce per
step (no overlap with the backward pass; simple and exact). Works with gloo on CPU and NCCL on GPU.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
import torch.distributed as dist
from torch import nn

from standin.dit import WanDiT
from standin.forward_plan import LOCAL, ForwardPlan, checkpointed_blocks
from standin.lora import LoRA
from standin.scheduler import DEFAULT_SHIFT, FlowMatchSchedule

log = logging.getLogger(__name__)

RECIPES = ("base", "lora", "demo")


class LatentBatch(NamedTuple):
    """One batch, already encoded. Shapes: latents [B, 16, F, h, w], context [B, L, text_dim],
    identity [B, 16, 1, h', w'] or None, weight [B, 1, F, h, w] (per-element loss weight) or None."""

    latents: torch.Tensor
    context: torch.Tensor
    identity: torch.Tensor | None
    weight: torch.Tensor | None


class LatentSource(Protocol):
    """Anything that draws encoded training batches (synthetic data, a folder of clips)."""

    null_context: torch.Tensor  # [1, L, text_dim]: the prompt-dropout context (negative prompt)

    def sample(self, batch_size: int, generator: torch.Generator) -> LatentBatch: ...


@dataclass
class TrainConfig:
    """Hyper-parameters of one training stage."""

    recipe: str
    steps: int
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    seed: int = 0
    shift: float = DEFAULT_SHIFT
    # [low, high) DiT timesteps to train on (one Wan2.2 expert's range); None: all of them
    timestep_range: tuple[float, float] | None = None
    # demo: train this fraction of examples without their reference (keeps text-to-video alive)
    reference_dropout: float = 0.0
    # replace the prompt by the null (negative-prompt) context, so that CFG has an unconditional
    prompt_dropout: float = 0.1
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    # autocast dtype of the forward (bf16 on GPUs); trainable weights stay float32
    dtype: torch.dtype = torch.float32
    log_every: int = 100
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of {RECIPES}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not 0 <= self.reference_dropout < 1 or not 0 <= self.prompt_dropout < 1:
            raise ValueError("dropout probabilities must be in [0, 1)")


# -- what trains ------------------------------------------------------------------------


def is_lora(name: str) -> bool:
    return "_loras." in name


def select_trainable(dit: WanDiT, recipe: str) -> list[nn.Parameter]:
    """Set requires_grad per recipe and return the trainable parameters (made float32)."""
    if recipe == "lora" and dit.config.lora_rank == 0:
        raise ValueError("recipe 'lora' needs a DiT with identity LoRA (lora_rank > 0)")
    trainable = []
    for name, p in dit.named_parameters():
        train = {"base": not is_lora(name), "lora": is_lora(name), "demo": True}[recipe]
        p.requires_grad_(train)
        if train:
            p.data = p.data.float()  # optimizer state and updates in float32, whatever the base dtype
            trainable.append(p)
    return trainable


def add_identity_lora(dit: WanDiT, rank: int, seed: int = 0) -> WanDiT:
    """Give a DiT loaded without LoRA (plain Wan2.1) fresh identity LoRAs of `rank` (up = 0)."""
    from dataclasses import replace

    gen_state = torch.random.fork_rng(devices=[])
    with gen_state:
        torch.manual_seed(seed)
        device = dit.patch_embedding.weight.device
        for block in dit.blocks:
            sa = block.self_attn
            dim = sa.q.in_features
            for name in ("q_loras", "k_loras", "v_loras"):
                setattr(sa, name, LoRA(dim, dim, rank).to(device))
            sa.has_lora = True
    dit.config = replace(dit.config, lora_rank=rank)
    return dit


# -- the loss -----------------------------------------------------------------------------

CHECKPOINTED = ForwardPlan(run_block=checkpointed_blocks)


def sample_sigmas(
    n: int, shift: float, generator: torch.Generator, timestep_range: tuple[float, float] | None = None
) -> torch.Tensor:
    """[n] noise levels drawn uniformly from the sampler's own shifted schedule (1000 points).

    `timestep_range` [low, high): only the points whose timestep (1000 · sigma) lies there, e.g.
    one Wan2.2 expert's (`standin.experts.expert_timestep_range`)."""
    schedule = FlowMatchSchedule(1000, shift=shift)
    sigmas = schedule.sigmas[:-1]
    if timestep_range is not None:
        t = sigmas * 1000
        sigmas = sigmas[(t >= timestep_range[0]) & (t < timestep_range[1])]
        if len(sigmas) == 0:
            raise ValueError(f"no timestep of the schedule lies in {timestep_range}")
    idx = torch.randint(0, len(sigmas), (n,), generator=generator)
    return sigmas[idx]


def predict_velocity(
    dit: WanDiT,
    noisy: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    identity_latents: torch.Tensor | None,
    gradient_checkpointing: bool = False,
) -> torch.Tensor:
    """The DiT's velocity for noisy latents [B, 16, F, h, w]; identity built like inference does.

    The model's own forward and identity cache; `gradient_checkpointing` recomputes every block
    (video and identity) in the backward pass."""
    plan = CHECKPOINTED if gradient_checkpointing else LOCAL
    cache = None
    if identity_latents is not None:
        cache = dit.identity_cache(identity_latents, noisy.shape, plan=plan)
    return dit(noisy, timestep, context, cache, plan=plan)


def flow_matching_loss(
    dit: WanDiT,
    batch: LatentBatch,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    *,
    use_identity: torch.Tensor | None = None,
    gradient_checkpointing: bool = False,
) -> torch.Tensor:
    """Per-example weighted MSE [B] between predicted and true velocity.

    sigma [B], noise like latents. `use_identity` [B] bool picks the examples that see their
    reference (default: all, when the batch has references); the others run without one.
    """
    x0 = batch.latents
    s = sigma.view(-1, 1, 1, 1, 1).to(x0)
    noisy = (1 - s) * x0 + s * noise
    target = noise - x0
    t = sigma.to(x0) * 1000
    b = x0.shape[0]
    pred = torch.empty_like(target)
    if batch.identity is None:
        use_identity = torch.zeros(b, dtype=torch.bool)
    elif use_identity is None:
        use_identity = torch.ones(b, dtype=torch.bool)
    use_identity = use_identity.to(x0.device)
    # Two sub-batches: an identity cache is per request, so with and without run separately.
    for flag in (True, False):
        idx = torch.nonzero(use_identity == flag).flatten()
        if len(idx) == 0:
            continue
        ident = batch.identity[idx] if flag else None
        pred[idx] = predict_velocity(
            dit, noisy[idx], t[idx], batch.context[idx], ident, gradient_checkpointing
        ).to(pred.dtype)
    err = (pred.float() - target.float()).pow(2)
    if batch.weight is not None:
        w = batch.weight.expand_as(err)
        return (err * w).flatten(1).sum(1) / w.flatten(1).sum(1)
    return err.flatten(1).mean(1)


# -- the loop -----------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_grads(params: list[nn.Parameter], world_size: int) -> None:
    """Average gradients over ranks in one flat buffer (params without grad count as zero)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def check_replicas_in_sync(params: list[nn.Parameter]) -> None:
    """Raise if the ranks' weights differ (a broken data-parallel setup would drift silently)."""
    _, world = _world()
    if world == 1:
        return
    total = torch.stack([p.detach().float().sum() for p in params]).sum().reshape(1)
    # torch.stack of 64-bit sums keeps the check meaningful for large models
    gathered = [torch.zeros_like(total) for _ in range(world)]
    dist.all_gather(gathered, total.contiguous())
    if not all(torch.allclose(g, gathered[0], rtol=1e-6, atol=1e-6) for g in gathered):
        raise RuntimeError(f"data-parallel replicas diverged: {[float(g) for g in gathered]}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 5 % of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    dit: WanDiT,
    source: LatentSource,
    cfg: TrainConfig,
    *,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train `dit` in place for `cfg.steps` steps (data parallel when a process group is up).

    Each rank draws its own batches from its own seed; `cfg.batch_size` is per rank.
    Returns the last logged statistics.
    """
    rank, world = _world()
    device = dit.patch_embedding.weight.device
    params = select_trainable(dit, cfg.recipe)
    dit.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    n_params = sum(p.numel() for p in params)
    log.info(
        "recipe %s: %d trainable parameters, %d steps x %d x %d ranks",
        cfg.recipe,
        n_params,
        cfg.steps,
        cfg.batch_size,
        world,
    )
    started, running, stats = time.perf_counter(), 0.0, {}
    autocast = torch.autocast(device.type, dtype=cfg.dtype, enabled=cfg.dtype != torch.float32)
    for step in range(cfg.steps):
        batch = source.sample(cfg.batch_size, gen)
        if cfg.recipe == "base":
            batch = batch._replace(identity=None)
        b = batch.latents.shape[0]
        drop_prompt = torch.rand(b, generator=gen) < cfg.prompt_dropout
        if drop_prompt.any():
            ctx = batch.context.clone()
            ctx[drop_prompt.to(ctx.device)] = source.null_context.to(ctx)
            batch = batch._replace(context=ctx)
        use_identity = torch.rand(b, generator=gen) >= cfg.reference_dropout
        sigma = sample_sigmas(b, cfg.shift, gen, cfg.timestep_range).to(device)
        noise = torch.randn(batch.latents.shape, generator=gen).to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with autocast:
            loss = flow_matching_loss(
                dit,
                batch,
                sigma,
                noise,
                use_identity=use_identity,
                gradient_checkpointing=cfg.gradient_checkpointing,
            ).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            _all_reduce_grads(params, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        value = loss.item()
        running = value if step == 0 else 0.98 * running + 0.02 * value
        if (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
            stats = {
                "loss": running,
                "grad_norm": float(grad_norm),
                "lr": lr_at(step, cfg),
                "seconds": time.perf_counter() - started,
            }
            if rank == 0:
                log.info(
                    "%s step %d/%d  loss %.4f  grad %.3f  (%.0fs)",
                    cfg.recipe,
                    step + 1,
                    cfg.steps,
                    running,
                    stats["grad_norm"],
                    stats["seconds"],
                )
            if on_log is not None:
                on_log(step + 1, stats)
    dit.eval().requires_grad_(False)
    check_replicas_in_sync(params)
    return stats
