"""`standin serve`: start a local Ray cluster (or join one), deploy a Serve config, wait.

Deploys exactly as `serve run <config>` does (the controller builds the app from its
`import_path` and applies the `deployments` overrides), so the same YAML works with Ray's CLI,
`serve deploy` and KubeRay. On Ctrl-C / SIGTERM it shuts down Serve and — only if it started
it — the local Ray cluster; it never touches other Ray processes on the machine.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

PROFILES = {"gpu": Path(__file__).parent / "profiles" / "gpu.yaml"}
# ServeSettings args that name files: made absolute here, since replicas run elsewhere.
PATH_ARGS = (
    "checkpoint_dir",
    "standin_checkpoint",
    "face_model_dir",
    "parser_weights",
    "state_dir",
    "db_path",
)


def load_config(path: Path, host: str | None = None, port: int | None = None) -> dict[str, Any]:
    """Read a Serve config file; apply --host/--port; resolve relative paths in app args."""
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SystemExit(f"error: cannot read the Serve config: {exc}") from None
    http = config.setdefault("http_options", {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    for app in config.get("applications", []):
        args = app.get("args") or {}
        for key in PATH_ARGS:
            if args.get(key):
                args[key] = str(Path(os.path.expanduser(str(args[key]))).resolve())
        if args.get("results_url") and "://" not in args["results_url"]:
            args["results_url"] = str(Path(args["results_url"]).expanduser().resolve())
    return config


def wait_until_running(app_names: list[str], timeout_s: float) -> None:
    """Block until every application is RUNNING; raise with Serve's message if one fails."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {name: apps.get(name) for name in app_names}
        failed = {
            n: a.message for n, a in states.items() if a is not None and str(a.status).endswith("FAILED")
        }
        if failed:
            raise RuntimeError(f"deployment failed: {failed}")
        if all(a is not None and str(a.status).endswith("RUNNING") for a in states.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications not RUNNING after {timeout_s:g}s: {states}")
        time.sleep(1.0)


def serve_main(
    config_path: Path,
    *,
    address: str | None = None,
    host: str | None = None,
    port: int | None = None,
    num_cpus: float | None = None,
    ready_timeout_s: float = 600.0,
    block: bool = True,
) -> int:
    """Deploy `config_path`; with `block`, serve until interrupted. Returns an exit status."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A cluster this command starts is private to it; `serve status` against it needs the same mode.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.serve._private import api as serve_api  # the code path `serve run <config>` takes
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(load_config(config_path, host, port))
    started_cluster = address is None
    ray.init(
        address=address,
        namespace="serve",
        num_cpus=num_cpus if started_cluster else None,
        include_dashboard=False if started_cluster else None,
        logging_level=logging.WARNING,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        client = serve_api.serve_start(
            http_options=config.http_options.model_dump(),
            proxy_location=config.proxy_location,
            grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
        )
        client.deploy_apps(config, _blocking=False)
        names = [a.name for a in config.applications]
        wait_until_running(names, ready_timeout_s)
        http = config.http_options
        log.info("Stand-In Serve is ready at http://%s:%s  (Ctrl-C stops it)", http.host, http.port)
        while block and not stop.wait(1.0):
            pass
        return 0
    except (RuntimeError, TimeoutError) as exc:
        log.error("%s", exc)
        return 1
    finally:
        from ray import serve

        log.info("shutting down")
        if started_cluster:
            serve.shutdown()
        else:  # someone else's cluster: remove only what we deployed
            for app in config.applications:
                serve.delete(app.name)
        ray.shutdown()
