"""Static checks of cluster/: the KubeRay RayService, the Ray cluster launcher config and the
container recipe agree with the repo's GPU Serve profile and with each other. (No Kubernetes, cloud
or docker engine here: they are parsed, not applied or built.)"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.settings import ServeSettings

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
PROFILE_TEXT = (REPO / "serve_app" / "profiles" / "gpu.yaml").read_text()
PROFILE = yaml.safe_load(PROFILE_TEXT)
RAYSERVICE = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
LAUNCHER = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
STORAGE = list(yaml.safe_load_all((CLUSTER / "kuberay" / "storage.yaml").read_text()))


def _sync_module():
    spec = importlib.util.spec_from_file_location("sync_serve_config", CLUSTER / "sync_serve_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _app(config: dict[str, Any]) -> dict[str, Any]:
    (app,) = config["applications"]
    return app


def _deployment(name: str) -> dict[str, Any]:
    return next(d for d in _app(PROFILE)["deployments"] if d["name"] == name)


def _group(name: str) -> dict[str, Any]:
    return next(
        g for g in RAYSERVICE["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == name
    )


def _pods() -> dict[str, dict[str, Any]]:
    spec = RAYSERVICE["spec"]["rayClusterConfig"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return pods


def _gpus(pod: dict[str, Any]) -> int:
    (container,) = pod["containers"]
    return int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


# -- the RayService ------------------------------------------------------------------------------


def test_rayservice_embeds_the_repo_gpu_profile_verbatim():
    assert RAYSERVICE["apiVersion"] == "ray.io/v1" and RAYSERVICE["kind"] == "RayService"
    assert RAYSERVICE["spec"]["serveConfigV2"] == PROFILE_TEXT
    ServeDeploySchema.model_validate(yaml.safe_load(RAYSERVICE["spec"]["serveConfigV2"]))
    assert _sync_module().main(["--check"]) == 0


def test_the_sync_script_repairs_drift_and_touches_nothing_else():
    sync = _sync_module()
    manifest = (CLUSTER / "kuberay" / "rayservice.yaml").read_text()
    edited = PROFILE_TEXT.replace("max_replicas: 4", "max_replicas: 6")
    assert edited != PROFILE_TEXT
    drifted = sync.embed(manifest, edited)
    assert yaml.safe_load(drifted)["spec"]["serveConfigV2"] == edited
    assert sync.embed(drifted, PROFILE_TEXT) == manifest
    outside = [
        line for line in manifest.splitlines() if not line.startswith("    ") or "serveConfigV2" in line
    ]
    assert outside == [
        line for line in drifted.splitlines() if not line.startswith("    ") or "serveConfigV2" in line
    ]


def test_head_runs_no_replicas_and_the_autoscaler_is_on():
    cluster = RAYSERVICE["spec"]["rayClusterConfig"]
    params = cluster["headGroupSpec"]["rayStartParams"]
    assert params["num-gpus"] == "0" and params["num-cpus"] == "0"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == ray.__version__


def test_gpu_worker_pods_hold_exactly_one_dit_replica_and_scale_with_serve():
    dit = _deployment("DiTReplica")
    bundles = dit["placement_group_bundles"]
    assert dit["placement_group_strategy"] == "STRICT_PACK"
    assert len(bundles) == _gpus(_pods()["gpu-dit"]) == 8  # one rank per GPU of the pod
    assert all(b["GPU"] <= 1 for b in bundles)
    assert len(bundles) == _app(PROFILE)["args"]["sp_degree"] * _app(PROFILE)["args"]["cfg_degree"]
    group, scaling = _group("gpu-dit"), dit["autoscaling_config"]
    assert (group["minReplicas"], group["maxReplicas"]) == (scaling["min_replicas"], scaling["max_replicas"])
    (container,) = _pods()["gpu-dit"]["containers"]
    cpus = float(container["resources"]["limits"]["cpu"])
    assert cpus >= sum(b["CPU"] for b in bundles)
    shm = next(v for v in _pods()["gpu-dit"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"mountPath": "/dev/shm", "name": "dshm"} in container["volumeMounts"]


def test_the_profile_fits_one_plain_8_gpu_node_without_custom_resources():
    """8 ranks × 0.9 GPU leave 0.1 on every GPU; the Preprocessor and Decoder together ask for at
    most 0.1, so even packed onto one GPU they leave a whole rank's share on every GPU (the Decoder
    asks for none: the DiT's ranks decode)."""
    deployments = _app(PROFILE)["deployments"]
    assert all("resources" not in d.get("ray_actor_options", {}) for d in deployments)
    (per_rank,) = {b["GPU"] for b in _deployment("DiTReplica")["placement_group_bundles"]}
    assert 0.5 < per_rank <= 1  # two ranks never share a GPU
    aux = [_deployment(n) for n in ("Preprocessor", "Decoder")]
    assert _app(PROFILE)["args"]["decode_on"] == "dit"
    assert "num_gpus" not in _deployment("Decoder")["ray_actor_options"]
    aux_gpu = sum(d["num_replicas"] * d["ray_actor_options"].get("num_gpus", 0) for d in aux)
    assert aux_gpu > 0 and per_rank + aux_gpu <= 1.0 + 1e-9
    cpus = sum(b["CPU"] for b in _deployment("DiTReplica")["placement_group_bundles"])
    cpus += sum(d["num_replicas"] * d["ray_actor_options"]["num_cpus"] for d in aux)
    (container,) = _pods()["gpu-dit"]["containers"]
    assert cpus <= float(container["resources"]["limits"]["cpu"])
    groups = RAYSERVICE["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} == {"cpu", "gpu-dit"}
    assert all("resources" not in g["rayStartParams"] for g in groups)


def test_ingress_pods_are_ready_only_when_our_healthz_says_so():
    from serve_app.ingress import app

    probe = _pods()["cpu"]["containers"][0]["readinessProbe"]["httpGet"]
    assert probe["path"] in app.openapi()["paths"]
    assert probe["port"] == PROFILE["http_options"]["port"]
    assert RAYSERVICE["spec"]["excludeHeadPodFromServeSvc"] is True


def test_every_pod_gets_secrets_from_a_secret_and_the_redis_job_store():
    for name, pod in _pods().items():
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        for var, key in (("STANDIN_API_KEYS", "api-keys"), ("STANDIN_REDIS_URL", "redis-url")):
            assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "standin-secrets", "key": key}, name
        assert env["STANDIN_JOB_STORE"]["value"] == "redis"
        fields = {f.upper() for f in ServeSettings.model_fields}
        assert all(v[len("STANDIN_") :] in fields for v in env if v.startswith("STANDIN_")), name
        # What a replica in this pod would run with.
        plain = {k: e.get("value", "secret") for k, e in env.items()}
        settings = ServeSettings.from_args(_app(PROFILE)["args"], env=plain)
        assert settings.job_store == "redis" and settings.redis_url == "secret"


