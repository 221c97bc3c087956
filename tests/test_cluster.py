"""The Serve app on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster starts
a GCS and one raylet per node as real processes), with the Redis job store.

Layout, a miniature of the GPU profile: a head node with no GPUs runs the controller, the HTTP
proxy, two Ingress and two JobRunner replicas, the Preprocessor and the Decoder; two worker
nodes (custom resources `node_a`, `node_b`) declare 2 logical GPUs each, so one SP=2 DiT replica
({CPU, GPU: 1} × 2, STRICT_PACK) fills a node — as one SP=8 replica fills an 8-GPU node in
production. Nothing runs on a GPU (there is none); Ray only accounts for them.

The cluster cannot share a process with the session's `ray_serve` cluster, so one scenario runs in
a subprocess (`python -m tests.test_cluster <redis_url> <out.json>`) under a hard timeout and
writes what it observed after each stage; the tests below assert on those observations.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.test_jobstore import redis_server

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

log = logging.getLogger("test_cluster")
REPO = Path(__file__).resolve().parents[1]
SCENARIO_TIMEOUT_S = 540
SMALL = {"size": "32x32", "num_frames": 5, "num_inference_steps": 2, "seed": 1}
MEDIUM = {"size": "96x96", "num_frames": 9, "num_inference_steps": 50, "seed": 2}
LONG = {"size": "128x128", "num_frames": 17, "num_inference_steps": 50, "seed": 3}
BURST = 8
WORKER_NODES = ("node_a", "node_b")


# -- the scenario (runs in its own process) ------------------------------------------------------


def _deploy_config(redis_url: str, state_dir: str, port: int) -> dict[str, Any]:
    """The repo's CPU profile (serve_config.yaml), adapted to this cluster layout."""
    import yaml

    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"].update(
        job_store="redis",
        redis_url=redis_url,
        state_dir=state_dir,
        worker_num_cpus=0.2,
        worker_num_gpus=1,  # logical GPUs: one bundle per rank, one replica per node
        lease_s=4,
        retry_backoff_s=0.5,
        collective_timeout_s=30,
    )
    on_head = {"num_cpus": 0.1, "resources": {"head": 0.01}}
    for d in app["deployments"]:
        if d["name"] in ("Ingress", "JobRunner"):
            d.update(num_replicas=2, ray_actor_options=on_head)
        elif d["name"] in ("Preprocessor", "Decoder"):
            d.update(ray_actor_options=on_head)
        elif d["name"] == "DiTReplica":
            d.pop("num_replicas")
            d.update(
                ray_actor_options={"num_cpus": 0.2, "num_gpus": 1},
                placement_group_bundles=[{"CPU": 0.2, "GPU": 1}] * 2,
                placement_group_strategy="STRICT_PACK",
                autoscaling_config={
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": 1,
                    "upscale_delay_s": 1,
                    "downscale_delay_s": 3,
                    "look_back_period_s": 2,
                },
            )
    return config


