"""One-time conversion of a Wan2.1 checkpoint directory to bf16 DiT shards.

The official 14B DiT ships as float32 safetensors shards (≈ 57 GB); every start of a replica
reads them and converts to bf16 on the CPU. Converted once, the read halves (≈ 29 GB) and the
conversion disappears. The output directory is a complete checkpoint directory: the DiT shards
are rewritten in bf16 (same keys, same shard layout and index; the parameters a bf16 DiT keeps
in float32 — `standin.dit.keeps_float32`, ≈ 1.3 % of 14B's parameters — stay float32), the
Stand-In LoRA is re-saved in bf16 under its own name, and every other entry (umT5, VAE,
tokenizer) is linked, not copied.

    standin convert /models/Wan2.1-T2V-14B /models/Wan2.1-T2V-14B-bf16
    # then checkpoint_dir: /models/Wan2.1-T2V-14B-bf16

Shards are converted one at a time (memory: one shard), and the output is written to a
temporary name first and renamed at the end, so an interrupted conversion never leaves a
directory that looks complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from standin.checkpoints import check_file, diffusers_to_official, shard_files
from standin.dit import keeps_float32
from standin.errors import CheckpointError
from standin.presets import STANDIN_FILE

__all__ = ["add_arguments", "convert_checkpoint", "main"]

log = logging.getLogger(__name__)


def _stored_dtype(key: str, dtype: torch.dtype) -> torch.dtype:
    """float32 for the parameters a bf16 DiT keeps in float32 (official or diffusers key), else dtype."""
    return torch.float32 if keeps_float32(diffusers_to_official(key) or key) else dtype


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def convert_checkpoint(
    src: Path, dst: Path, dtype: torch.dtype = torch.bfloat16, standin_file: str = STANDIN_FILE
) -> dict[str, float]:
    """Write `dst` = `src` with the DiT shards (and the Stand-In LoRA, if present) in `dtype`.

    Returns bytes read, bytes written and seconds. Raises CheckpointError when `src` has no DiT
    shards or `dst` exists.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    if dst.exists():
        raise CheckpointError(f"{dst} exists; converting never overwrites (remove it first)")
    shards = shard_files(src)
    start = time.perf_counter()
    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    read = written = 0
    for path in shards:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            # what a bf16 DiT keeps in float32 (standin/dit.py) stays float32 on disk too
            tensors = {
                key: _to(f.get_tensor(key), _stored_dtype(key, dtype)).contiguous()
                for key in f.keys()  # noqa: SIM118
            }
            metadata = f.metadata()
        save_file(tensors, str(tmp / path.name), metadata=metadata)
        read += path.stat().st_size
        written += (tmp / path.name).stat().st_size
        log.info("converted %s (%.1f GB → %.1f GB)", path.name, path.stat().st_size / 1e9,
                 (tmp / path.name).stat().st_size / 1e9)
        del tensors
    converted = {p.name for p in shards}
    for index in src.glob("*.safetensors.index.json"):
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / index.name).write_text(json.dumps(data, indent=1))
        converted.add(index.name)
    lora = src / standin_file
    if lora.exists():
        check_file(lora, "Stand-In checkpoint")
        state = torch.load(str(lora), map_location="cpu", weights_only=True, mmap=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        torch.save({k: _to(v, dtype) for k, v in state.items()}, str(tmp / standin_file))
        read += lora.stat().st_size
        written += (tmp / standin_file).stat().st_size
        converted.add(standin_file)
    for entry in sorted(src.iterdir()):
        if entry.name not in converted:
            (tmp / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    tmp.rename(dst)
    seconds = time.perf_counter() - start
    log.info("wrote %s: read %.1f GB, wrote %.1f GB in %.0f s", dst, read / 1e9, written / 1e9, seconds)
    return {"bytes_read": read, "bytes_written": written, "seconds": seconds}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `convert` command's arguments (for the CLI's subparser)."""
    parser.add_argument("src", type=Path, help="the official checkpoint directory")
    parser.add_argument("dst", type=Path, help="the new directory (must not exist)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--standin-file", default=STANDIN_FILE, help="the Stand-In LoRA's file name in src")


def main(args: argparse.Namespace) -> int:
    """Run the `convert` command (`args` from `add_arguments`)."""
    stats = convert_checkpoint(args.src, args.dst, getattr(torch, args.dtype), args.standin_file)
    print(f"{args.dst}: {stats['bytes_written'] / 1e9:.1f} GB written in {stats['seconds']:.0f} s; "
          f"use it as checkpoint_dir")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(prog="python -m standin.convert", description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
