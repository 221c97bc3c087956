"""Style LoRAs (standin/styles.py): every community file format loads to the same deltas, bad
files are refused with a reason, and applied unmerged they equal the merged weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from standin.config import DiTConfig
from standin.styles import (
    StyleLoRA,
    StyleLoRAError,
    StyleSet,
    load_lora_args,
    parse_lora_arg,
    style_targets,
)

# Small enough for milliseconds, with ffn_dim != dim so a transposed delta cannot fit by accident.
CFG = DiTConfig(dim=48, ffn_dim=80, num_heads=3, num_layers=2, text_dim=20, freq_dim=16, lora_rank=4)
RANK = 3

# diffusers WanTransformer3DModel names of our block layers
DIFFUSERS = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "norm3": "norm2",
    "self_attn.norm_q": "attn1.norm_q",
}
LAYERS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.k", "ffn.0", "ffn.2")


def layer_shapes(cfg: DiTConfig = CFG) -> dict[str, tuple[int, int]]:
    """(out, in) of every block linear layer a test file targets, by our name."""
    shapes = {}
    for i in range(cfg.num_layers):
        for layer in LAYERS:
            out_f = cfg.ffn_dim if layer == "ffn.0" else cfg.dim
            in_f = cfg.ffn_dim if layer == "ffn.2" else cfg.dim
            shapes[f"blocks.{i}.{layer}"] = (out_f, in_f)
    return shapes


def random_deltas(seed: int = 0, rank: int = RANK, alpha: float | None = 6.0) -> dict[str, dict]:
    """Per our layer name: down [r, in], up [out, r], alpha (a float or None)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i) in layer_shapes().items():
        out[name] = {
            "down": torch.randn(rank, i, generator=g) * 0.2,
            "up": torch.randn(o, rank, generator=g) * 0.2,
            "alpha": alpha,
        }
    return out


