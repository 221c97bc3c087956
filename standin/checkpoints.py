"""Strict, memory-lean loading of the official checkpoint files.

Models are built on the meta device (no memory), then every tensor is read from its file
straight into the target dtype/device and assigned to the module: there is never a second
full copy of the weights. Any missing, unexpected or mis-shaped key is a `CheckpointError`
that names the key and the file it came from (or should have come from).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from standin.config import DiTConfig
from standin.dit import WanDiT, keeps_float32
from standin.errors import CheckpointError

log = logging.getLogger(__name__)

# Tensors by key, and the file each came from (for error messages).
TensorSource = tuple[torch.Tensor, str]

# Official Wan2.1 DiT shard names; a single-file checkpoint is accepted too.
WAN_DIT_SHARD_PATTERN = "diffusion_pytorch_model*.safetensors"
LFS_POINTER_PREFIX = b"version https://git-lfs"
DIFFUSERS_TRANSFORMER = "transformer"  # the DiT's folder in a diffusers checkpoint directory


def check_file(path: Path, what: str) -> None:
    """Raise a `CheckpointError` unless `path` is a real (non-pointer, non-empty) file."""
    if not path.exists():
        raise CheckpointError(f"missing {what}: {path}")
    if not path.is_file():
        raise CheckpointError(f"{what} is not a file: {path}")
    with path.open("rb") as f:
        head = f.read(len(LFS_POINTER_PREFIX))
    if not head:
        raise CheckpointError(f"{what} is empty: {path}")
    if head == LFS_POINTER_PREFIX:
        raise CheckpointError(
            f"{what} is a git-lfs pointer, not the weights (run `git lfs pull`): {path}"
        )


def _convert(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)


def read_safetensors(
    paths: Iterable[Path],
    *,
    dtype: torch.dtype | None,
    device: torch.device | str = "cpu",
    rename: Callable[[str], str | None] | None = None,
    float32_keys: Callable[[str], bool] | None = None,
) -> dict[str, TensorSource]:
    """Read every tensor of the given safetensors files, converted on the way in.

    `rename` maps a file key to a model key (None drops the key); model keys for which
    `float32_keys` is true are read as float32 whatever `dtype` says.
    """
    out: dict[str, TensorSource] = {}
    for path in paths:
        check_file(path, "checkpoint shard")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    name = rename(key) if rename else key
                    if name is None:
                        continue
                    if name in out:
                        raise CheckpointError(
                            f"key {name} appears in both {out[name][1]} and {path.name}"
                        )
                    want = torch.float32 if float32_keys is not None and float32_keys(name) else dtype
                    out[name] = (_convert(f.get_tensor(key), want, device), path.name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {path}: {e}") from e
    return out


def read_torch_pickle(
    path: Path,
    *,
    dtype: torch.dtype | None,
    device: torch.device | str = "cpu",
    rename: Callable[[str], str | None] | None = None,
) -> dict[str, TensorSource]:
    """Read a `torch.save`d state dict (optionally under "state_dict") with weights_only=True."""
    check_file(path, "checkpoint")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as a torch checkpoint: {e}") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    out: dict[str, TensorSource] = {}
    for key, t in obj.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path.name}: entry {key} is a {type(t).__name__}, not a tensor")
        name = rename(key) if rename else key
        if name is not None:
            out[name] = (_convert(t, dtype, device), path.name)
    return out


def load_strict(module: nn.Module, tensors: Mapping[str, TensorSource], expected_in: str) -> None:
    """Assign `tensors` to `module` (which may live on the meta device), strictly.

    `expected_in` names where missing keys should have been found (for the error message).
    """
    own = module.state_dict(keep_vars=True)
    missing = [k for k in own if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing {missing[0]}{more} in {expected_in}")
    unexpected = [k for k in tensors if k not in own]
    if unexpected:
        k = unexpected[0]
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"unexpected key {k}{more} in {tensors[k][1]}")
    for key, param in own.items():
        t, source = tensors[key]
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{key} in {source} has shape {tuple(t.shape)}, the model expects {tuple(param.shape)}"
            )
    module.load_state_dict({k: t for k, (t, _) in tensors.items()}, strict=True, assign=True)


def shard_files(directory: Path, pattern: str = WAN_DIT_SHARD_PATTERN) -> list[Path]:
    """The safetensors shards of a checkpoint directory, complete per its index if it has one;
    a directory in the diffusers layout keeps them in its `transformer/` folder."""
    index_files = sorted(directory.glob(pattern.replace("*.safetensors", "*.safetensors.index.json")))
    if index_files:
        with index_files[0].open() as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        paths = [directory / n for n in names]
        for p in paths:
            check_file(p, f"shard listed in {index_files[0].name}")
        return paths
    paths = sorted(directory.glob(pattern))
    if not paths and (directory / DIFFUSERS_TRANSFORMER).is_dir():
        return shard_files(directory / DIFFUSERS_TRANSFORMER, pattern)
    if not paths:
        raise CheckpointError(f"no {pattern} files in {directory}")
    return paths


def save_safetensors_shards(
    state_dict: Mapping[str, torch.Tensor], directory: Path, num_shards: int, stem: str
) -> list[Path]:
    """Write `state_dict` as `{stem}-0000i-of-0000n.safetensors` + index, the official layout."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    keys = list(state_dict)
    per = -(-len(keys) // num_shards)
    weight_map: dict[str, str] = {}
    paths = []
    for i in range(num_shards):
        name = f"{stem}-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {k: state_dict[k].detach().contiguous().cpu() for k in keys[i * per : (i + 1) * per]}
        save_file(chunk, str(directory / name))
        weight_map.update(dict.fromkeys(chunk, name))
        paths.append(directory / name)
    with (directory / f"{stem}.safetensors.index.json").open("w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    return paths


# -- the Wan2.1 DiT (+ Stand-In LoRA) -----------------------------------------------------

STANDIN_LORA_FILE = "Stand-In_wan2.1_T2V_14B.ckpt"

# diffusers' WanTransformer3DModel names → official Wan2.1 names, per block and top level
# (checkpoints and style LoRAs in the diffusers layout). In diffusers `norm2` is the
# cross-attention norm (ours `norm3`) and `norm3` the parameter-free FFN norm (ours `norm2`).
DIFFUSERS_BLOCK_NAMES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "scale_shift_table": "modulation",
}
DIFFUSERS_TOP_NAMES = {
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "patch_embedding": "patch_embedding",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}


def diffusers_to_official(key: str) -> str | None:
    """Rename a diffusers Wan transformer key to the official Wan2.1 key (None if unknown)."""
    parts = key.split(".")
    if parts[0] == "blocks" and len(parts) > 2:
        stem, leaf = ".".join(parts[2:]), None
        if stem not in DIFFUSERS_BLOCK_NAMES:
            stem, leaf = ".".join(parts[2:-1]), parts[-1]
        if stem in DIFFUSERS_BLOCK_NAMES:
            name = f"blocks.{parts[1]}.{DIFFUSERS_BLOCK_NAMES[stem]}"
            return f"{name}.{leaf}" if leaf else name
        return None
    stem, leaf = (key, None) if key in DIFFUSERS_TOP_NAMES else (".".join(parts[:-1]), parts[-1])
    if stem in DIFFUSERS_TOP_NAMES:
        return f"{DIFFUSERS_TOP_NAMES[stem]}.{leaf}" if leaf else DIFFUSERS_TOP_NAMES[stem]
    return None


def _is_diffusers(paths: list[Path]) -> bool:
    with safe_open(str(paths[0]), framework="pt", device="cpu") as f:
        return any(k.startswith("condition_embedder.") or ".attn1." in k for k in f.keys())  # noqa: SIM118


def load_wan_dit(
    dit_path: Path,
    config: DiTConfig,
    *,
    lora_path: Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> WanDiT:
    """Build the DiT on the meta device and load the official weights into dtype/device.

    dit_path: a Wan2.1 checkpoint directory (official shards or a diffusers `transformer/`
    folder), or a single .safetensors file. lora_path: the Stand-In checkpoint (a torch
    pickle of `blocks.{i}.self_attn.{q,k,v}_loras.{down,up}.weight`); without it the
    model has no identity LoRA (lora_rank 0): plain Wan2.1 identity tokens.
    """
    if not dit_path.exists():
        raise CheckpointError(f"missing DiT checkpoint: {dit_path}")
    paths = [dit_path] if dit_path.is_file() else shard_files(dit_path)
    rename = diffusers_to_official if _is_diffusers(paths) else None
    # The parameters that stay float32 (standin/dit.py) are read so, not rounded through dtype.
    tensors = read_safetensors(paths, dtype=dtype, device=device, rename=rename, float32_keys=keeps_float32)
    if lora_path is not None:
        lora = read_torch_pickle(lora_path, dtype=dtype, device=device)
        clash = next((k for k in lora if k in tensors), None)
        if clash:
            raise CheckpointError(f"{lora_path.name} and the DiT shards both hold {clash}")
        tensors.update(lora)
    else:
        config = replace(config, lora_rank=0)
    with torch.device("meta"):
        model = WanDiT(config)
    where = ", ".join(p.name for p in paths) + (f" + {lora_path.name}" if lora_path else "")
    load_strict(model, tensors, expected_in=where)
    model.to_inference_dtype(dtype)
    log.info("loaded DiT from %s (%s, %s)", where, dtype, device)
    return model.eval().requires_grad_(False)