class Scenario:
    def __init__(self, redis_url: str, out: Path) -> None:
        self.redis_url = redis_url
        self.out = out
        self.seen: dict[str, Any] = {}

    def record(self, **values: Any) -> None:
        self.seen.update(values)
        self.out.write_text(json.dumps(self.seen, indent=1))
        log.info("observed %s", values)

    # -- cluster state ------------------------------------------------------------------------

    def node_names(self) -> dict[str, str]:
        """node id → 'head' / 'node_a' / 'node_b' (by each node's custom resource)."""
        import ray

        names = {}
        for node in ray.nodes():
            if node["Alive"]:
                names[node["NodeID"]] = next(
                    (r for r in ("head", *WORKER_NODES) if r in node["Resources"]), "?"
                )
        return names

    def dit_groups(self) -> list[list[str]]:
        """For every live DiT placement group (bundles with GPUs): the node of each bundle."""
        import ray

        names = self.node_names()
        groups = []
        for pg in ray.util.placement_group_table().values():
            if pg["state"] != "CREATED" or not all(b.get("GPU") for b in pg["bundles"].values()):
                continue
            groups.append([names.get(n, n) for _, n in sorted(pg["bundles_to_node_id"].items())])
        return sorted(groups)

    def app_running(self) -> bool:
        from ray import serve

        app = serve.status().applications.get("standin")
        return app is not None and str(app.status).endswith("RUNNING")

    def running_dit_replicas(self) -> int:
        from ray import serve

        app = serve.status().applications.get("standin")
        if app is None or "DiTReplica" not in app.deployments:
            return 0
        return int(app.deployments["DiTReplica"].replica_states.get("RUNNING", 0))

    def wait_for(self, what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not after {timeout_s:g} s")
            time.sleep(every_s)

    # -- jobs ---------------------------------------------------------------------------------

    def submit(self, **fields: Any) -> str:
        r = self.http.post("/v1/videos", json={"prompt": "a person talks to the camera", **fields})
        r.raise_for_status()
        return r.json()["id"]

    def status(self, video_id: str) -> dict[str, Any]:
        import httpx

        try:
            r = self.http.get(f"/v1/videos/{video_id}")
            return r.json() if r.status_code == 200 else {"status": f"http {r.status_code}"}
        except httpx.HTTPError as exc:  # an ingress replica being replaced
            return {"status": f"unreachable: {exc}"}

    def wait_done(self, video_id: str, timeout_s: float) -> dict[str, Any]:
        return self.wait_for(
            f"{video_id} finished",
            lambda: (v := self.status(video_id))["status"] in ("completed", "failed") and v,
            timeout_s,
        )

    def wait_progress(self, video_id: str, above: int, timeout_s: float = 120) -> None:
        self.wait_for(
            f"{video_id} progress > {above}",
            lambda: self.status(video_id).get("progress", 0) > above,
            timeout_s,
            0.2,
        )

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> None:
        import httpx
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster
        from ray.serve.schema import ServeDeploySchema

        from parallel.rendezvous import free_port
        from serve_app.launcher import deploy_config
        from serve_app.redis_jobs import RedisJobStore

        # Cluster() records its address in /tmp/ray/ray_current_cluster, where a plain ray.init()
        # on this machine would look: put back what was there so we never capture other sessions.
        address_file = Path("/tmp/ray/ray_current_cluster")
        previous = address_file.read_text() if address_file.exists() else None
        started = time.monotonic()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 2,
                "num_gpus": 0,
                "resources": {"head": 1},
                "include_dashboard": False,
            },
        )
        if previous is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(previous)
        nodes = {name: cluster.add_node(num_cpus=2, num_gpus=2, resources={name: 1}) for name in WORKER_NODES}
        port = free_port("127.0.0.1")
        try:
            ray.init(address=cluster.address, namespace="serve", logging_level=logging.WARNING)
            self.record(nodes=sorted(self.node_names().values()), cluster_start_s=time.monotonic() - started)
            config = ServeDeploySchema.model_validate(
                _deploy_config(self.redis_url, str(self.out.parent / "state"), port)
            )
            deploy_config(config, 240)  # what `standin serve` does: the public Serve API
            self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
            self.record(deployed_s=time.monotonic() - started)
            store = RedisJobStore(self.redis_url)

            # (a) one DiT replica; its placement group sits whole on one GPU node.
            first = self.wait_done(self.submit(**SMALL), 120)
            self.record(first_job=first["status"], groups_at_start=self.dit_groups())

            # (b) queue pressure: a second replica, on the other node; idle: back to one.
            t0 = time.monotonic()
            # ~8 job lengths on one replica: the queue must outlast a second replica's start (its
            # actors, imports, process group and weights), which on a loaded 2-core host is slow
            burst = [self.submit(**LONG) for _ in range(BURST)]
            self.wait_for("2 DiT replicas", lambda: self.running_dit_replicas() == 2, 180)
            self.record(scaled_up_s=time.monotonic() - t0, groups_under_load=self.dit_groups())
            self.record(
                burst=[self.wait_done(v, 240)["status"] for v in burst], burst_s=time.monotonic() - t0
            )
            t0 = time.monotonic()
            self.wait_for(
                "1 DiT replica", lambda: self.running_dit_replicas() == 1 and len(self.dit_groups()) == 1, 120
            )
            self.record(scaled_down_s=time.monotonic() - t0, groups_when_idle=self.dit_groups())

            # (c) the GPU node under a running job dies: the job is retried on the other node.
            (victim,) = {n for g in self.dit_groups() for n in g}
            video = self.submit(**LONG)
            self.wait_progress(video, 10)
            t0 = time.monotonic()
            cluster.remove_node(nodes[victim], allow_graceful=False)
            done = self.wait_done(video, 300)
            job = store.get(video)
            self.record(
                killed_node=victim,
                after_node_loss=done["status"],
                attempts_after_node_loss=job.attempts if job else None,
                recovered_s=time.monotonic() - t0,
                groups_after_node_loss=self.dit_groups(),
            )

            # (d) the JobRunner replica running a job dies: the other one claims it from Redis.
            video = self.submit(**MEDIUM)
            self.wait_progress(video, 10)
            runner = store.get(video).lease_owner
            actor = next(
                a
                for a in ray.util.list_named_actors(all_namespaces=True)
                if "#JobRunner#" in a["name"] and a["name"].endswith(runner)
            )
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            t0 = time.monotonic()
            claimer = self.wait_for(
                "another runner claims the job",
                lambda: (
                    (j := store.get(video)) is not None
                    and j.lease_owner not in (None, runner)
                    and j.lease_owner
                ),
                120,
                0.2,
            )
            done = self.wait_done(video, 240)
            job = store.get(video)
            self.record(
                runner_killed=runner,
                claimed_by=claimer,
                after_runner_loss=done["status"],
                attempts_after_runner_loss=job.attempts if job else None,
                runner_recovered_s=time.monotonic() - t0,
                total_s=time.monotonic() - started,
            )
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                cluster.shutdown()  # only this cluster's processes
                if previous is not None:
                    address_file.write_text(previous)


