"""The profiler service and the latency-model feed: publish, follow, calibrate online, on both stores; the command line."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from tests.helpers import eventually
from tests.messages import latency_model
from tests.test_store_conformance import redis_store_under_test
from tropical.cli import app
from tropical.engine import EmulatedEngine, FakeClock
from tropical.latency import LatencyModel, ProfileGrid
from tropical.live.model_feed import CorrectionPublishing, LatencyModelFeed
from tropical.live.profiler_service import ProfilerService
from tropical.store import MemoryStore, Store, StoreError

WAIT = 10.0  # seconds any one expected event may take before the test fails
EMULATED = LatencyModel(c0=3e-9, c1=4e-5, c2=2e-3, d0=6e-3, d1=3e-4, d2=2e-7)
DEFAULT = LatencyModel(c0=1e-8, c1=1e-4, c2=1e-2, d0=1e-2, d1=1e-3, d2=1e-6)
GRID = ProfileGrid.cross((16, 64, 256), (1, 4), (32, 128), [(2, 32, 64)], warmup=1, repeats=2)
KEY = "emulated@a100/tp1"
FITTED_AT = 1_700_000_000.0


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        memory = MemoryStore()
        yield memory
        await memory.close()
    else:
        async with redis_store_under_test() as redis_store:
            yield redis_store


class Ticks:
    """A clock the test moves by hand: time for `fitted_at` and for the correction's rate limit."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def profiler(store: Store, *, once: bool = True, clock: Ticks | None = None) -> ProfilerService:
    engine = EmulatedEngine(EMULATED, 1 << 16, max_model_len=4096, clock=FakeClock())
    return ProfilerService(engine, store, model="emulated", hardware="a100", grid=GRID, once=once, clock=clock or Ticks(FITTED_AT))


def coefficients(model: LatencyModel) -> tuple[float, ...]:
    return (model.c0, model.c1, model.c2, model.d0, model.d1, model.d2)


async def changed(feed: LatencyModelFeed) -> None:
    """Wait for the feed to adopt a stored model, then re-arm the event as a service would."""
    await asyncio.wait_for(feed.changed.wait(), WAIT)
    feed.changed.clear()


# --- the profiler publishes; feeds follow -------------------------------------------------


async def test_a_feed_opened_before_the_profile_switches_to_the_published_model(store: Store) -> None:
    async with await LatencyModelFeed.open(store, KEY, default=DEFAULT) as feed:
        assert feed.model == DEFAULT and feed.spec is None
        service = profiler(store)
        await asyncio.wait_for(service.run(), WAIT)  # `once`: returns after publishing
        await changed(feed)
        assert feed.spec == service.published == await store.get_latency_model(KEY)
        assert feed.spec is not None and feed.spec.fitted_at == FITTED_AT and feed.spec.samples == 2 * len(GRID.points)
        assert coefficients(feed.model) == pytest.approx(coefficients(EMULATED), rel=1e-6)


async def test_a_feed_opened_after_the_profile_reads_the_model_at_open(store: Store) -> None:
    await asyncio.wait_for(profiler(store).run(), WAIT)
    async with await LatencyModelFeed.open(store, KEY, default=DEFAULT) as feed:
        assert not feed.changed.is_set()  # what a service reads at open is no change
        assert feed.spec is not None and feed.spec.key == KEY
        assert coefficients(feed.model) == pytest.approx(coefficients(EMULATED), rel=1e-6)


async def test_a_profiler_that_stays_up_publishes_again_on_request_until_stopped(store: Store) -> None:
    clock = Ticks(FITTED_AT)
    service = profiler(store, once=False, clock=clock)
    async with await LatencyModelFeed.open(store, KEY, default=DEFAULT) as feed:
        running = asyncio.create_task(service.run())
        try:
            await changed(feed)
            assert feed.spec is not None and feed.spec.fitted_at == FITTED_AT
            assert not running.done()
            clock.now += 60.0
            service.request_profile()
            await changed(feed)
            assert feed.spec is not None and feed.spec.fitted_at == FITTED_AT + 60.0
            await service.stop()
            await asyncio.wait_for(running, WAIT)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)