def diffusers_name(ours: str) -> str:
    _, i, rest = ours.split(".", 2)
    return f"blocks.{i}.{DIFFUSERS[rest]}"


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def as_format(deltas: dict[str, dict], fmt: str) -> dict[str, torch.Tensor]:
    """The same deltas written the way each community tool writes them."""
    out: dict[str, torch.Tensor] = {}
    for ours, d in deltas.items():
        if fmt == "kohya":
            stem = "lora_unet_" + ours.replace(".", "_")
            keys = (f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha")
        elif fmt == "kohya_diffusers_names":
            stem = "lora_unet_" + diffusers_name(ours).replace(".", "_")
            keys = (f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha")
        elif fmt == "ab":
            p = f"diffusion_model.{ours}"
            keys = (f"{p}.lora_A.weight", f"{p}.lora_B.weight", f"{p}.alpha")
        elif fmt == "ab_no_prefix":
            keys = (f"{ours}.lora_A.weight", f"{ours}.lora_B.weight", f"{ours}.alpha")
        elif fmt == "down_up":  # ComfyUI / lightx2v: official names, lora_down/up
            p = f"diffusion_model.{ours}"
            keys = (f"{p}.lora_down.weight", f"{p}.lora_up.weight", f"{p}.alpha")
        elif fmt == "peft":
            p = f"base_model.model.{diffusers_name(ours)}"
            keys = (f"{p}.lora_A.default.weight", f"{p}.lora_B.default.weight", f"{p}.alpha")
        elif fmt == "peft_ours":
            p = f"base_model.model.{ours}"
            keys = (f"{p}.lora_A.weight", f"{p}.lora_B.weight", f"{p}.alpha")
        elif fmt == "diffusers":
            p = f"transformer.{diffusers_name(ours)}"
            keys = (f"{p}.lora_A.weight", f"{p}.lora_B.weight", f"{p}.alpha")
        else:
            raise ValueError(fmt)
        out[keys[0]], out[keys[1]] = d["down"], d["up"]
        if d["alpha"] is not None:
            out[keys[2]] = torch.tensor(d["alpha"])
    return out


FORMATS = {
    "kohya": "kohya",
    "kohya_diffusers_names": "kohya",
    "ab": "ab",
    "ab_no_prefix": "ab",
    "down_up": "ab",
    "peft": "peft",
    "peft_ours": "peft",
    "diffusers": "diffusers",
}


# -- loading ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_loads_to_the_same_layers_and_scale(tmp_path: Path, fmt: str) -> None:
    deltas = random_deltas()
    path = write(tmp_path / f"{fmt}.safetensors", as_format(deltas, fmt))
    style = StyleLoRA.load(path, CFG)
    assert style.format == FORMATS[fmt]
    assert set(style.layers) == set(deltas)
    for name, d in deltas.items():
        got = style.layers[name]
        torch.testing.assert_close(got.down, d["down"], rtol=0, atol=0)
        torch.testing.assert_close(got.up, d["up"], rtol=0, atol=0)
        assert got.scale == pytest.approx(6.0 / RANK)  # alpha / rank


def test_without_alpha_the_scale_is_one(tmp_path: Path) -> None:
    path = write(tmp_path / "s.safetensors", as_format(random_deltas(alpha=None), "ab"))
    style = StyleLoRA.load(path, CFG)
    assert {d.scale for d in style.layers.values()} == {1.0}


def test_diff_and_diff_b_keys_and_diffusers_lora_b_bias_are_full_deltas(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(CFG.dim, CFG.dim, generator=g)
    b = torch.randn(CFG.dim, generator=g)
    tensors = {
        "diffusion_model.blocks.0.self_attn.q.diff": w,
        "diffusion_model.blocks.0.self_attn.q.diff_b": b,
        "diffusion_model.blocks.1.ffn.2.diff_b": b.clone(),
        # lightx2v-style all-zero norm deltas: not reachable unmerged, but harmless → ignored
        "diffusion_model.blocks.0.norm3.diff": torch.zeros(CFG.dim),
        "diffusion_model.blocks.0.self_attn.norm_q.diff": torch.zeros(CFG.dim),
    }
    style = StyleLoRA.load(write(tmp_path / "d.safetensors", tensors), CFG)
    assert set(style.layers) == {"blocks.0.self_attn.q", "blocks.1.ffn.2"}
    assert style.layers["blocks.0.self_attn.q"].diff is not None
    assert set(style.ignored) == {"blocks.0.self_attn.norm_q", "blocks.0.norm3"}
    assert style.rank == 0

    dif = {
        "transformer.blocks.1.attn1.to_out.0.lora_A.weight": torch.randn(2, CFG.dim, generator=g),
        "transformer.blocks.1.attn1.to_out.0.lora_B.weight": torch.randn(CFG.dim, 2, generator=g),
        "transformer.blocks.1.attn1.to_out.0.lora_B.bias": b,
    }
    style = StyleLoRA.load(write(tmp_path / "e.safetensors", dif), CFG)
    torch.testing.assert_close(style.layers["blocks.1.self_attn.o"].diff_b, b)


def test_layers_outside_the_blocks_load_too(tmp_path: Path) -> None:
    # step-distillation LoRAs (CausVid, lightx2v) also change the head and time projection
    g = torch.Generator().manual_seed(4)
    out_dim = 16 * 4
    tensors = {
        "diffusion_model.head.head.lora_down.weight": torch.randn(2, CFG.dim, generator=g),
        "diffusion_model.head.head.lora_up.weight": torch.randn(out_dim, 2, generator=g),
        "diffusion_model.head.head.diff_b": torch.randn(out_dim, generator=g),
        "diffusion_model.time_projection.1.diff_b": torch.randn(6 * CFG.dim, generator=g),
        "diffusion_model.text_embedding.0.diff": torch.randn(CFG.dim, CFG.text_dim, generator=g),
    }
    style = StyleLoRA.load(write(tmp_path / "distill.safetensors", tensors), CFG)
    assert set(style.layers) == {"head.head", "time_projection.1", "text_embedding.0"}
    diffusers = {
        "transformer.condition_embedder.time_proj.lora_B.bias": torch.randn(6 * CFG.dim, generator=g)
    }
    style = StyleLoRA.load(write(tmp_path / "d.safetensors", diffusers), CFG)
    assert set(style.layers) == {"time_projection.1"}


def test_describe_lists_name_format_rank_layers_bytes_and_sha256(tmp_path: Path) -> None:
    import hashlib

    path = write(tmp_path / "ghibli.safetensors", as_format(random_deltas(), "kohya"))
    info = StyleLoRA.load(path, CFG).describe()
    assert info["name"] == "ghibli"
    assert (info["format"], info["rank"], info["alpha"]) == ("kohya", RANK, 6.0)
    assert info["layers"] == len(layer_shapes())
    assert info["bytes"] == path.stat().st_size
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["layer_kinds"] == {"self_attn": 8, "cross_attn": 2, "ffn": 4}
    json.dumps(info)  # what the HTTP API returns


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickled_files_are_refused_without_being_opened(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"style{suffix}"
    path.write_bytes(b"\x80\x04this would be a pickle that runs code")
    with pytest.raises(StyleLoRAError, match=rf"style{suffix}.*pickle"):
        StyleLoRA.load(path, CFG)


def test_a_pickle_renamed_to_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "renamed.safetensors"
    torch.save({"x": torch.zeros(2)}, path)  # a torch zip archive
    with pytest.raises(StyleLoRAError, match="renamed.safetensors: this is a torch pickle"):
        StyleLoRA.load(path, CFG)
    (tmp_path / "junk.safetensors").write_bytes(b"hello, I am not a tensor file")
    with pytest.raises(StyleLoRAError, match="junk.safetensors: not a safetensors file"):
        StyleLoRA.load(tmp_path / "junk.safetensors", CFG)


def test_files_over_the_size_limit_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "big.safetensors", as_format(random_deltas(), "ab"))
    with pytest.raises(StyleLoRAError, match="big.safetensors: .* over the limit"):
        StyleLoRA.load(path, CFG, max_bytes=1000)


def test_keys_that_match_no_layer_are_listed(tmp_path: Path) -> None:
    tensors = as_format(random_deltas(), "ab")
    tensors["diffusion_model.blocks.7.self_attn.q.lora_A.weight"] = torch.zeros(RANK, CFG.dim)
    tensors["diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight"] = torch.zeros(RANK, CFG.dim)
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(RANK, CFG.dim)
    path = write(tmp_path / "other_model.safetensors", tensors)
    with pytest.raises(StyleLoRAError) as err:
        StyleLoRA.load(path, CFG)
    msg = str(err.value)
    assert msg.startswith("other_model.safetensors: 3 keys match no layer of the model")
    for key in ("blocks.7.self_attn.q", "cross_attn.k_img", "lora_te_text_model"):
        assert key in msg


def test_shape_mismatches_name_the_layer_and_both_shapes(tmp_path: Path) -> None:
    deltas = random_deltas()
    deltas["blocks.1.ffn.0"]["down"] = torch.zeros(RANK, CFG.ffn_dim)  # transposed layer
    path = write(tmp_path / "wrong_size.safetensors", as_format(deltas, "kohya"))
    with pytest.raises(StyleLoRAError, match=r"wrong_size.safetensors: blocks.1.ffn.0 .*\[80, 48\]"):
        StyleLoRA.load(path, CFG)
    # a LoRA for a bigger model (the 14B's 5120 channels into our 48)
    big = {"diffusion_model.blocks.0.self_attn.q.diff": torch.zeros(64, 64)}
    with pytest.raises(StyleLoRAError, match=r"blocks.0.self_attn.q diff has shape \(64, 64\)"):
        StyleLoRA.load(write(tmp_path / "b.safetensors", big), CFG)


def test_unsupported_variants_and_unreachable_layers_are_refused(tmp_path: Path) -> None:
    tensors = as_format(random_deltas(), "peft")
    tensors["base_model.model.blocks.0.attn1.to_q.lora_magnitude_vector.default.weight"] = torch.ones(CFG.dim)
    with pytest.raises(StyleLoRAError, match="DoRA files are not supported"):
        StyleLoRA.load(write(tmp_path / "dora.safetensors", tensors), CFG)
    conv = {"diffusion_model.patch_embedding.diff": torch.ones(CFG.dim, 16, 1, 2, 2)}
    with pytest.raises(StyleLoRAError, match="does not adapt .*patch_embedding"):
        StyleLoRA.load(write(tmp_path / "conv.safetensors", conv), CFG)
    nonzero_norm = {"diffusion_model.blocks.0.norm3.diff": torch.ones(CFG.dim)}
    with pytest.raises(StyleLoRAError, match="blocks.0.norm3"):
        StyleLoRA.load(write(tmp_path / "norm.safetensors", nonzero_norm), CFG)
    nan = as_format(random_deltas(), "ab")
    nan["diffusion_model.blocks.0.ffn.0.lora_A.weight"][0, 0] = float("nan")
    with pytest.raises(StyleLoRAError, match="blocks.0.ffn.0 down holds NaN"):
        StyleLoRA.load(write(tmp_path / "nan.safetensors", nan), CFG)
    orphan = {"diffusion_model.blocks.0.ffn.0.lora_A.weight": torch.ones(2, CFG.dim)}
    with pytest.raises(StyleLoRAError, match="without its pair"):
        StyleLoRA.load(write(tmp_path / "orphan.safetensors", orphan), CFG)


def test_parse_lora_arg_takes_an_optional_numeric_scale() -> None:
    assert parse_lora_arg("styles/ghibli.safetensors") == (Path("styles/ghibli.safetensors"), 1.0)
    assert parse_lora_arg("ghibli.safetensors:0.7") == (Path("ghibli.safetensors"), 0.7)
    assert parse_lora_arg("a:b/ghibli.safetensors:-1") == (Path("a:b/ghibli.safetensors"), -1.0)
    assert parse_lora_arg("a:b.safetensors") == (Path("a:b.safetensors"), 1.0)
    with pytest.raises(StyleLoRAError, match="finite"):
        parse_lora_arg("x.safetensors:nan")


def test_style_set_skips_zero_scales_and_unknown_layers() -> None:
    targets = style_targets(CFG)
    assert targets["blocks.0.self_attn.q"].applicable and not targets["blocks.0.norm3"].applicable
    x, y = torch.randn(2, 5, CFG.dim), torch.randn(2, 5, CFG.dim)
    assert not StyleSet()
    assert StyleSet().linear("blocks.0.self_attn.q", x, y) is y


def test_load_lora_args_converts_to_the_model_dtype(tmp_path: Path) -> None:
    from standin.dit import WanDiT

    path = write(tmp_path / "s.safetensors", as_format(random_deltas(), "kohya"))
    model = WanDiT(CFG).to(torch.bfloat16)
    styles = load_lora_args([f"{path}:0.5"], model)
    ((style, scale),) = styles.styles
    assert scale == 0.5 and style.layers["blocks.0.ffn.0"].down.dtype == torch.bfloat16


def test_generate_takes_repeatable_lora_flags_and_refuses_a_pickle_before_loading(tmp_path: Path) -> None:
    from standin.cli import build_parser, main

    args = build_parser()[0].parse_args(
        ["generate", "--prompt", "p", "--lora", "a.safetensors:0.5", "--lora", "b.safetensors"]
    )
    assert args.lora == ["a.safetensors:0.5", "b.safetensors"]
    pickle = tmp_path / "style.ckpt"
    pickle.write_bytes(b"\x80\x04not really")
    assert main(["generate", "--prompt", "p", "--lora", str(pickle), "-o", str(tmp_path / "x.mp4")]) == 2
    assert not (tmp_path / "x.mp4").exists()


def test_a_step_distillation_layout_loads(tmp_path: Path) -> None:
    """The layout of the community's Wan2.1 step-distillation LoRAs: `diffusion_model.` names,
    lora_down/up + alpha on every block linear, `diff_b` on their biases and the head's, and
    all-zero `diff` / `diff_b` on the norms (ignored: the unmerged forward does not adapt norms)."""
    g = torch.Generator().manual_seed(9)
    rank, tensors = 4, {}
    for name, (o, i) in layer_shapes().items():
        p = f"diffusion_model.{name}"
        tensors[f"{p}.lora_down.weight"] = torch.randn(rank, i, generator=g)
        tensors[f"{p}.lora_up.weight"] = torch.randn(o, rank, generator=g)
        tensors[f"{p}.alpha"] = torch.tensor(float(rank))
        tensors[f"{p}.diff_b"] = torch.randn(o, generator=g)
    norms = ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k", "norm3")
    for b in range(CFG.num_layers):
        for norm in norms:
            tensors[f"diffusion_model.blocks.{b}.{norm}.diff"] = torch.zeros(CFG.dim)
        tensors[f"diffusion_model.blocks.{b}.norm3.diff_b"] = torch.zeros(CFG.dim)
    tensors["diffusion_model.head.head.diff_b"] = torch.randn(64, generator=g)
    style = StyleLoRA.load(write(tmp_path / "distill.safetensors", tensors), CFG)
    assert style.format == "ab" and style.rank == rank
    assert len(style.layers) == len(layer_shapes()) + 1
    assert len(style.ignored) == 5 * CFG.num_layers
    assert {d.scale for d in style.layers.values() if d.rank} == {1.0}