# -- the tests ---------------------------------------------------------------------------------


def run_scenario(module: str, args: list[str], out: Path, timeout_s: float, **env: str) -> dict[str, Any]:
    """Run `python -m <module> <args…>` (a scenario that writes what it saw to `out` after each
    stage) in its own process under a hard timeout → what it saw, plus `_log_tail`."""
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **env}
    full_env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        tail = proc.stderr[-6000:]
    except subprocess.TimeoutExpired as exc:
        tail = f"timed out after {timeout_s} s\n{(exc.stderr or b'')[-6000:]!r}"
    seen = json.loads(out.read_text()) if out.exists() else {}
    seen["_log_tail"] = tail
    return seen


def observation(observed: dict[str, Any], key: str) -> Any:
    assert key in observed, f"the scenario stopped before observing {key!r}:\n{observed['_log_tail']}"
    return observed[key]


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> dict[str, Any]:
    """Run the scenario once; → what it saw (whatever it saw, even when it stopped early)."""
    work = tmp_path_factory.mktemp("cluster")
    out = work / "observed.json"
    with redis_server(work / "redis") as url:
        # Autoscaling decisions within seconds (the default push interval is 10 s).
        return run_scenario(
            "tests.test_cluster",
            [url, str(out)],
            out,
            SCENARIO_TIMEOUT_S,
            RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S="0.5",
            RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S="0.5",
        )


_get = observation


def test_cluster_has_a_head_and_two_gpu_nodes(observed):
    assert _get(observed, "nodes") == ["head", "node_a", "node_b"]
    assert _get(observed, "first_job") == "completed"


def test_dit_placement_group_lands_whole_on_one_gpu_node(observed):
    (group,) = _get(observed, "groups_at_start")
    assert len(group) == 2 and len(set(group)) == 1 and group[0] in WORKER_NODES


def test_queue_pressure_adds_a_replica_on_the_other_node_and_idle_removes_it(observed):
    groups = _get(observed, "groups_under_load")
    assert len(groups) == 2 and all(len(set(g)) == 1 for g in groups)
    assert {g[0] for g in groups} == set(WORKER_NODES)  # one replica per node
    assert _get(observed, "burst") == ["completed"] * BURST
    (group,) = _get(observed, "groups_when_idle")
    assert len(set(group)) == 1


def test_a_node_killed_mid_job_is_survived_by_retrying_on_the_other_node(observed):
    killed = _get(observed, "killed_node")
    assert _get(observed, "after_node_loss") == "completed"
    assert _get(observed, "attempts_after_node_loss") >= 2  # the first attempt died with the node
    (group,) = _get(observed, "groups_after_node_loss")
    assert set(group) == set(WORKER_NODES) - {killed}


def test_a_killed_runner_replica_job_is_claimed_by_another_through_redis(observed):
    assert _get(observed, "claimed_by") != _get(observed, "runner_killed")
    assert _get(observed, "after_runner_loss") == "completed"
    assert _get(observed, "attempts_after_runner_loss") >= 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    Scenario(sys.argv[1], Path(sys.argv[2])).run()
