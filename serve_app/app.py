"""The application graph, composed in one place:
Ingress (HTTP) · JobRunner → (Preprocessor, DiTReplica, Decoder).

The Ingress only validates, stores and answers; the JobRunner claims and runs jobs (it is bound
under the Ingress so that one application holds every deployment). `serve_config.yaml` points at
`serve_app.app:build_app` and passes `args` (see `ServeSettings`); replicas, resources, placement
groups and autoscaling live in its `deployments` section, which `serve run` / `serve deploy`
apply, and which `standin serve` passes here as `deployments`.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.deployment import Deployment

from serve_app.decoder import Decoder
from serve_app.dit import DiTReplica
from serve_app.ingress import Ingress
from serve_app.preprocessor import Preprocessor
from serve_app.runner import JobRunner
from serve_app.settings import ServeSettings, replicas_of


def build_app(
    args: dict[str, Any] | None = None, deployments: list[dict[str, Any]] | None = None
) -> Application:
    """Serve application builder (`import_path: serve_app.app:build_app`). `deployments`: a Serve
    config's per-deployment options (name + the fields `Deployment.options` takes)."""
    settings = ServeSettings.from_args(args, replicas=replicas_of(deployments or []))
    overrides = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in deployments or []}

    def configured(deployment: Deployment) -> Deployment:
        options = overrides.get(deployment.name)
        return deployment.options(**options) if options else deployment

    dit = DiTReplica
    if settings.world_size > 1:
        # Code default for the SP group (one bundle per rank); the config may override it.
        bundle = {"CPU": settings.worker_num_cpus}
        if settings.worker_num_gpus:
            bundle["GPU"] = settings.worker_num_gpus
        dit = DiTReplica.options(
            placement_group_bundles=[bundle] * settings.world_size,
            placement_group_strategy="STRICT_PACK",
            ray_actor_options={"num_cpus": settings.worker_num_cpus, "num_gpus": settings.worker_num_gpus},
        )
    runner = configured(JobRunner).bind(
        settings,
        configured(Preprocessor).bind(settings),
        configured(dit).bind(settings),
        configured(Decoder).bind(settings),
    )
    return configured(Ingress).bind(settings, runner)
