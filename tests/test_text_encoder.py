"""umT5 text encoder and prompt tokenizers: math, padding, tokenization, checkpoint loading."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from standin.errors import CheckpointError, UnknownPresetError
from standin.presets import dit_preset, get_preset
from standin.text_encoder import (
    TINY,
    UMT5_CHECKPOINT,
    UMT5_TOKENIZER_DIR,
    UMT5_XXL,
    TextEncoder,
    TextEncoderConfig,
    UMT5Encoder,
    _clamp_fp16,
    load_umt5,
    relative_position_buckets,
)
from standin.tokenizer import ByteTokenizer, HFTokenizer, clean_prompt

KEYS_FILE = Path(__file__).parent / "data" / "umt5_xxl_keys.txt"


# ----------------------------------------------------------------------------- references


def t5_bucket(rel: int, num_buckets: int, max_distance: int) -> int:
    """The T5 paper's bidirectional bucket of key_pos - query_pos, in float64 python."""
    half = num_buckets // 2
    base = half if rel > 0 else 0
    n = abs(rel)
    max_exact = half // 2
    if n < max_exact:
        return base + n
    log_bucket = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    )
    return base + min(log_bucket, half - 1)


def reference_encoder(sd: dict[str, torch.Tensor], cfg: TextEncoderConfig, ids, mask):
    """Float64 umT5 encoder written out op by op from the state dict."""
    sd = {k: v.double() for k, v in sd.items()}
    b, n = ids.shape
    heads, hd = cfg.num_heads, cfg.dim_attn // cfg.num_heads

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.eps)

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    buckets = torch.tensor(
        [[t5_bucket(k - q, cfg.num_buckets, cfg.max_distance) for k in range(n)] for q in range(n)]
    )
    x = sd["token_embedding.weight"][ids]
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = ((h @ sd[p + f"attn.{w}.weight"].T).view(b, n, heads, hd) for w in ("q", "k", "v"))
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k)  # no 1/sqrt(d)
        logits = logits + sd[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)
        logits = logits.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        attn = torch.softmax(logits, dim=-1)
        o = torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, heads * hd)
        x = x + o @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        gated = (h @ sd[p + "ffn.fc1.weight"].T) * gelu_tanh(h @ sd[p + "ffn.gate.0.weight"].T)
        x = x + gated @ sd[p + "ffn.fc2.weight"].T
    return rms(x, sd["norm.weight"])


def prefix_mask(lengths: list[int], n: int) -> torch.Tensor:
    return (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()


# ----------------------------------------------------------------------------- the encoder


@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 20)])
def test_relative_position_buckets_match_t5_formula(num_buckets, max_distance):
    n = 300
    got = relative_position_buckets(n, n, num_buckets=num_buckets, max_distance=max_distance)
    want = torch.tensor([[t5_bucket(k - q, num_buckets, max_distance) for k in range(n)] for q in range(n)])
    assert torch.equal(got, want)


def test_relative_position_buckets_landmarks():
    b = relative_position_buckets(1, 400)[0]  # query at 0, keys after it
    assert b[0] == 0 and b[1] == 17 and b[7] == 23  # exact buckets, upper half
    assert b[8] == 24 and b[200] == 31  # log-spaced, then the last bucket
    back = relative_position_buckets(400, 1)[:, 0]  # keys before the query
    assert back[1] == 1 and back[399] == 15


def test_one_layer_encoder_matches_float64_reference():
    cfg = replace(TINY, num_layers=1, text_len=140)
    model = UMT5Encoder(cfg).init_random_(seed=3).eval()
    ids = torch.randint(2, cfg.vocab, (2, 140), generator=torch.Generator().manual_seed(0))
    mask = prefix_mask([140, 9], 140)
    with torch.no_grad():
        got = model(ids, mask)
    want = reference_encoder(model.state_dict(), cfg, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real].double(), want[real], rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_real_tokens_and_zeroes_the_rest():
    short = TextEncoder.tiny(seed=1, config=replace(TINY, text_len=24))
    long = TextEncoder.tiny(seed=1, config=replace(TINY, text_len=64))
    prompts = ["a cat", "a person on a beach"]
    a, b = short.encode_prompts(prompts), long.encode_prompts(prompts)
    assert a.shape == (2, 24, TINY.dim) and b.shape == (2, 64, TINY.dim)
    for row, text in enumerate(prompts):
        n = len(text) + 1  # bytes + EOS
        torch.testing.assert_close(a[row, :n], b[row, :n], rtol=1e-5, atol=1e-6)
        assert a[row, :n].abs().sum(-1).gt(0).all()
        assert not a[row, n:].any() and not b[row, n:].any()


