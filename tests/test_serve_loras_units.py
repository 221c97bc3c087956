"""Style LoRAs in the server without a cluster: the rank cache's LRU (count and bytes bounds,
eviction order), name and field validation, the library (listing, unknown names, refused files,
an fsspec URL), the multiplexed model id, and a rank's resolver (sha256 check)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from parallel.styles import StyleRef
from serve_app.api import APIError
from serve_app.loras import (
    LoraLibrary,
    ReplicaStyles,
    StyleCache,
    check_lora_name,
    parse_loras,
    style_nbytes,
    style_set_id,
)
from serve_app.settings import ServeSettings
from standin.presets import get_preset
from standin.styles import LayerDelta, StyleLoRA, StyleLoRAError, StyleSet

PALETTE = Path(__file__).resolve().parent.parent / "examples" / "tiny_palette_style.safetensors"


def _style(name: str, numel: int) -> StyleLoRA:
    """A style holding `numel` float32 values (4 bytes each)."""
    return StyleLoRA(name, "synthetic", {"head.head": LayerDelta(diff_b=torch.zeros(numel))})


class _Observer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def loaded(self, seconds: float) -> None:
        self.events.append("loaded")

    def hit(self) -> None:
        self.events.append("hit")

    def evicted(self) -> None:
        self.events.append("evicted")


def test_cache_is_bounded_by_count_and_evicts_the_least_recently_used():
    seen = _Observer()
    cache = StyleCache(max_count=2, max_bytes=10**9, observer=seen)
    loads: list[str] = []

    def get(name: str) -> StyleLoRA:
        return cache.get((name, ""), lambda: loads.append(name) or _style(name, 4))

    get("a"), get("b"), get("a")  # a is now the most recent
    get("c")  # evicts b, not a
    assert [k for k, _ in cache.order()] == ["a", "c"] and loads == ["a", "b", "c"]
    get("a")
    assert loads == ["a", "b", "c"]  # a hit
    get("b")  # loaded again; evicts c (a was used after c)
    assert [k for k, _ in cache.order()] == ["a", "b"] and loads[-1] == "b"
    stats = cache.stats()
    assert (stats["loads"], stats["hits"], stats["evictions"]) == (4, 2, 2)
    assert (
        seen.events.count("loaded") == 4
        and seen.events.count("evicted") == 2
        and seen.events.count("hit") == 2
    )


def test_cache_is_bounded_by_bytes():
    cache = StyleCache(max_count=100, max_bytes=100)  # 25 float32
    for name in "abc":
        cache.get((name, ""), lambda n=name: _style(n, 10))  # 40 bytes each
    assert [k for k, _ in cache.order()] == ["b", "c"] and cache.bytes == 80
    big = cache.get(("big", ""), lambda: _style("big", 30))  # 120 bytes: used, never kept
    assert style_nbytes(big) == 120 and ("big", "") not in cache
    assert [k for k, _ in cache.order()] == ["b", "c"]
    cache.get(("d", ""), lambda: _style("d", 20))  # 80 bytes: b and c must both go
    assert [k for k, _ in cache.order()] == ["d"] and cache.bytes == 80


def test_cache_keys_on_the_file_hash():
    cache = StyleCache(max_count=4, max_bytes=10**6)
    first = cache.get(("x", "aaa"), lambda: _style("x", 1))
    assert cache.get(("x", "aaa"), lambda: pytest.fail("a hit must not load")) is first
    assert cache.get(("x", "bbb"), lambda: _style("x", 2)) is not first  # a new version of the file


@pytest.mark.parametrize("name", ["ghibli", "Oil-paint_v2", "a", "x.y", "9" * 64])
def test_valid_lora_names(name: str):
    assert check_lora_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../etc/passwd",
        "a/b",
        "a\\b",
        "..",
        "x..y",
        ".hidden",
        "-x",
        "a b",
        "é",
        "a" * 65,
        3,
        None,
        "a\x00",
    ],
)
def test_unsafe_lora_names_are_400(name):
    with pytest.raises(APIError) as err:
        check_lora_name(name)
    assert err.value.status == 400 and err.value.param == "loras"


S = ServeSettings(lora_dir="/nowhere", max_loras_per_request=2, max_lora_scale=2.0)


def test_parse_loras_json_and_form():
    want = (StyleRef("ghibli", 0.8), StyleRef("oil", 1.0))
    assert parse_loras([{"name": "ghibli", "scale": 0.8}, {"name": "oil"}], S, form=False) == want
    assert parse_loras('[{"name": "ghibli", "scale": 0.8}, {"name": "oil"}]', S, form=True) == want
    assert parse_loras(None, S, form=False) == () and parse_loras("", S, form=True) == ()
    assert parse_loras([], S, form=False) == ()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("not json", 400),
        ({"name": "x"}, 400),
        (["x"], 400),
        ([{"name": "x", "scale": "1"}], 400),
        ([{"name": "x", "scale": True}], 400),
        ([{"name": "x", "scale": float("nan")}], 400),
        ([{"name": "x", "scale": 10**400}], 400),
        pytest.param("[" * 100_000, 400, id="deeply-nested"),
        ([{"name": "x", "scale": 2.5}], 422),
        ([{"name": "x", "weight": 1}], 400),
        ([{"name": "x"}, {"name": "x"}], 400),
        ([{"name": "a"}, {"name": "b"}, {"name": "c"}], 422),
        ([{"name": "../x"}], 400),
    ],
)
def test_bad_loras_fields_are_4xx(raw, status):
    with pytest.raises(APIError) as err:
        parse_loras(raw, S, form=False)
    assert err.value.status == status and err.value.param == "loras"


def test_loras_without_a_lora_dir_are_refused():
    with pytest.raises(APIError) as err:
        parse_loras([{"name": "x"}], ServeSettings(), form=False)
    assert err.value.status == 400 and err.value.code == "loras_disabled"


def test_style_set_id_is_stable_and_ignores_order_and_scale():
    a, b = StyleRef("a", 1.0, "h1"), StyleRef("b", 0.5, "h2")
    assert style_set_id([a, b]) == style_set_id([b, StyleRef("a", 0.3, "h1")])
    assert style_set_id([a]) != style_set_id([a, b]) != style_set_id([StyleRef("a", 1.0, "h3"), b])
    assert style_set_id([]) == ""


@pytest.fixture
def lora_dir(tmp_path: Path) -> Path:
    shutil.copy(PALETTE, tmp_path / "palette.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"this is not a safetensors file at all")
    (tmp_path / "evil.ckpt").write_bytes(b"\x80\x04K\x01.")  # a pickle: never opened
    (tmp_path / "notes.txt").write_text("ignored")
    return tmp_path


def _library(location: str, tmp_path: Path | None = None) -> LoraLibrary:
    return LoraLibrary(location, get_preset("tiny").dit, max_bytes=10**7, cache_dir=tmp_path)


def test_library_lists_usable_loras_and_says_why_others_are_refused(lora_dir: Path):
    lib = _library(str(lora_dir))
    listing = lib.listing()
    [palette] = listing["data"]
    assert palette["name"] == "palette" and palette["format"] and palette["rank"] > 0
    assert (
        palette["layers"] > 0 and palette["bytes"] == PALETTE.stat().st_size and len(palette["sha256"]) == 64
    )
    refused = {u["name"]: u["error"] for u in listing["unusable"]}
    assert set(refused) == {"garbage", "evil"}
    assert "pickle" in refused["evil"] and "safetensors" in refused["garbage"]


def test_library_check_gives_404_for_unknown_and_422_for_refused_files(lora_dir: Path):
    lib = _library(str(lora_dir))
    [ref] = lib.check([StyleRef("palette", 0.5)])
    assert ref.scale == 0.5 and ref.sha256 == lib.describe("palette")["sha256"]
    with pytest.raises(APIError) as err:
        lib.check([StyleRef("ghibli", 1.0)])
    assert err.value.status == 404 and err.value.code == "lora_not_found" and "ghibli" in err.value.message
    for name in ("garbage", "evil"):
        with pytest.raises(APIError) as err:
            lib.check([StyleRef(name, 1.0)])
        assert err.value.status == 422 and err.value.code == "invalid_lora" and name in err.value.message


def test_library_reads_an_fsspec_url(lora_dir: Path, tmp_path: Path):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/loras/palette.safetensors", PALETTE.read_bytes())
    lib = _library("memory://loras", tmp_path / "cache")
    assert [d["name"] for d in lib.listing()["data"]] == ["palette"]
    assert lib.load("palette").sha256 == _library(str(lora_dir)).describe("palette")["sha256"]
    fs.rm("/loras", recursive=True)


def test_a_rank_resolves_refs_through_its_cache_and_checks_the_file_hash(lora_dir: Path):
    lib = _library(str(lora_dir))
    sha = lib.describe("palette")["sha256"]
    resolver = ReplicaStyles(lib, StyleCache(4, 10**9))
    first = resolver([StyleRef("palette", 0.5, sha)])
    assert isinstance(first, StyleSet) and first.styles[0][1] == 0.5
    second = resolver([StyleRef("palette", 1.0, sha)])
    assert second.styles[0][0] is first.styles[0][0] and resolver.cache.hits == 1
    with pytest.raises(StyleLoRAError, match="changed since"):
        resolver([StyleRef("palette", 1.0, "0" * 64)])


def test_dit_replica_applies_named_styles_like_the_pipeline_and_refuses_a_changed_file(lora_dir: Path):
    """Local testing mode (no cluster, so no multiplexing): the replica resolves the names on
    its rank, and the latents equal StandInPipeline.denoise with the same StyleSet, bit for bit."""
    from ray import serve

    from serve_app.dit import DiTReplica
    from standin.pipeline import DenoiseInputs, GenerationParams, StandInPipeline

    settings = ServeSettings(sp_degree=1, lora_dir=str(lora_dir), state_dir=str(lora_dir / "state"))
    [ref] = LoraLibrary.for_settings(settings).check([StyleRef("palette", 0.7)])
    pipe = StandInPipeline.from_preset("tiny")
    params = GenerationParams(prompt="a face", width=32, height=32, num_frames=5, num_steps=2, seed=11)
    ctx, neg = pipe.encode_prompts(params.prompt, params.negative_prompt)
    conditioning = {"context": ctx, "negative_context": neg, "identity_latents": None}
    handle = serve.run(DiTReplica.bind(settings), _local_testing_mode=True)

    events = list(handle.options(stream=True).denoise.remote(params, conditioning, None, (ref,)))
    assert events[-1]["event"] == "result", events[-1]
    style = StyleLoRA.load(lora_dir / "palette.safetensors", pipe.dit)
    styled = DenoiseInputs.for_request(params, ctx, neg, None, adapters=StyleSet([(style, 0.7)]))
    assert torch.equal(events[-1]["latents"], pipe.denoise(styled))
    assert not torch.equal(
        events[-1]["latents"], pipe.denoise(DenoiseInputs.for_request(params, ctx, neg, None))
    )

    changed = StyleRef("palette", 1.0, "0" * 64)
    error = list(handle.options(stream=True).denoise.remote(params, conditioning, None, (changed,)))[-1]
    assert error["event"] == "error" and error["kind"] == "invalid" and "changed since" in error["message"]
    stats = handle.stats.remote().result()["styles"]
    assert stats["loaded"] == ["palette"] and stats["loads"] == 1 and stats["hits"] >= 1


def test_an_unreadable_lora_dir_is_a_503_not_a_500(lora_dir: Path, monkeypatch):
    lib = _library(str(lora_dir))

    def broken() -> dict:
        raise OSError("connection reset by the object store")

    monkeypatch.setattr(lib, "_entries", broken)
    for call in (lib.listing, lambda: lib.check([StyleRef("palette", 1.0)])):
        with pytest.raises(APIError) as err:
            call()
        assert err.value.status == 503 and err.value.code == "lora_dir_unavailable"
        assert "connection" not in err.value.message  # details stay in the log


# -- a style's high/low pair on a two-expert model (Wan2.2 A14B) -------------------------------

A14B = ServeSettings(preset="tiny-a14b", lora_dir="/nowhere", max_loras_per_request=2, max_lora_scale=2.0)


def test_loras_may_name_their_expert_on_two_expert_models_only():
    pair = [{"name": "ghibli", "scale": 0.8, "expert": "high"}, {"name": "ghibli", "expert": "low"}]
    assert parse_loras(pair, A14B, form=False) == (
        StyleRef("ghibli", 0.8, expert="high"),
        StyleRef("ghibli", 1.0, expert="low"),
    )
    with pytest.raises(APIError) as err:
        parse_loras([{"name": "ghibli", "expert": "low"}], S, form=False)  # tiny: one DiT
    assert err.value.status == 422 and err.value.code == "lora_expert_unsupported"
    with pytest.raises(APIError) as err:
        parse_loras([{"name": "ghibli", "expert": "middle"}], A14B, form=False)
    assert err.value.status == 400
    with pytest.raises(APIError):
        twice = [{"name": "ghibli", "expert": "low"}, {"name": "ghibli", "expert": "low"}]
        parse_loras(twice, A14B, form=False)


def test_refs_for_one_expert_resolve_to_each_experts_own_adapters(lora_dir: Path):
    from parallel.styles import resolve_styles
    from standin.experts import HIGH, LOW

    lib = _library(str(lora_dir))
    sha = lib.describe("palette")["sha256"]
    resolver = ReplicaStyles(lib, StyleCache(4, 10**9))
    both = resolve_styles(resolver, [StyleRef("palette", 0.5, sha)])
    assert isinstance(both, StyleSet)
    refs = [StyleRef("palette", 0.5, sha, "high"), StyleRef("palette", 1.5, sha, "low")]
    pair = resolve_styles(resolver, refs)
    assert [s for _, s in pair[HIGH].styles] == [0.5] and [s for _, s in pair[LOW].styles] == [1.5]
    high_only = resolve_styles(resolver, [StyleRef("palette", 0.5, sha, "high")])
    assert high_only[LOW] is None and [s for _, s in high_only[HIGH].styles] == [0.5]


def test_dit_replica_of_a_two_expert_model_applies_a_high_low_pair_like_the_pipeline(lora_dir: Path):
    """tiny-a14b in local testing mode: a style only on the low-noise expert gives the pipeline's
    latents with that expert's adapters, and differs from the style on both experts."""
    from ray import serve

    from serve_app.dit import DiTReplica
    from standin.experts import expert_adapters
    from standin.pipeline import DenoiseInputs, GenerationParams, StandInPipeline

    settings = ServeSettings(
        preset="tiny-a14b", sp_degree=1, lora_dir=str(lora_dir), state_dir=str(lora_dir / "state")
    )
    library = LoraLibrary.for_settings(settings)
    [low] = library.check([StyleRef("palette", 1.0, expert="low")])
    [both] = library.check([StyleRef("palette", 1.0)])
    pipe = StandInPipeline.from_preset("tiny-a14b")
    params = GenerationParams(prompt="a face", width=32, height=32, num_frames=5, num_steps=4, seed=5)
    ctx, neg = pipe.encode_prompts(params.prompt, params.negative_prompt)
    conditioning = {"context": ctx, "negative_context": neg, "identity_latents": None}
    handle = serve.run(DiTReplica.bind(settings), _local_testing_mode=True)

    def served(ref: StyleRef) -> torch.Tensor:
        events = list(handle.options(stream=True).denoise.remote(params, conditioning, None, (ref,)))
        assert events[-1]["event"] == "result", events[-1]
        return events[-1]["latents"]

    style = StyleSet([(StyleLoRA.load(lora_dir / "palette.safetensors", pipe.dit), 1.0)])
    low_only = DenoiseInputs.for_request(params, ctx, neg, None, adapters=expert_adapters(None, style))
    assert torch.equal(served(low), pipe.denoise(low_only))
    assert not torch.equal(served(low), served(both))