def test_checkpoints_are_mounted_read_only_where_the_profile_looks_for_them():
    args = _app(PROFILE)["args"]
    claims = {d["metadata"]["name"]: d for d in STORAGE if d["kind"] == "PersistentVolumeClaim"}
    for name, pod in _pods().items():
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        models = mounts["/models"]
        assert models["readOnly"] is True, name
        for key in ("checkpoint_dir", "face_model_dir", "parser_weights"):
            assert args[key].startswith("/models/"), key
        results = mounts[f"{args['state_dir']}/results"]  # the default results location
        for mount in (models, results):
            claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
            assert claim in claims, (name, claim)
    assert claims["standin-results"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_all_pods_run_the_same_image():
    images = {p["containers"][0]["image"] for p in _pods().values()}
    assert len(images) == 1 and images.pop() == LAUNCHER["docker"]["image"]


# -- the cluster launcher config -----------------------------------------------------------------


def test_launcher_config_has_the_same_layout():
    types = LAUNCHER["available_node_types"]
    assert types[LAUNCHER["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}
    assert types[LAUNCHER["head_node_type"]]["max_workers"] == 0
    head_start = " ".join(LAUNCHER["head_start_ray_commands"])
    assert "--num-gpus=0" in head_start and "--head" in head_start
    dit = _deployment("DiTReplica")
    assert types["gpu_dit"]["resources"]["GPU"] == len(dit["placement_group_bundles"])  # a rank per GPU
    scaling = dit["autoscaling_config"]
    assert (types["gpu_dit"]["min_workers"], types["gpu_dit"]["max_workers"]) == (
        scaling["min_replicas"],
        scaling["max_replicas"],
    )
    assert set(types) == {"head", "cpu", "gpu_dit"}
    assert all(set(t["resources"]) <= {"CPU", "GPU"} for t in types.values())  # no custom resources
    assert LAUNCHER["max_workers"] >= sum(t["max_workers"] for t in types.values())
    options = " ".join(LAUNCHER["docker"]["run_options"])
    assert "/models:ro" in options and "--shm-size" in options and "--gpus all" in options


# -- the container recipe ------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (CLUSTER / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    steps = _dockerfile()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def test_image_has_cuda_torch_and_installs_our_package():
    steps = _final_stage()
    assert steps[0][1].startswith("nvidia/cuda:") and "runtime" in steps[0][1]
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert re.search(r'pip install "torch==\$\{TORCH_VERSION\}" --index-url "\$\{TORCH_INDEX\}"', runs)
    args = dict(arg.split("=", 1) for op, arg in _dockerfile() if op == "ARG" and "=" in arg)
    assert args["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")
    assert args["TORCH_VERSION"] == (REPO / "constraints.txt").read_text().split("torch==")[1].split()[0]
    assert re.search(r"pip install -c /opt/constraints.txt \.(\s|$)", runs)  # the package, torch held
    assert "wget" in runs  # KubeRay's default probes call it
    assert "flash-attn" in " ".join(arg for _, arg in _dockerfile())  # optional build stage


def test_image_copies_every_package_and_no_weights():
    # [tool.setuptools.packages.find] include = ["standin*", …]  (tomllib needs Python 3.11)
    include = re.search(r"^include = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), re.M)
    packages = {p.strip().strip('"').rstrip("*") for p in include.group(1).split(",")}
    assert packages >= {"standin", "serve_app"}
    copied = set()
    for op, arg in _dockerfile():
        if op in ("COPY", "ADD") and not arg.startswith("--from"):
            *sources, _dest = shlex.split(arg)
            for src in sources:
                assert (REPO / src).exists(), src
                assert not re.search(r"(models|checkpoints?|\.safetensors|\.ckpt|\.pth)", src), src
                copied.add(src)
    assert packages <= copied
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    for pattern in ("**/*.safetensors", "**/*.ckpt", "**/*.pth", "outputs/", ".git/"):
        assert pattern in ignored
    assert ("VOLUME", '["/models"]') in _final_stage()


def test_image_runs_as_a_non_root_user():
    users = [arg for op, arg in _final_stage() if op == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    run_after_user = [
        op for op, _ in _final_stage()[[op for op, _ in _final_stage()].index("USER") :] if op == "RUN"
    ]
    assert run_after_user == []  # nothing installs as that user, so nothing is writable in the image


@pytest.mark.parametrize("path", ["kuberay/rayservice.yaml", "kuberay/storage.yaml", "ray-cluster.yaml"])
def test_manifests_are_plain_yaml_without_tabs(path: str):
    text = (CLUSTER / path).read_text()
    assert "\t" not in text and list(yaml.safe_load_all(text))