def test_prompt_encoding_does_not_depend_on_the_rest_of_the_batch():
    enc = TextEncoder.tiny(seed=2, config=replace(TINY, text_len=48))
    alone = enc.encode_prompts(["a red car"])
    batched = enc.encode_prompts(["a much longer prompt about a red car at night", "a red car"])
    torch.testing.assert_close(alone[0], batched[1], rtol=1e-5, atol=1e-6)


def test_tiny_encode_prompts_gives_official_context_shape():
    enc = TextEncoder.tiny()
    ctx = enc.encode_prompts(["hello", "world!"])
    assert ctx.shape == (2, 512, TINY.dim) and ctx.dtype == torch.float32
    assert torch.isfinite(ctx).all()
    assert torch.equal(ctx, TextEncoder.tiny().encode_prompts(["hello", "world!"]))  # seeded


def test_text_encoder_rejects_a_tokenizer_of_another_length():
    with pytest.raises(ValueError, match="text_len"):
        TextEncoder(UMT5Encoder(TINY), ByteTokenizer(text_len=16))


def test_fp16_overflow_is_clamped_and_other_dtypes_are_untouched():
    x = torch.tensor([float("inf"), -float("inf"), 1.0], dtype=torch.float16)
    y = _clamp_fp16(x)
    assert torch.isfinite(y).all() and y[2] == 1.0
    z = torch.tensor([float("inf")], dtype=torch.bfloat16)
    assert torch.isinf(_clamp_fp16(z)).all()


def test_presets_use_the_official_text_encoder_and_tiny_shrinks_only_its_length():
    assert get_preset("wan2.1-t2v-14b").text == UMT5_XXL == get_preset("wan2.1-t2v-1.3b").text
    assert get_preset("tiny").text == replace(TINY, text_len=32)


def test_one_error_type_for_an_unknown_preset_names_the_known_ones():
    with pytest.raises(UnknownPresetError, match="wan2.1-t2v-14b"):
        get_preset("t5-small")
    with pytest.raises(UnknownPresetError):
        dit_preset("wan2.1-t2v-2b")


def test_xxl_state_dict_names_and_shapes_equal_the_official_key_list():
    with torch.device("meta"):
        model = UMT5Encoder(UMT5_XXL)
    got = [f"{k} {' '.join(map(str, v.shape))}" for k, v in model.state_dict().items()]
    assert got == KEYS_FILE.read_text().splitlines()


# ----------------------------------------------------------------------------- tokenizers


def test_clean_prompt_collapses_whitespace_and_unescapes_html_twice():
    assert clean_prompt("  a\t\ncat\u3000\xa0 &amp;amp; dog  ") == "a cat & dog"
    assert clean_prompt("&amp;lt;b&amp;gt;") == "<b>"


def test_clean_prompt_repairs_text_with_ftfy_as_wan_does():
    assert clean_prompt("\u201cquoted\u201d") == '"quoted"'
    assert clean_prompt("caf\u00c3\u00a9") == "caf\u00e9"  # UTF-8 read as Latin-1


def test_byte_tokenizer_round_trip_eos_and_padding():
    tok = ByteTokenizer(text_len=32)
    text = "Héllo wörld 你好"
    ids, mask = tok([text, ""])
    assert ids.shape == mask.shape == (2, 32) and ids.dtype == torch.long
    n = len(text.encode("utf-8"))
    assert ids[0, n] == tok.eos_id and mask[0].sum() == n + 1
    assert (ids[0, n + 1 :] == tok.pad_id).all()
    assert ids[1, 0] == tok.eos_id and mask[1].tolist() == [1] + [0] * 31
    assert tok.decode(ids[0]) == text
    assert int(ids.max()) < tok.vocab_size