async def test_a_feed_ignores_other_keys_and_listeners_see_each_adopted_model(store: Store) -> None:
    seen: list[LatencyModel] = []
    async with await LatencyModelFeed.open(store, KEY, default=DEFAULT) as feed:
        feed.listeners.append(seen.append)
        await store.set_latency_model(latency_model("other"))  # another key: not this feed's model
        ours = latency_model("emulated", hardware="a100", tensor_parallel=1)
        await store.set_latency_model(ours)
        await changed(feed)
        assert feed.spec == ours and seen == [LatencyModel.from_spec(ours)]


# --- online correction --------------------------------------------------------------------


async def test_steps_consistently_half_again_as_long_scale_the_model_by_the_ewma() -> None:
    store = MemoryStore()
    spec = latency_model("emulated", hardware="a100", tensor_parallel=1)
    await store.set_latency_model(spec)
    async with await LatencyModelFeed.open(store, KEY, default=DEFAULT, alpha=0.1) as feed:
        stored = LatencyModel.from_spec(spec)
        for batch in range(1, 11):
            feed.observe_step(batch, 100 * batch, [], 1.5 * stored.decode_time(batch, 100 * batch))
        # f ← 0.9·f + 0.1·1.5 ten times from f = 1: f = 1.5 − 0.5·0.9¹⁰ = 1.5 − 0.5·0.3486784401
        assert feed.factor == pytest.approx(1.32566077995, rel=1e-12)
        assert feed.model.prefill_time(512) == pytest.approx(1.32566077995 * stored.prefill_time(512), rel=1e-12)
        assert feed.model.decode_time(8, 4096) == pytest.approx(1.32566077995 * stored.decode_time(8, 4096), rel=1e-12)
        assert feed.base_model == stored
        feed.observe(0.0, 1.0)  # unusable pairs are ignored
        feed.observe(1.0, float("nan"))
        assert feed.factor == pytest.approx(1.32566077995, rel=1e-12)
    await store.close()


async def test_the_default_model_is_corrected_but_never_published() -> None:
    store = MemoryStore()
    async with await LatencyModelFeed.open(store, KEY, default=DEFAULT, publishing=CorrectionPublishing(every=1, min_interval_s=0.0)) as feed:
        feed.observe(1.0, 2.0)
        assert feed.factor == pytest.approx(1.1) and feed.model == DEFAULT.scaled(feed.factor)
        assert await feed.publish_correction(force=True) is None
        assert await store.get_latency_model(KEY) is None
    await store.close()


async def test_corrections_are_written_at_most_once_per_n_observations_and_per_interval() -> None:
    store = MemoryStore()
    spec = latency_model("emulated", hardware="a100", tensor_parallel=1)
    await store.set_latency_model(spec)
    clock = Ticks(100.0)
    rule = CorrectionPublishing(every=3, min_interval_s=10.0)
    async with (
        await LatencyModelFeed.open(store, KEY, default=DEFAULT, publishing=rule, clock=clock) as worker,
        await LatencyModelFeed.open(store, KEY, default=DEFAULT) as router,
    ):
        for _ in range(2):
            worker.observe(1.0, 1.5)
        assert not worker.correction_due  # 2 of 3 observations
        worker.observe(1.0, 1.5)
        await changed(router)
        assert router.spec is not None and router.spec.samples == spec.samples + 3
        assert router.spec.correction == pytest.approx(1.5 - 0.5 * 0.9**3)
        for _ in range(3):
            worker.observe(1.0, 1.5)
        assert not worker.correction_due  # 3 more observations, but not 10 s since the last write
        clock.now += 10.0
        worker.observe(1.0, 1.5)
        await changed(router)
        assert router.spec.samples == spec.samples + 7 and router.model == worker.model
        assert await store.get_latency_model(KEY) == router.spec
    await store.close()


