"""`standin serve`: start a local Ray cluster (or join one), deploy a Serve config, wait.

Uses only Serve's public API: the config is checked first (`ServeDeploySchema`, then our
`ServeSettings` with each deployment's replica count — a bad key fails here, named, before
anything starts), then `serve.start` with its HTTP options and `serve.run` of each application,
built by our builder with the config's `deployments` options applied (`Deployment.options`).
The same YAML works with Ray's CLI (`serve run`, `serve deploy`) and KubeRay. On Ctrl-C / SIGTERM
it shuts down Serve and — only if it started it — the local Ray cluster; it never touches other
Ray processes on the machine.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from serve_app.settings import ServeSettings, SettingsError, replicas_of

log = logging.getLogger(__name__)

PROFILES = {
    "gpu": Path(__file__).parent / "profiles" / "gpu.yaml",
    "gpu-wan2.2": Path(__file__).parent / "profiles" / "gpu-wan2.2.yaml",
    "gpu-vace": Path(__file__).parent / "profiles" / "gpu-vace.yaml",
}
# ServeSettings args that name files: made absolute here, since replicas run elsewhere.
PATH_ARGS = (
    "checkpoint_dir",
    "standin_checkpoint",
    "standin_low_checkpoint",
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


def wait_until_running(
    app_names: list[str], timeout_s: float, failures: list[BaseException] | None = None
) -> None:
    """Block until every application is RUNNING; raise with Serve's message if one fails."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        if failures:
            raise RuntimeError(f"deployment failed: {failures[0]}")
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


def check_config(config: dict[str, Any]) -> None:
    """Validate every application's settings against its deployments; SystemExit naming the key."""
    for app in config.get("applications", []):
        try:
            ServeSettings.from_args(app.get("args") or {}, replicas=replicas_of(app.get("deployments") or []))
        except SettingsError as exc:
            raise SystemExit(f"error: application {app.get('name')!r}: {exc}") from None


def _builder(import_path: str) -> Any:
    module, _, attr = import_path.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _deploy(app: Any, failures: list[BaseException]) -> None:
    """serve.run blocks until the application is RUNNING (or raises); run it beside the wait."""
    from ray import serve

    try:
        deployments = [d.model_dump(exclude_unset=True) for d in app.deployments]
        built = _builder(app.import_path)(app.args, deployments=deployments)
        serve.run(built, name=app.name, route_prefix=app.route_prefix, blocking=False)
    except BaseException as exc:
        failures.append(exc)


def deploy_config(config: Any, ready_timeout_s: float) -> None:
    """Start Serve with the config's HTTP options and deploy its applications (public API only)
    on the connected Ray cluster; returns when all are RUNNING. `config`: a ServeDeploySchema."""
    from ray import serve

    serve.start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
        grpc_options=config.grpc_options.model_dump(),
    )
    failures: list[BaseException] = []
    for app in config.applications:
        threading.Thread(target=_deploy, args=(app, failures), daemon=True).start()
    wait_until_running([a.name for a in config.applications], ready_timeout_s, failures)


def serve_main(
    config_path: Path,
    *,
    address: str | None = None,
    host: str | None = None,
    port: int | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    ready_timeout_s: float = 600.0,
    block: bool = True,
) -> int:
    """Deploy `config_path`; with `block`, serve until interrupted. Returns an exit status."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A cluster this command starts is private to it; `serve status` against it needs the same mode.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    raw = load_config(config_path, host, port)
    check_config(raw)
    config = ServeDeploySchema.model_validate(raw)
    started_cluster = address is None
    ray.init(
        address=address,
        namespace="serve",
        num_cpus=num_cpus if started_cluster else None,
        num_gpus=num_gpus if started_cluster else None,
        include_dashboard=False if started_cluster else None,
        logging_level=logging.WARNING,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy_config(config, ready_timeout_s)
        http = config.http_options
        log.info("Stand-In Serve is ready at http://%s:%s  (Ctrl-C stops it)", http.host, http.port)
        while block and not stop.wait(1.0):
            pass
        return 0
    except (RuntimeError, TimeoutError) as exc:
        log.error("%s", exc)
        return 1
    finally:
        log.info("shutting down")
        if started_cluster:
            serve.shutdown()
        else:  # someone else's cluster: remove only what we deployed
            for app in config.applications:
                serve.delete(app.name)
        ray.shutdown()
