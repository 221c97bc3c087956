"""The DiT deployment: one Serve replica = one sequence-parallel group of N ranks.

The replica is rank 0. Its placement group (N bundles, STRICT_PACK, set in serve_config.yaml)
holds it and the N−1 `SPWorker` actors it starts, one bundle each. All ranks load the DiT,
then join one torch.distributed group (gloo on CPU, NCCL on GPU) — every rank's join is started
before any is waited on, since each blocks until all have arrived. The workers then sit in
`SPRunner.serve_forever()` while rank 0 feeds them requests.

The replica is healthy only while every rank is: a worker that died or left its loop, or a
collective that failed (`SPRunner.broken`), fails the health check, and Serve replaces the whole
group (the workers are owned by the replica and die with it).

`denoise` streams one `{"event": "started"}` item when this replica begins the request (the job
is `queued` until then), `{"event": "progress"}` items per step, then one `{"event": "result"}`
or `{"event": "error"}` item; errors are items, not exceptions, so that their kind survives Ray's
exception wrapping. Cancelling the stream stops the steps at the next step boundary. Given the
job's fence (id, lease owner, attempt), the replica also checks the job store before it starts
and every `LEASE_CHECK_S` while it runs, and stops work whose job is gone or whose lease moved
on (its runner died and another took the job): no GPU time for jobs nobody waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray
import torch
from ray import serve
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from parallel import (
    CollectiveError,
    Collectives,
    DenoiseRequest,
    DeviceMesh,
    ParallelConfig,
    RequestFailedError,
    SPRunner,
    init_distributed,
    load_once_per_node,
)
from parallel.rendezvous import free_port
from parallel.styles import StyleRef, resolve_styles
from serve_app.face_swap import denoise_request_fields
from serve_app.jobs import AsyncJobStore, open_job_store
from serve_app.loras import MAX_STYLE_SETS_PER_REPLICA, ReplicaStyles, style_set_id
from serve_app.models import device_of, load_dit, load_experts, load_vace, load_vae
from serve_app.settings import ServeSettings
from serve_app.vace import control_request_fields, drop_reference_frame, reference_frames
from serve_app.warmup import warm_up_replica
from standin.attention import configure_attention
from standin.dit import WanDiT
from standin.errors import CancelledError, InvalidRequestError
from standin.experts import HIGH
from standin.forward_plan import compiled_blocks
from standin.pipeline import GenerationParams, initial_noise
from standin.presets import get_preset
from standin.video import to_uint8_frames

log = logging.getLogger(__name__)


LEASE_CHECK_S = 1.0


class RankState:
    """What every rank holds: the DiT, its place in the mesh, the runner."""

    def __init__(self, settings: ServeSettings, rank: int, address: str | None) -> None:
        self.device = device_of(settings)  # explicit index (cuda:0 for a one-GPU actor)
        configure_attention(settings.attention_backend)  # a missing kernel package fails here, at start
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # init_distributed then binds NCCL to it (device_id)
        world = settings.world_size
        timeout = datetime.timedelta(seconds=settings.collective_timeout_s)
        if world > 1:
            backend = settings.dist_backend or ("nccl" if self.device.type == "cuda" else "gloo")
            init_distributed(rank, world, address or "", backend=backend, timeout=timeout)
        experts = None
        if get_preset(settings.preset).experts is not None:
            # Wan2.2 A14B: both experts on every rank, the runner picks one per step
            experts = load_experts(settings, world)
            model = experts.residency.activate(HIGH)
        elif world > 1:
            # The group shares one node: rank 0 reads the checkpoint, the others receive it.
            empty = functools.partial(WanDiT, get_preset(settings.preset).dit)
            model, _ = load_once_per_node(functools.partial(load_dit, settings), empty, self.device)
        else:
            model = load_dit(settings)
        config = ParallelConfig.for_world(world, model.config.num_heads, cfg=settings.cfg_degree)
        mesh = DeviceMesh(config, model.config.num_heads, device=self.device, timeout=timeout)
        # per_step: no agreement before every collective, only at the end of each phase/step
        comm = Collectives(mesh, gated=settings.agreement == "per_collective")
        # Wan2.1-VACE (and tiny): the control branch on every rank, beside the DiT
        self.runner = SPRunner(
            model,
            comm,
            experts,
            load_vace(settings),
            run_block=compiled_blocks() if settings.compile_blocks else None,
            # decode_on: dit — every rank decodes a band of the video (parallel/vae_decode.py)
            vae=load_vae(settings) if settings.decode_on == "dit" else None,
        )
        # style LoRAs: this rank's own bounded cache of loaded files (serve_app/loras.py)
        self.runner.styles = ReplicaStyles.for_rank(settings, model, rank)
        log.info("rank %d/%d ready: %s on %s", rank, world, config, self.device)


@ray.remote(max_restarts=0)
class SPWorker:
    """Ranks 1..N−1 of a DiT replica."""

    def __init__(self, settings: ServeSettings, rank: int) -> None:
        self.settings = settings
        self.rank = rank
        self.state: RankState | None = None

    def setup(self, address: str) -> int:
        """Load the DiT and join the group (blocks until every rank has joined)."""
        self.state = RankState(self.settings, self.rank, address)
        return self.rank

    def serve_forever(self) -> str:
        """Follow rank 0's requests until it says stop; raises when the group breaks."""
        assert self.state is not None, "setup() first"
        self.state.runner.serve_forever()
        return "stopped"


