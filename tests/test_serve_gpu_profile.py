"""The GPU profile (serve_app/profiles/gpu.yaml) placed on one plain 8-GPU node.

A private Ray cluster in a subprocess declares what such a node has — 8 GPUs, 48 CPUs, no custom
resources — and the profile is deployed with every resource request exactly as written (8 DiT
bundles, the Preprocessor and Decoder, the Ingress and the JobRunner); only the model is swapped
for the tiny preset on CPU tensors (no GPU here; Ray only accounts for them). The app must reach
RUNNING, with the DiT placement group whole on the node and the aux deployments sharing its GPUs.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_cluster import observation, run_scenario

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "serve_app" / "profiles" / "gpu.yaml"
NODE = {"num_cpus": 48, "num_gpus": 8}
TIMEOUT_S = 540


def tiny_profile(state_dir: str, port: int) -> dict[str, Any]:
    """The GPU profile with the model swapped for the tiny preset on CPU; resources untouched."""
    config = yaml.safe_load(PROFILE.read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    args = config["applications"][0]["args"]
    for key in ("checkpoint_dir", "face_model_dir", "parser_weights", "model_name"):
        args.pop(key, None)
    args.update(
        preset="tiny",
        device="cpu",
        dtype="float32",
        face_backend="offline",
        dist_backend="gloo",
        collective_timeout_s=120,
        state_dir=state_dir,
    )
    return config


def scenario(out: Path) -> None:
    import httpx
    import ray
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from parallel.rendezvous import free_port
    from serve_app.launcher import check_config, deploy_config

    seen: dict[str, Any] = {}

    def record(**values: Any) -> None:
        seen.update(values)
        out.write_text(json.dumps(seen, indent=1))

    raw = tiny_profile(str(out.parent / "state"), free_port("127.0.0.1"))
    check_config(raw)
    ray.init(**NODE, include_dashboard=False, namespace="serve", logging_level=logging.WARNING)
    try:
        record(node=ray.cluster_resources())
        deploy_config(ServeDeploySchema.model_validate(raw), TIMEOUT_S - 120)
        app = serve.status().applications["standin"]
        record(
            status=str(app.status),
            deployments={n: str(d.status) for n, d in app.deployments.items()},
            available=ray.available_resources(),
            dit_groups=[
                {"state": pg["state"], "strategy": pg["strategy"], "bundles": list(pg["bundles"].values())}
                for pg in ray.util.placement_group_table().values()
                if pg["state"] == "CREATED"
            ],
        )
        port = raw["http_options"]["port"]
        record(healthz=httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu-profile") / "observed.json"
    return run_scenario("tests.test_serve_gpu_profile", [str(out)], out, TIMEOUT_S)


_get = observation


def test_the_gpu_profile_reaches_running_on_one_plain_8_gpu_node(observed):
    assert _get(observed, "node")["GPU"] == 8
    assert _get(observed, "status").endswith("RUNNING"), observed["_log_tail"]
    names = {"Ingress", "JobRunner", "Preprocessor", "DiTReplica", "Decoder"}
    assert set(_get(observed, "deployments")) == names
    assert _get(observed, "healthz") == 200


def test_the_dit_group_takes_one_gpu_share_per_rank_and_the_aux_deployments_share_the_rest(observed):
    (group,) = _get(observed, "dit_groups")
    assert group["strategy"] == "STRICT_PACK" and len(group["bundles"]) == 8
    assert all(b["GPU"] == pytest.approx(0.9) for b in group["bundles"])
    # 8 × 0.9 for the ranks + 0.05 for the Preprocessor = 7.25 of 8 (the DiT's ranks decode).
    assert _get(observed, "available")["GPU"] == pytest.approx(8 - 7.25)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    scenario(Path(sys.argv[1]))
