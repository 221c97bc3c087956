"""`standin train`: the tiny preset's synthetic run, or the paper's recipe on a folder of clips.

    standin train --recipe demo --out standin/weights              # regenerate the shipped tiny model
    torchrun --nproc_per_node 8 -m standin.cli train --recipe lora \\
        --preset wan2.1-t2v-14b --checkpoint-dir Wan2.1-T2V-14B --data clips/ --out run1 \\
        --dtype bfloat16 --gradient-checkpointing                   # real presets, one node of GPUs

Under torchrun (WORLD_SIZE > 1) it trains data parallel: NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from standin.checkpoints import load_wan_dit
from standin.config import DTYPES
from standin.dit import WanDiT
from standin.errors import CheckpointError
from standin.experts import HIGH, LOW, expert_timestep_range
from standin.pipeline import WAN_NEGATIVE_PROMPT, StandInPipeline
from standin.presets import PRESETS, VAE_FILE, ModelPreset, get_preset
from standin.text_encoder import TextEncoder
from standin.training.trainer import RECIPES, TrainConfig, add_identity_lora, is_lora, train
from standin.vae import load_wan_vae
from standin.wan22 import expert_dirs

log = logging.getLogger(__name__)

LORA_FILE = "Stand-In_wan2.1_T2V_14B.ckpt"
DIT_FILE = "diffusion_pytorch_model.safetensors"
# fp16 autocast would need loss scaling: train in float32 or bfloat16 only
TRAIN_DTYPES = ("bfloat16", "float32")


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train Stand-In (tiny: synthetic identities; real presets: --data)")
    p.add_argument(
        "--recipe",
        required=True,
        choices=(*RECIPES, "style", "vace"),
        help="lora: the paper's (base frozen); demo: all unfrozen + reference dropout; base: T2V; "
        "style: the tiny palette-swap style LoRA (examples/tiny_palette_style.safetensors); "
        "vace: the tiny VACE branch (standin/weights/tiny_vace.safetensors)",
    )
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument(
        "--data", type=Path, help="folder of clip.mp4 + clip.txt + clip.png (omit for tiny: synthetic)"
    )
    p.add_argument("--checkpoint-dir", type=Path, help="Wan2.1 checkpoint directory (real presets)")
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="output directory")
    p.add_argument("--steps", type=int, help="training steps (--data), default 1000")
    p.add_argument(
        "--steps-scale", type=float, default=1.0, help="tiny synthetic run: scale every stage's steps"
    )
    p.add_argument("--batch-size", type=int, default=1, help="per-rank batch (--data)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (--data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, help="training width (--data; preset default)")
    p.add_argument("--height", type=int, help="training height (--data; preset default)")
    p.add_argument("--frames", type=int, help="frames per clip, 4k+1 (--data; preset default)")
    p.add_argument("--reference-dropout", type=float, default=0.1, help="demo recipe only")
    p.add_argument("--dtype", choices=TRAIN_DTYPES, help="autocast dtype (default: bfloat16 on GPU)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument("--device", help="cuda, cpu (default: cuda:LOCAL_RANK if present)")
    p.add_argument(
        "--expert",
        choices=(HIGH, LOW),
        help="two-expert presets (Wan2.2 A14B, tiny-a14b): train this expert's identity LoRA, on "
        "timesteps from its range only (high: t >= 875, low: t < 875); one expert per run",
    )


def run_train(args: argparse.Namespace) -> Path:
    """Dispatch: synthetic tiny run, or folder training (data parallel under torchrun)."""
    if args.recipe == "vace":
        if args.preset != "tiny" or args.data is not None:
            raise SystemExit("error: --recipe vace trains the tiny preset's VACE branch (synthetic clips)")
        from standin.training.vace_recipe import VaceSchedule, train_vace

        vace_schedule = VaceSchedule()
        vace_schedule.steps = args.steps or max(1, round(vace_schedule.steps * args.steps_scale))
        return train_vace(args.out / "tiny_vace.safetensors", seed=args.seed, schedule=vace_schedule)
    if args.recipe == "style":
        if args.preset != "tiny" or args.data is not None:
            raise SystemExit("error: --recipe style trains the tiny preset's synthetic style only")
        from standin.training.tiny_style import STYLE_FILE, StyleSchedule, train_style

        schedule = StyleSchedule()
        schedule.steps = args.steps or max(1, round(schedule.steps * args.steps_scale))
        return train_style(args.out / STYLE_FILE.name, seed=args.seed, schedule=schedule)
    preset = get_preset(args.preset)
    if preset.experts is not None and (args.expert is None or args.data is None):
        raise SystemExit(f"error: {preset.name} trains one expert at a time: --expert high|low and --data")
    if preset.experts is None and args.expert is not None:
        raise SystemExit(f"error: --expert applies to two-expert presets, not {preset.name}")
    if args.data is None:
        if args.preset != "tiny":
            raise SystemExit("error: real presets train on --data (a folder of clips)")
        from standin.training.tiny_recipe import TinySchedule, train_tiny

        out = args.out / "tiny.safetensors"
        train_tiny(args.recipe, out, seed=args.seed, schedule=TinySchedule().scaled(args.steps_scale))
        return out
    return _train_on_folder(args)


def _init_distributed(device_arg: str | None) -> torch.device:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device_arg is None or device_arg.startswith("cuda"))
    device = torch.device(f"cuda:{local}" if cuda else (device_arg or "cpu"))
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    return device


def _load_for_training(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> StandInPipeline:
    preset = get_preset(args.preset)
    if preset.experts is not None:
        return _load_expert_for_training(args, preset, device, dtype)
    if not preset.needs_checkpoint:
        pipe = StandInPipeline.from_preset(preset, device=device, dtype=torch.float32)
        pipe.dit.to(dtype)
        return pipe
    if args.checkpoint_dir is None:
        raise SystemExit(f"error: preset {preset.name} needs --checkpoint-dir")
    # The base alone: the identity LoRA starts fresh (up = 0), as in the paper.
    dit = load_wan_dit(args.checkpoint_dir, preset.dit, dtype=dtype, device=device)
    add_identity_lora(dit, preset.dit.lora_rank, seed=args.seed)
    vae = load_wan_vae(args.checkpoint_dir / VAE_FILE, dtype=torch.float32, device=device, config=preset.vae)
    text = TextEncoder.from_checkpoint_dir(
        args.checkpoint_dir, dtype=dtype, device=device, config=preset.text
    )
    return StandInPipeline(dit, vae, text, preset)


def _load_expert_for_training(
    args: argparse.Namespace, preset: ModelPreset, device: torch.device, dtype: torch.dtype
) -> StandInPipeline:
    """One expert of a two-expert preset as a one-DiT pipeline: tiny-a14b's shipped expert (its
    LoRA trains on), or a Wan2.2 expert's base with a fresh identity LoRA (up = 0)."""
    layout = preset.experts
    if not preset.needs_checkpoint:
        pipe = StandInPipeline.from_preset(preset, device=device, dtype=torch.float32)
        dit = pipe.experts.residency.activate(args.expert).to(dtype)
        return StandInPipeline(dit, pipe.vae, pipe.text_encoder, preset)
    if args.checkpoint_dir is None:
        raise SystemExit(f"error: preset {preset.name} needs --checkpoint-dir")
    dirs, missing = expert_dirs(args.checkpoint_dir, layout)
    if any(f"{args.expert}-noise" in m for m in missing):
        raise CheckpointError("missing checkpoint files:\n  " + "\n  ".join(missing))
    dit = load_wan_dit(dirs[args.expert], preset.dit, dtype=dtype, device=device)
    add_identity_lora(dit, preset.dit.lora_rank, seed=args.seed)
    vae = load_wan_vae(args.checkpoint_dir / VAE_FILE, dtype=torch.float32, device=device, config=preset.vae)
    text = TextEncoder.from_checkpoint_dir(
        args.checkpoint_dir, dtype=dtype, device=device, config=preset.text
    )
    return StandInPipeline(dit, vae, text, preset)