@serve.deployment(ray_actor_options={"num_cpus": 0.4}, max_ongoing_requests=1, health_check_period_s=2)
class DiTReplica:
    """Rank 0 of an SP group; runs whole denoising requests over all ranks."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "abandoned": 0}
        self._store: AsyncJobStore | None = None
        self.workers: list[ray.actor.ActorHandle] = []
        self.worker_names: list[str] = []
        self.loops: list[ray.ObjectRef] = []
        world = settings.world_size
        address = None
        if world > 1:
            self._start_workers()
            address = f"tcp://{ray.util.get_node_ip_address()}:{free_port()}"
            joins = [w.setup.remote(address) for w in self.workers]
        # Rank 0 joins while the workers join (each blocks until all N have arrived).
        self.rank0 = RankState(settings, 0, address)
        if world > 1:
            ray.get(joins)
            self.loops = [w.serve_forever.remote() for w in self.workers]
        if settings.warmup:  # compile, kernel choice, communicators: before the first job, not in it
            warm_up_replica(self.rank0.runner)
        self._lock = asyncio.Lock()
        self._style_sets: dict[str, tuple[StyleRef, ...]] = {}  # multiplexed model id → its LoRAs

    def _start_workers(self) -> None:
        pg = ray.util.get_current_placement_group()
        if pg is None:
            log.warning("DiTReplica has no placement group: workers are scheduled anywhere")
        elif len(pg.bundle_specs) < self.settings.world_size:
            raise ValueError(
                f"DiTReplica needs one placement group bundle per rank: {self.settings.world_size} ranks "
                f"(sp_degree × cfg_degree) but placement_group_bundles has {len(pg.bundle_specs)}"
            )
        try:
            tag = serve.get_replica_context().replica_id.unique_id
        except Exception:  # local testing mode has no replica id
            tag = f"{id(self):x}"
        s = self.settings
        for rank in range(1, s.world_size):
            options: dict[str, Any] = {
                "num_cpus": s.worker_num_cpus,
                "num_gpus": s.worker_num_gpus,
                "name": f"standin-dit-{tag}-rank{rank}",
            }
            if pg is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank
                )
            self.workers.append(SPWorker.options(**options).remote(s, rank))
            self.worker_names.append(options["name"])

    # -- health ---------------------------------------------------------------------------

    def _broken_reason(self) -> str | None:
        if self.rank0.runner.broken:
            return "a collective failed: the process group must be rebuilt"
        if self.loops:
            done, _ = ray.wait(self.loops, num_returns=len(self.loops), timeout=0)
            if done:
                return f"{len(done)} SP worker(s) died or left their loop"
        return None

    def check_health(self) -> None:
        reason = self._broken_reason()
        if reason is not None:
            raise RuntimeError(f"DiT replica unhealthy: {reason}")

    def __del__(self) -> None:
        for w in getattr(self, "workers", []):
            with contextlib.suppress(Exception):
                ray.kill(w, no_restart=True)

    # -- requests -------------------------------------------------------------------------

    async def _job_alive(self, job: dict[str, Any]) -> bool:
        """The job still exists, is active and holds the lease of the run that sent it."""
        if self._store is None:
            self._store = AsyncJobStore(open_job_store(self.settings), threads=1)
        try:
            row = await self._store.get(job["id"])
        except Exception:  # the store is unreachable: keep working, the runner decides
            log.warning("lease check of %s failed", job["id"], exc_info=True)
            return True
        return (
            row is not None
            and not row.terminal
            and (row.lease_owner, row.attempts) == (job["owner"], job["attempt"])
        )

    async def _watch_job(self, job: dict[str, Any], cancel: threading.Event, lost: threading.Event) -> None:
        while not cancel.is_set():
            await asyncio.sleep(LEASE_CHECK_S)
            if not await self._job_alive(job):
                log.info("%s attempt %d: the job is gone; stopping its steps", job["id"], job["attempt"])
                lost.set()
                cancel.set()

    @serve.multiplexed(max_num_models_per_replica=MAX_STYLE_SETS_PER_REPLICA)
    async def _style_set(self, model_id: str) -> tuple[StyleRef, ...]:
        """Ray Serve model multiplexing: this replica takes a LoRA set (its id: `style_set_id`),
        loads its files on rank 0 (the other ranks load theirs when the request reaches them),
        and Serve then routes requests with that set here first."""
        refs = self._style_sets[model_id]
        await asyncio.to_thread(resolve_styles, self.rank0.runner.styles, refs)
        return refs

    async def _hold_styles(self, styles: tuple[StyleRef, ...]) -> dict[str, Any] | None:
        """Load the request's LoRA set through the multiplexer; an error event when refused."""
        model_id = style_set_id(styles)
        self._style_sets[model_id] = styles
        while len(self._style_sets) > 4 * MAX_STYLE_SETS_PER_REPLICA:
            self._style_sets.pop(next(iter(self._style_sets)))
        try:
            if _in_replica():
                await self._style_set(model_id)
            else:  # local testing mode has no replica context, hence no multiplexing
                await asyncio.to_thread(resolve_styles, self.rank0.runner.styles, styles)
        except InvalidRequestError as exc:
            return {"event": "error", "kind": "invalid", "message": str(exc).splitlines()[0][:300]}
        return None

    async def denoise(
        self,
        params: GenerationParams,
        conditioning: dict[str, torch.Tensor | None],
        job: dict[str, Any] | None = None,
        styles: tuple[StyleRef, ...] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream `started`, progress, then the result: the final latents [1, 16, F', H/8, W/8]
        (float32, CPU) as `latents`, or with `decode_on: dit` the video as `frames` (uint8
        [F, H, W, 3], decoded by every rank).
        `job`: {"id", "owner", "attempt"} of the run that asks (None: no lease checks)."""
        reason = self._broken_reason()
        if reason is not None:
            yield {"event": "error", "kind": "unavailable", "message": reason}
            return
        styles = tuple(styles or ())  # style LoRAs by name (serve_app/loras.py)
        if styles and (refused := await self._hold_styles(styles)) is not None:
            self.counts["failed"] += 1
            yield refused
            return
        async with self._lock:
            if job is not None and not await self._job_alive(job):
                self.counts["abandoned"] += 1
                yield {"event": "error", "kind": "lease_lost", "message": "the job is gone"}
                return
            yield {"event": "started"}
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue()
            cancel, lost = threading.Event(), threading.Event()
            watcher = None if job is None else asyncio.ensure_future(self._watch_job(job, cancel, lost))

            def progress(done: int, total: int) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (done, total))

            work = asyncio.ensure_future(
                asyncio.to_thread(self._run, params, conditioning, progress, cancel, styles)
            )
            work.add_done_callback(lambda _: events.put_nowait(None))
            try:
                while (item := await events.get()) is not None:
                    yield {"event": "progress", "step": item[0], "total": item[1]}
                result = await work  # {"latents"} or, when the ranks decode, {"frames"}
                self.counts["completed"] += 1
                yield {"event": "result", **result}
            except CancelledError:
                if not lost.is_set():
                    raise
                self.counts["abandoned"] += 1
                yield {"event": "error", "kind": "lease_lost", "message": "the job is gone"}
            except (asyncio.CancelledError, GeneratorExit):
                cancel.set()
                self.counts["cancelled"] += 1
                await _wait_ignoring_cancel(work)
                raise
            except InvalidRequestError as exc:
                self.counts["failed"] += 1
                yield {"event": "error", "kind": "invalid", "message": str(exc)}
            except (RequestFailedError, CollectiveError) as exc:
                self.counts["failed"] += 1
                kind = "broken" if isinstance(exc, CollectiveError) else "failed"
                log.warning("denoise failed (%s): %s", kind, exc)
                yield {"event": "error", "kind": kind, "message": str(exc)}
            finally:
                if watcher is not None:
                    watcher.cancel()
                if not work.done():
                    cancel.set()
                    await _wait_ignoring_cancel(work)

    def _run(
        self,
        params: GenerationParams,
        conditioning: dict[str, torch.Tensor | None],
        progress: Callable[[int, int], None],
        cancel: threading.Event,
        styles: tuple[StyleRef, ...] = (),
    ) -> dict[str, Any]:
        use_cfg = params.uses_guidance
        face_swap = conditioning.get("face_swap")
        # a face swap starts from its input video's noised latents (+ background consistency)
        start = denoise_request_fields(face_swap) if face_swap else {"latents": initial_noise(params)}
        vace = conditioning.get("vace")
        if vace is not None:  # VACE control: its context and scale (+ a first frame's longer noise)
            start = control_request_fields(params, vace, vace["scale"])
        request = DenoiseRequest(
            **start,
            context=conditioning["context"],  # type: ignore[arg-type]
            negative_context=conditioning.get("negative_context") if use_cfg else None,
            identity_latents=conditioning.get("identity_latents"),
            num_steps=params.num_steps,
            guidance=params.guidance_scale,
            guidance_low=params.guidance_scale_low,
            shift=params.shift,
            styles=styles,
            cache=params.cache,
            decode=self.settings.decode_on == "dit",
            decode_skip=reference_frames(vace),
        )
        out = self.rank0.runner.generate(request, progress, cancel.is_set)
        if request.decode:  # the ranks decoded: send uint8 frames (¼ of float32) to the Decoder
            return {"frames": to_uint8_frames(out.cpu())}
        return {"latents": drop_reference_frame(out, vace).float().cpu()}

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts,
            "world_size": self.settings.world_size,
            "decode_on": self.settings.decode_on,
            "agreement": self.settings.agreement,
            "worker_names": list(self.worker_names),
            "healthy": self._broken_reason() is None,
            "styles": None if self.rank0.runner.styles is None else self.rank0.runner.styles.cache.stats(),
        }


def _in_replica() -> bool:
    try:
        return serve.get_replica_context() is not None
    except Exception:
        return False


async def _wait_ignoring_cancel(task: asyncio.Future) -> None:
    """Wait until the worker thread has really stopped, even if we are cancelled again: a new
    request must never enter the runner while the previous one still runs."""
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            continue
    if not task.cancelled():
        task.exception()  # mark retrieved; the caller reports the outcome