def test_byte_tokenizer_truncates_and_keeps_eos():
    ids, mask = ByteTokenizer(text_len=8)(["abcdefghijkl"])
    assert tok_text(ids[0]) == "abcdefg" and ids[0, 7] == ByteTokenizer.eos_id
    assert mask.sum() == 8


def tok_text(ids: torch.Tensor) -> str:
    return ByteTokenizer().decode(ids)


def write_umt5_like_tokenizer(root: Path, with_eos: bool = True) -> Path:
    """A tiny word-level tokenizer.json at root/google/umt5-xxl, with umT5's special ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<pad>", "</s>", "<unk>", "a", "cat", "&", "dog", "runs"]
    if not with_eos:
        words.remove("</s>")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if with_eos:  # the real file appends </s> in its post-processor: it must not be doubled
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    directory = root / UMT5_TOKENIZER_DIR
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


def test_hf_tokenizer_cleans_appends_eos_and_pads(tmp_path):
    tok = HFTokenizer(write_umt5_like_tokenizer(tmp_path), text_len=8)
    ids, mask = tok(["a  cat &amp; dog", "zebra runs"])
    assert ids.tolist() == [[3, 4, 5, 6, 1, 0, 0, 0], [2, 7, 1, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]


def test_hf_tokenizer_truncates_to_text_len_including_eos(tmp_path):
    tok = HFTokenizer(write_umt5_like_tokenizer(tmp_path), text_len=4)
    ids, mask = tok(["a cat runs a dog"])
    assert ids.tolist() == [[3, 4, 7, 1]] and mask.tolist() == [[1, 1, 1, 1]]


def test_hf_tokenizer_errors_name_the_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="umt5-xxl"):
        HFTokenizer(tmp_path / UMT5_TOKENIZER_DIR)
    (tmp_path / UMT5_TOKENIZER_DIR).mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        HFTokenizer(tmp_path / UMT5_TOKENIZER_DIR)


def test_hf_tokenizer_without_eos_token_is_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="</s>"):
        HFTokenizer(write_umt5_like_tokenizer(tmp_path, with_eos=False))


def test_checkpoint_dir_without_tokenizer_names_it(tmp_path):
    with pytest.raises(CheckpointError, match="google/umt5-xxl"):
        TextEncoder.from_checkpoint_dir(tmp_path)


def test_checkpoint_dir_without_weights_names_the_file(tmp_path):
    write_umt5_like_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match=UMT5_CHECKPOINT):
        TextEncoder.from_checkpoint_dir(tmp_path)


# ----------------------------------------------------------------------------- loading


@pytest.fixture
def tiny_checkpoint(tmp_path) -> tuple[Path, UMT5Encoder]:
    model = UMT5Encoder(TINY).init_random_(seed=5).eval()
    path = tmp_path / "umt5-tiny.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_state_dict_round_trip(tiny_checkpoint):
    path, model = tiny_checkpoint
    loaded = load_umt5(path, dtype=torch.float32, device="cpu", config=TINY)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and b.device.type == "cpu" and torch.equal(a, b)
    ids = torch.randint(0, TINY.vocab, (1, 20))
    mask = prefix_mask([12], 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), model(ids, mask), rtol=0, atol=0)


def test_load_converts_to_the_requested_dtype(tiny_checkpoint):
    path, _ = tiny_checkpoint
    loaded = load_umt5(path, dtype=torch.bfloat16, config=TINY)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("blocks.1.ffn.fc2.weight"), "missing blocks.1.ffn.fc2.weight"),
        (lambda sd: sd.update({"blocks.0.attn.extra": torch.zeros(1)}), "blocks.0.attn.extra"),
        (
            lambda sd: sd.update({"blocks.0.pos_embedding.embedding.weight": torch.zeros(16, 4)}),
            r"blocks.0.pos_embedding.embedding.weight in bad.pth has shape \(16, 4\)",
        ),
    ],
)
def test_strict_load_names_the_bad_key_and_file(tmp_path, edit, message):
    sd = UMT5Encoder(TINY).state_dict()
    edit(sd)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_umt5(path, dtype=torch.float32, config=TINY)
    assert "bad.pth" in str(err.value)