def _expert_training(args: argparse.Namespace) -> tuple[tuple[float, float] | None, str]:
    """The timestep range and LoRA file name of this run (the whole range and Wan2.1's file
    unless --expert picks one expert of a two-expert preset)."""
    layout = get_preset(args.preset).experts
    if layout is None or args.expert is None:
        return None, LORA_FILE
    return expert_timestep_range(args.expert, layout.boundary), layout.standin_file(args.expert)


def _train_on_folder(args: argparse.Namespace) -> Path:
    from standin.training.video_folder import FolderLatents, encode_folder

    device = _init_distributed(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe = _load_for_training(args, device, dtype)
    p = pipe.preset
    files = encode_folder(
        args.data, pipe, args.width or p.width, args.height or p.height, args.frames or p.num_frames
    )
    null = pipe.text_encoder.encode_prompts([WAN_NEGATIVE_PROMPT]).float()
    source = FolderLatents(files, null, device)
    cfg = TrainConfig(
        args.recipe,
        args.steps or 1000,
        args.batch_size,
        args.lr,
        warmup=min(100, (args.steps or 1000) // 10),
        seed=args.seed,
        reference_dropout=args.reference_dropout if args.recipe == "demo" else 0.0,
        gradient_checkpointing=args.gradient_checkpointing,
        dtype=dtype,
        log_every=10,
        timestep_range=_expert_training(args)[0],
    )
    train(pipe.dit, source, cfg)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_official(pipe.dit, args.out, args.recipe, dtype, _expert_training(args)[1])
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return args.out


def save_official(
    dit: WanDiT, out: Path, recipe: str, dtype: torch.dtype, lora_file: str = LORA_FILE
) -> list[Path]:
    """The LoRA as Stand-In's pickle (`blocks.{i}.self_attn.{q,k,v}_loras.{down,up}.weight`,
    named `lora_file`: one Wan2.2 expert's is `Stand-In_wan2.2_T2V_A14B_{high,low}.ckpt`) and,
    when the base trained too, the base DiT as `diffusion_pytorch_model.safetensors`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in dit.state_dict().items()}
    written = []
    lora = {k: v for k, v in state.items() if is_lora(k)}
    if lora:
        torch.save(lora, out / lora_file)
        written.append(out / lora_file)
    if recipe != "lora":
        save_file({k: v for k, v in state.items() if not is_lora(k)}, str(out / DIT_FILE))
        written.append(out / DIT_FILE)
    log.info("wrote %s", ", ".join(str(p) for p in written))
    return written
