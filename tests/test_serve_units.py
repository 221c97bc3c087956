"""Fast checks of serve_app's parts without a Ray cluster: request parsing, settings,
and the DiT deployment's logic in Serve's local testing mode (SP degree 1)."""

from __future__ import annotations

import pytest
import torch

from serve_app.api import APIError, parse_range, parse_video_request
from serve_app.settings import ServeSettings

# The job store's contract (both backends) is in tests/test_jobstore.py.


SETTINGS = ServeSettings(max_width=256, max_height=256, max_frames=33, max_steps=10, max_prompt_chars=100)


def test_form_and_json_fields_give_the_same_params():
    form = parse_video_request(
        {"prompt": "hi", "size": "64x32", "seconds": "1", "seed": "5", "guidance_scale": "3.5"},
        None,
        SETTINGS,
        form=True,
    )
    as_json = parse_video_request(
        {"prompt": "hi", "size": "64x32", "num_frames": 17, "seed": 5, "guidance_scale": 3.5},
        None,
        SETTINGS,
        form=False,
    )
    assert form.params == as_json.params
    assert (form.params.width, form.params.height, form.params.num_frames) == (64, 32, 17)


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"prompt": "x", "size": "512x512"}, 422, "size"),
        ({"prompt": "x", "num_frames": 37}, 422, "num_frames"),
        ({"prompt": "x", "seconds": "3"}, 422, "seconds"),
        ({"prompt": "x", "num_inference_steps": 11}, 422, "num_inference_steps"),
        ({"prompt": "x" * 101}, 422, "prompt"),
        ({"prompt": "x", "fps": 0}, 422, "fps"),
        ({"prompt": "x", "shift": "nan"}, 400, "shift"),
    ],
)
def test_limits_from_settings_are_enforced(fields, status, param):
    with pytest.raises(APIError) as err:
        parse_video_request(fields, None, SETTINGS, form=False)
    assert (err.value.status, err.value.param) == (status, param)


def test_byte_ranges():
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=95-200", 100) == (95, 99)
    assert parse_range("bytes=100-", 100) is None
    assert parse_range("bytes=5-2", 100) is None
    assert parse_range("items=0-1", 100) is None


def test_environment_overrides_config_args_and_unknown_args_fail():
    s = ServeSettings.from_args(
        {"sp_degree": 2, "preset": "tiny"},
        env={"STANDIN_SP_DEGREE": "4", "STANDIN_API_KEYS": "a, b", "STANDIN_LEASE_S": "2.5"},
    )
    assert (s.sp_degree, s.api_keys, s.lease_s, s.model_name) == (4, ("a", "b"), 2.5, "tiny")
    # Keys never come from the config file.
    assert ServeSettings.from_args({"api_keys": ["x"]}, env={}).api_keys == ()
    with pytest.raises(ValueError, match="unknown serve_app args"):
        ServeSettings.from_args({"sp_degre": 2}, env={})


def test_dit_deployment_streams_progress_and_matches_the_pipeline():
    """Local testing mode (no cluster): SP degree 1 through parallel.SPRunner == StandInPipeline."""
    from ray import serve

    from serve_app.dit import DiTReplica
    from standin.pipeline import DenoiseInputs, GenerationParams, StandInPipeline

    pipe = StandInPipeline.from_preset("tiny")
    params = GenerationParams(prompt="a face", width=32, height=32, num_frames=5, num_steps=3, seed=11)
    ctx, neg = pipe.encode_prompts(params.prompt, params.negative_prompt)
    identity = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = {"context": ctx, "negative_context": neg, "identity_latents": identity}

    handle = serve.run(DiTReplica.bind(ServeSettings(sp_degree=1)), _local_testing_mode=True)
    events = list(handle.options(stream=True).denoise.remote(params, conditioning))
    assert [e["step"] for e in events[:-1]] == [1, 2, 3] and events[-1]["event"] == "result"

    expected = pipe.denoise(DenoiseInputs.for_request(params, ctx, neg, identity))
    torch.testing.assert_close(events[-1]["latents"], expected, rtol=1e-4, atol=1e-5)

    bad = {**conditioning, "context": torch.zeros(1, 4, 3)}
    error = list(handle.options(stream=True).denoise.remote(params, bad))[-1]
    assert error["event"] == "error" and error["kind"] == "invalid"
    assert handle.stats.remote().result()["completed"] == 1


def test_preprocessor_encodes_exactly_what_the_pipeline_encodes():
    """Local testing mode: the served prompt/identity encodings equal StandInPipeline's (the
    identity at the preset's trained reference size), so the server and the CLI make one video."""
    from pathlib import Path

    from ray import serve

    from serve_app.preprocessor import Preprocessor
    from standin.face import FaceConfig, FacePreprocessor
    from standin.pipeline import StandInPipeline

    photo = (Path(__file__).parent / "data" / "faces" / "astronaut.jpg").read_bytes()
    handle = serve.run(Preprocessor.bind(ServeSettings()), _local_testing_mode=True)
    served = handle.encode.remote("a face", "blurry", photo).result()

    pipe = StandInPipeline.from_preset("tiny")
    ctx, neg = pipe.encode_prompts("a face", "blurry")
    identity = pipe.encode_identity(FacePreprocessor(FaceConfig()).process_bytes(photo).to_array())
    assert identity.shape[-2:] == (pipe.preset.reference_size // 8,) * 2
    torch.testing.assert_close(served["identity_latents"], identity.cpu())
    torch.testing.assert_close(served["context"], ctx.cpu())
    torch.testing.assert_close(served["negative_context"], neg.cpu())
