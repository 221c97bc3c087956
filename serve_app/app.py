"""The application graph, composed in one place: Ingress → (Preprocessor, DiTReplica, Decoder).

`serve_config.yaml` points at `serve_app.app:build_app` and passes `args` (see
`ServeSettings`); replicas, resources, placement groups and autoscaling live in its
`deployments` section.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_app.decoder import Decoder
from serve_app.dit import DiTReplica
from serve_app.ingress import Ingress
from serve_app.preprocessor import Preprocessor
from serve_app.settings import ServeSettings


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve application builder (`import_path: serve_app.app:build_app`)."""
    settings = ServeSettings.from_args(args)
    dit = DiTReplica
    if settings.world_size > 1:
        # Code default for the SP group (one bundle per rank); serve_config.yaml may override.
        bundle = {"CPU": settings.worker_num_cpus}
        if settings.worker_num_gpus:
            bundle["GPU"] = settings.worker_num_gpus
        dit = DiTReplica.options(
            placement_group_bundles=[bundle] * settings.world_size,
            placement_group_strategy="STRICT_PACK",
            ray_actor_options={"num_cpus": settings.worker_num_cpus, "num_gpus": settings.worker_num_gpus},
        )
    return Ingress.bind(
        settings,
        Preprocessor.bind(settings),
        dit.bind(settings),
        Decoder.bind(settings),
    )