async def test_published_corrections_reach_another_feed(store: Store) -> None:
    await asyncio.wait_for(profiler(store).run(), WAIT)
    clock = Ticks(0.0)
    rule = CorrectionPublishing(every=4, min_interval_s=5.0)
    async with (
        await LatencyModelFeed.open(store, KEY, default=DEFAULT, publishing=rule, clock=clock) as worker,
        await LatencyModelFeed.open(store, KEY, default=DEFAULT) as router,
    ):
        seen_by_worker: list[LatencyModel] = []
        worker.listeners.append(seen_by_worker.append)
        stored = worker.base_model
        for _ in range(4):  # the fourth observation makes a write due; the feed's writer makes it
            worker.observe(stored.prefill_time(256), 1.5 * stored.prefill_time(256))
        await changed(router)
        factor = 1.5 - 0.5 * 0.9**4
        assert router.factor == pytest.approx(factor) and worker.factor == pytest.approx(factor)
        assert router.model == worker.model
        assert router.spec is not None and router.spec.correction == pytest.approx(factor)
        assert router.spec.samples == 2 * len(GRID.points) + 4
        assert coefficients(router.base_model) == coefficients(stored)
        # a correction written by the router side is adopted by the worker; the worker's own write was not
        router.observe(1.0, 1.0)
        other = await router.publish_correction(force=True)
        assert other is not None
        await changed(worker)
        assert seen_by_worker == [LatencyModel.from_spec(other)] and worker.spec == other


async def test_a_new_profile_restarts_the_calibration(store: Store) -> None:
    clock = Ticks(FITTED_AT)
    await asyncio.wait_for(profiler(store, clock=clock).run(), WAIT)
    async with await LatencyModelFeed.open(store, KEY, default=DEFAULT) as feed:
        feed.observe(1.0, 2.0)
        assert feed.factor == pytest.approx(1.1)
        clock.now += 3600.0
        await asyncio.wait_for(profiler(store, clock=clock).run(), WAIT)
        await changed(feed)
        assert feed.factor == 1.0 and feed.spec is not None and feed.spec.fitted_at == FITTED_AT + 3600.0


async def test_a_feed_follows_the_store_again_after_its_updates_fail() -> None:
    store = MemoryStore()
    async with await LatencyModelFeed.open(store, KEY, default=DEFAULT, retry_s=0.0) as feed:
        for subscription in list(store._subscriptions):
            subscription.fail(StoreError("connection lost"))
        spec = latency_model("emulated", hardware="a100", tensor_parallel=1)
        await store.set_latency_model(spec)  # may land while the feed is between subscriptions: it reads the store again
        await changed(feed)
        assert feed.spec == spec
        later = msgspec.structs.replace(spec, fitted_at=spec.fitted_at + 1.0)
        await store.set_latency_model(later)
        await changed(feed)
        assert feed.spec == later
    await store.close()


# --- command line -------------------------------------------------------------------------


def test_python_m_services_profiler_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.profiler", "--help"], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"}
    )
    assert result.returncode == 0, result.stderr
    assert "--once" in result.stdout and "--quick" in result.stdout and "--engine" in result.stdout


@pytest.mark.parametrize("args", [["--engine", "/no/such/model"], ["--engine", "{empty directory}"], ["--device", "tpu"]])
def test_cli_serve_profiler_rejects_bad_input(args: list[str], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if arg == "{empty directory}" else arg for arg in args]
    result = CliRunner().invoke(app, ["--redis-url", "memory://", "serve", "profiler", "--once", *args], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert "Error" in result.output and "published" not in result.output


def test_cli_serve_profiler_rejects_bad_settings() -> None:
    result = CliRunner().invoke(app, ["--redis-url", "http://example", "serve", "profiler", "--once"])
    assert result.exit_code == 2 and "redis_url" in result.output


def test_cli_serve_profiler_fails_in_one_line_before_profiling_when_the_store_is_out_of_reach() -> None:
    args = ["--redis-url", "redis://127.0.0.1:1/0", "serve", "profiler", "--once", "--device", "cpu"]  # nothing listens on port 1
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: the store at redis://127.0.0.1:1/0") and result.output.count("\n") == 1


async def test_a_profiler_that_stays_up_publishes_its_model_again_when_the_store_lost_it() -> None:
    store = MemoryStore()
    service = profiler(store, once=False)
    service.restore_check_s = 0.05
    running = asyncio.create_task(service.run())
    try:
        await eventually(lambda: store.get_latency_model(KEY), WAIT, what="the first model stored")
        store._models.clear()  # what a Redis restarted without persistence holds
        await eventually(lambda: store.get_latency_model(KEY), WAIT, what="the model stored again")
        assert await store.get_latency_model(KEY) == service.published
    finally:
        await service.stop()
        await asyncio.wait_for(running, WAIT)
