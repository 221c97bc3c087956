"""Fast checks of serve_app's parts without a Ray cluster: request parsing, settings,
the OpenAPI document, error hygiene, and the DiT deployment's logic in Serve's local testing
mode (SP degree 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from serve_app.api import APIError, parse_range, parse_video_request
from serve_app.settings import ServeSettings, SettingsError, replicas_of

REPO = Path(__file__).resolve().parents[1]

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


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "size", "model", "subject"])
@pytest.mark.parametrize("bad", ["a \ud800 b", "tail \udfff", "nul \x00 inside"])
def test_strings_that_are_not_clean_unicode_get_400(field, bad):
    """A lone surrogate is valid JSON (\\ud800) but not Unicode; NUL is never meant. Before, the
    prompt answered 500 and negative_prompt 202 → three retries → a traceback in the job."""
    fields = {"prompt": "x", field: bad}
    for form in (False, True):
        with pytest.raises(APIError) as err:
            parse_video_request(fields, None, SETTINGS, form=form)
        assert (err.value.status, err.value.param, err.value.code) == (400, field, "invalid_string")
        err.value.body()["error"]["message"].encode("utf-8")  # the answer itself is clean


def test_an_unknown_field_name_that_is_not_unicode_gets_400():
    with pytest.raises(APIError) as err:
        parse_video_request({"prompt": "x", "bad\ud800": 1}, None, SETTINGS, form=False)
    assert err.value.status == 400
    err.value.body()["error"]["message"].encode("utf-8")


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
    with pytest.raises(SettingsError, match="unknown serve_app args"):
        ServeSettings.from_args({"sp_degre": 2}, env={})


def test_speed_settings_default_to_the_safe_mode_and_read_the_environment():
    s = ServeSettings.from_args({}, env={})
    assert (s.attention_backend, s.compile_blocks, s.agreement, s.warmup, s.decode_on) == (
        "auto", False, "per_collective", True, "decoder")
    env = {"STANDIN_COMPILE_BLOCKS": "true", "STANDIN_AGREEMENT": "per_step", "STANDIN_WARMUP": "0",
           "STANDIN_ATTENTION_BACKEND": "sdpa_flash", "STANDIN_DECODE_ON": "dit"}
    s = ServeSettings.from_args({}, env=env)
    assert (s.attention_backend, s.compile_blocks, s.agreement, s.warmup, s.decode_on) == (
        "sdpa_flash", True, "per_step", False, "dit")


@pytest.mark.parametrize(
    ("args", "env", "key"),
    [
        ({"sp_degree": 0}, {}, "sp_degree"),
        ({"lease_s": -1}, {}, "lease_s"),
        ({}, {"STANDIN_MAX_ATTEMPTS": "three"}, "max_attempts"),
        ({"dtype": "float64"}, {}, "dtype"),
        ({"job_store": "postgres"}, {}, "job_store"),
        ({"job_store": "redis"}, {}, "redis_url"),
        ({"cfg_degree": 3}, {}, "cfg_degree"),
        ({"attention_backend": "flash4"}, {}, "attention_backend"),
        ({}, {"STANDIN_AGREEMENT": "never"}, "agreement"),
        ({"decode_on": "gpu"}, {}, "decode_on"),
        ({}, {"STANDIN_COMPILE_BLOCKS": "maybe"}, "compile_blocks"),
    ],
)
def test_bad_settings_fail_at_start_naming_the_key(args, env, key):
    with pytest.raises(SettingsError) as err:
        ServeSettings.from_args(args, env=env)
    assert str(err.value).split("settings: ", 1)[1].startswith(key), str(err.value)


def test_more_than_one_job_replica_needs_the_shared_store():
    for name in ("Ingress", "JobRunner"):
        many = replicas_of([{"name": name, "num_replicas": 2}])
        with pytest.raises(SettingsError, match=f"job_store: 2 {name} replicas need a shared job store"):
            ServeSettings.from_args({}, env={}, replicas=many)
        shared = ServeSettings.from_args(
            {"job_store": "redis", "redis_url": "redis://r:6379/0"}, env={}, replicas=many
        )
        assert shared.job_store == "redis"
    auto = {"min_replicas": 1, "max_replicas": 3}
    scaled = replicas_of([{"name": "JobRunner", "autoscaling_config": auto}])
    assert scaled == {"JobRunner": 3}
    with pytest.raises(SettingsError):
        ServeSettings.from_args({}, env={}, replicas=scaled)


@pytest.mark.parametrize("config", ["serve_config.yaml", "serve_app/profiles/gpu.yaml"])
def test_shipped_configs_pass_the_start_up_checks_and_name_their_job_store(config):
    from serve_app.launcher import check_config

    raw = yaml.safe_load((REPO / config).read_text())
    check_config(raw)
    (app,) = raw["applications"]
    assert app["args"]["job_store"] == "sqlite"
    assert {d["name"] for d in app["deployments"]} >= {"Ingress", "JobRunner", "DiTReplica"}


def test_the_launcher_uses_only_public_serve_apis():
    for path in (REPO / "serve_app").rglob("*.py"):
        assert "_private" not in path.read_text(), path


def test_openapi_describes_both_request_bodies_the_202_video_and_errors():
    from serve_app.ingress import app

    doc = app.openapi()
    create = doc["paths"]["/v1/videos"]["post"]
    content = create["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    schemas = doc["components"]["schemas"]
    form = schemas[content["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert form["properties"]["input_reference"]["anyOf"][0]["format"] == "binary"
    body = schemas[content["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert "prompt" in body["required"] and body["additionalProperties"] is False
    assert "200" not in create["responses"]
    video = create["responses"]["202"]["content"]["application/json"]["schema"]["$ref"]
    assert video.endswith("/Video") and "queue_position" in schemas["Video"]["properties"]
    for status in ("400", "413", "415", "422", "429"):
        ref = create["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
    assert set(schemas["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}


def test_errors_kept_for_clients_carry_no_traceback_or_internals():
    """A remote exception arrives as a RayTaskError whose text is a traceback with paths, pid,
    host and actor id; what the job keeps is the original's first line."""
    import ray

    from serve_app.runner import classify_preprocessing_error, public_message
    from standin.errors import InvalidImageError

    @ray.remote(num_cpus=0)  # schedulable even when the shared cluster's CPUs are all taken
    def refuse() -> None:
        raise InvalidImageError("no face found in the reference image")

    # The session's shared cluster (tests/conftest.py) may already run: use it, never stop it.
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        with pytest.raises(InvalidImageError) as err:
            ray.get(refuse.remote())
    finally:
        if started:
            ray.shutdown()
    assert "Traceback" in str(err.value) or "pid=" in str(err.value)  # what used to be stored
    failure = classify_preprocessing_error(err.value)
    assert failure is not None and failure.code == "invalid_image"
    assert str(failure) == public_message(err.value) == "no face found in the reference image"
    assert classify_preprocessing_error(RuntimeError("CUDA out of memory")) is None  # retried


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
    assert [e["step"] for e in events[1:-1]] == [1, 2, 3] and events[-1]["event"] == "result"

    expected = pipe.denoise(DenoiseInputs.for_request(params, ctx, neg, identity))
    torch.testing.assert_close(events[-1]["latents"], expected, rtol=1e-4, atol=1e-5)

    assert events[0] == {"event": "started"}  # queued until the replica starts the request
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
