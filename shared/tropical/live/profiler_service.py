"""The profiler service: profile this machine's engine, fit its latency model, publish it to the store.

Publishing is `Store.set_latency_model`, which also notifies every subscriber,
so each router and worker following the key (`LatencyModelFeed`) switches to
the new model without restarting. The profile runs off the event loop (it is
minutes of engine steps); its progress is logged point by point. After the
first model is out the service either returns (`once`) or stays up and
profiles again whenever asked (`request_profile`; SIGHUP when served from the
command line), until stopped.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable

from tropical.engine.serving import ServingEngine
from tropical.latency.profiling import EngineLimits, GridPoint, Progress, ProfileGrid, default_grid, profile_engine
from tropical.protocol import LatencyModelSpec
from tropical.settings import MEMORY_URL, Settings
from tropical.store import UNAVAILABLE, Store, open_store
from tropical.telemetry import Telemetry

log = logging.getLogger(__name__)

RESTORE_CHECK_S = 5.0


class ProfilerService:
    """Publishes the latency model of `engine` under model@hardware/tpN; `run()` returns when stopped, or at once with `once`.

    `grid` defaults to `default_grid` of the engine's limits (small with
    `quick`); `clock` (Unix seconds) stamps `fitted_at`; `progress` replaces
    the log lines and is called from the thread that profiles; `telemetry` counts
    the models published and when the latest was fitted.
    """

    def __init__(
        self,
        engine: ServingEngine,
        store: Store,
        *,
        model: str,
        hardware: str,
        tensor_parallel: int = 1,
        grid: ProfileGrid | None = None,
        quick: bool = False,
        reduce: str = "median",
        once: bool = False,
        clock: Callable[[], float] = time.time,
        progress: Progress | None = None,
        telemetry: Telemetry | None = None,
        restore_check_s: float = RESTORE_CHECK_S,
    ) -> None:
        """`restore_check_s`: how often a profiler that stays up checks that its model is still stored (a Redis that
        restarted without persistence comes back empty) and publishes it again if not."""
        self.restore_check_s = restore_check_s
        self.engine = engine
        self.store = store
        self.model = model
        self.hardware = hardware
        self.tensor_parallel = tensor_parallel
        self.grid = grid
        self.quick = quick
        self.reduce = reduce
        self.once = once
        self.clock = clock
        self.progress = progress or self._log_progress
        self.telemetry = telemetry or Telemetry()
        self.published: LatencyModelSpec | None = None
        self._wake = asyncio.Event()
        self._requested = False
        self._stopping = False

    @property
    def key(self) -> str:
        return f"{self.model}@{self.hardware}/tp{self.tensor_parallel}"

    async def run(self) -> None:
        """Publish a first model, then one more for every request, until stopped (or right away with `once`).

        The store is read first, so one that cannot be reached fails the
        service before minutes of profiling rather than after.
        """
        stored = await self.store.get_latency_model(self.key)
        if stored is not None:
            log.info("%s is stored already (fitted at %.0f); it will be replaced", self.key, stored.fitted_at)
        await self.publish_profile()
        while not (self.once or self._stopping):
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.restore_check_s)
            except TimeoutError:
                await self._restore()
                continue
            self._wake.clear()
            if self._requested and not self._stopping:
                self._requested = False
                await self.publish_profile()

    async def _restore(self) -> None:
        """Publish the last model again if the store has lost it; a store out of reach is tried at the next check."""
        if self.published is None:
            return
        try:
            if await asyncio.wait_for(self.store.get_latency_model(self.key), timeout=self.restore_check_s) is None:
                await asyncio.wait_for(self.store.set_latency_model(self.published), timeout=self.restore_check_s)
                log.info("%s was gone from the store (it restarted empty?): published it again", self.key)
        except UNAVAILABLE as exc:
            log.warning("could not check that %s is still stored: %s", self.key, exc or type(exc).__name__)

    def request_profile(self) -> None:
        """Profile again and publish the new model (a running profile finishes first)."""
        self._requested = True
        self._wake.set()

    async def stop(self) -> None:
        """Return from `run` once the profile in progress, if any, is published."""
        self._stopping = True
        self._wake.set()

    async def publish_profile(self) -> LatencyModelSpec:
        """Profile the engine, fit, and store the model; subscribers are notified by the store."""
        grid = self.grid or default_grid(EngineLimits.of(self.engine), quick=self.quick)
        log.info("profiling %s: %d grid points, %d timed steps each", self.key, len(grid.points), grid.repeats)
        found = await asyncio.to_thread(profile_engine, self.engine, grid, reduce=self.reduce, name=self.key, progress=self.progress)
        spec = found.spec(model=self.model, hardware=self.hardware, tensor_parallel=self.tensor_parallel, fitted_at=self.clock())
        await self.store.set_latency_model(spec)
        self.published = spec
        self.telemetry.profiler_run(self.key, spec.fitted_at)
        fit = found.model
        log.info(
            "published %s from %d steps in %.1f s: prefill c0 %.4g c1 %.4g c2 %.4g, decode d0 %.4g d1 %.4g d2 %.4g",
            self.key, len(found.samples), found.wall_s, fit.c0, fit.c1, fit.c2, fit.d0, fit.d1, fit.d2,
        )
        return spec

    def _log_progress(self, done: int, total: int, point: GridPoint) -> None:
        log.info("profiling %s: %d/%d points (%s B=%d C=%d L=%d)", self.key, done, total, point.kind, point.batch, point.context, point.prompt)


async def serve_profiler(
    settings: Settings, engine: ServingEngine, *, model: str, hardware: str, quick: bool, once: bool, metrics_host: str | None = None
) -> LatencyModelSpec | None:
    """The profiler against the deployment's store: SIGTERM or SIGINT stops it, SIGHUP profiles again; the last model published.

    With `settings.metrics_port` it serves `/metrics` while it runs (see `tropical.live.run.metrics_served`).
    """
    from tropical.live.run import metrics_served, until_signalled

    if settings.redis_url.startswith(MEMORY_URL):
        log.warning("the store is %s: the model is published to this process only", MEMORY_URL)
    store = open_store(settings)
    telemetry = Telemetry()
    service = ProfilerService(engine, store, model=model, hardware=hardware, quick=quick, once=once, telemetry=telemetry)
    await until_signalled(service.stop)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, service.request_profile)
    try:
        async with metrics_served(settings, telemetry, metrics_host):
            await service.run()
    finally:
        await store.close()
    return service.published
