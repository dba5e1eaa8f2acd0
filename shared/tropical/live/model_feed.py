"""The latency model a live service plans with, kept current from the store and calibrated online.

A router or worker opens one `LatencyModelFeed` for its model's key
(`LatencyModelSpec.key`, model@hardware/tpN). The feed reads the stored model
(or starts from a default when none is stored yet), subscribes to updates, and
swaps in every model the profiler publishes, so a service switches models
without restarting.

Calibration has one home, `OnlineCorrection`: a worker reports each step's
time as the stored model predicted it and as it was measured (`observe`; the
whole cycle, the worker's own time around the engine's step included, since
that is what a request's next token waits for), and
`feed.model` is the stored model scaled by the running factor
(`LatencyModel.scaled`). The factor is written back into the stored spec's
`correction` field (`publish_correction`, rate-limited), so every feed of the
key adopts it: each service continues from the last published factor, and all
of them converge on one calibrated model. A freshly profiled model arrives with
a correction of 1 and restarts the calibration, since it measured the hardware
as it runs now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import msgspec

from tropical.latency.correction import OnlineCorrection
from tropical.latency.model import Chunk, LatencyModel
from tropical.protocol import LatencyModelSpec
from tropical.store.base import LatencyModelUpdates, Store
from tropical.store.errors import StoreClosed

log = logging.getLogger(__name__)

Listener = Callable[[LatencyModel], None]
OWN_PUBLISHES_REMEMBERED = 8  # own writes whose echo from the subscription is still expected


@dataclass(frozen=True)
class CorrectionPublishing:
    """How often a feed writes its factor back: at most once per `every` observations and per `min_interval_s` seconds.

    Both bounds hold at once, so a busy worker does not write on every step and
    an idle one does not write a factor that rests on a handful of samples.
    """

    every: int = 100
    min_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.every < 1 or not self.min_interval_s >= 0.0:
            raise ValueError(f"need every >= 1 and min_interval_s >= 0, got {self.every} and {self.min_interval_s}")


class LatencyModelFeed:
    """The current latency model of one key; open with `LatencyModelFeed.open`, close with `close()` or `async with`.

    `model` is the stored model (or the default) times the online correction;
    `changed` is set, and every listener called with the new model, whenever a
    stored model is adopted (a new profile, or another service's correction).
    Observations move `model` too, but silently: they change it by a little on
    every step, which is no reason to re-plan.
    """

    def __init__(
        self,
        store: Store,
        key: str,
        default: LatencyModel,
        *,
        alpha: float = 0.1,
        bounds: tuple[float, float] = (0.5, 2.0),
        publishing: CorrectionPublishing | None = None,
        clock: Callable[[], float] = time.monotonic,
        retry_s: float = 1.0,
    ) -> None:
        """Use `open`: built here, a feed holds the default and follows nothing."""
        self.store = store
        self.key = key
        self.default = default
        self.publishing = publishing
        self.clock = clock
        self.retry_s = retry_s
        self.changed = asyncio.Event()
        self.listeners: list[Listener] = []
        self._correction = OnlineCorrection(alpha=alpha, bounds=bounds)
        self._spec: LatencyModelSpec | None = None
        self._base = default
        self._own: deque[LatencyModelSpec] = deque(maxlen=OWN_PUBLISHES_REMEMBERED)
        self._unpublished = 0  # observations since the last write (or adoption)
        self._last_write = -math.inf
        self._due = asyncio.Event()
        self._closed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def open(
        cls,
        store: Store,
        key: str,
        *,
        default: LatencyModel,
        alpha: float = 0.1,
        bounds: tuple[float, float] = (0.5, 2.0),
        publishing: CorrectionPublishing | None = None,
        clock: Callable[[], float] = time.monotonic,
        retry_s: float = 1.0,
    ) -> LatencyModelFeed:
        """Subscribe, then read the stored model, so nothing set in between is missed; store errors here are raised.

        `alpha` and `bounds` are the `OnlineCorrection`'s; with `publishing`
        the feed writes its factor back on its own whenever it is due; `clock`
        (seconds) times those writes; `retry_s` is the pause before following
        the store again after its update feed ended with an error.
        """
        feed = cls(store, key, default, alpha=alpha, bounds=bounds, publishing=publishing, clock=clock, retry_s=retry_s)
        updates = await feed._subscribe(announce=False)
        feed._tasks.append(asyncio.create_task(feed._follow(updates), name=f"latency-model-feed:{key}"))
        if publishing is not None:
            feed._tasks.append(asyncio.create_task(feed._publish_when_due(), name=f"latency-model-correction:{key}"))
        return feed

    # --- what a service reads -------------------------------------------------------------

    @property
    def model(self) -> LatencyModel:
        """The model to plan with: the stored one (or the default) scaled by the current correction."""
        return self._correction.apply(self._base)

    @property
    def base_model(self) -> LatencyModel:
        """The stored model without the correction: what `observe` takes predictions from."""
        return self._base

    @property
    def spec(self) -> LatencyModelSpec | None:
        """The stored spec adopted last, None while the default is in use."""
        return self._spec

    @property
    def factor(self) -> float:
        return self._correction.factor

    # --- online correction --------------------------------------------------------------

    def observe(self, predicted_s: float, actual_s: float) -> None:
        """One step's time as `base_model` predicted it (not `model`: the factor is actual over uncorrected) and as measured.

        Unusable pairs are ignored. Call it on the event loop's thread; with
        `publishing`, it wakes the feed's writer when a write is due.
        """
        before = self._correction.samples
        self._correction.update(predicted_s, actual_s)
        if self._correction.samples == before:
            return
        self._unpublished += 1
        if self.correction_due:
            self._due.set()

    def observe_step(self, batch: int, context_tokens: int, chunks: Iterable[Chunk], actual_s: float) -> None:
        """One measured step of `batch` decodes over `context_tokens` plus prefill `chunks`, predicted here."""
        self.observe(self._base.step_time(batch, context_tokens, chunks), actual_s)

    async def publish_correction(self, *, force: bool = False) -> LatencyModelSpec | None:
        """Write the stored spec back with the current factor when due (or `force`); the spec written, or None.

        Due is by `publishing`'s rule; a feed without one writes only when
        forced. Nothing is written while no model is stored (the default has no
        spec). `samples` grows by the observations folded in since adoption.
        """
        if self._spec is None or not (force or self.correction_due):
            return None
        spec = msgspec.structs.replace(
            self._spec, correction=self._correction.factor, samples=self._spec.samples + self._correction.samples
        )
        self._own.append(spec)
        self._unpublished = 0
        self._last_write = self.clock()
        await self.store.set_latency_model(spec)
        return spec

    @property
    def correction_due(self) -> bool:
        """Whether `publishing`'s rule allows a write now (never without a rule or a stored model)."""
        rule = self.publishing
        if rule is None or self._spec is None:
            return False
        return self._unpublished >= rule.every and self.clock() - self._last_write >= rule.min_interval_s

    # --- lifecycle ----------------------------------------------------------------------

    async def close(self) -> None:
        """Stop following the store; `model` keeps its last value."""
        self._closed.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # --- following the store ------------------------------------------------------------

    async def _subscribe(self, *, announce: bool = True) -> LatencyModelUpdates:
        """Subscribe, then adopt the stored model (announced as a change unless the feed is only opening)."""
        updates = await self.store.subscribe_latency_models()
        try:
            stored = await self.store.get_latency_model(self.key)
        except BaseException:
            await updates.close()
            raise
        if stored is not None:
            self._receive(stored, announce=announce)
        return updates

    async def _follow(self, updates: LatencyModelUpdates | None) -> None:
        """Adopt every update of the key; when the store's feed fails, pause and follow it again."""
        while not self._closed.is_set():
            try:
                if updates is None:
                    updates = await self._subscribe()
                async for spec in updates:
                    self._receive(spec)
                return  # the feed ended without an error: the store was closed
            except StoreClosed:
                return
            except Exception as exc:  # a service must outlive a store outage: it keeps the model it has
                log.warning("latency model %s: lost the store's updates (%r); following again in %g s", self.key, exc, self.retry_s)
            finally:
                if updates is not None:
                    await updates.close()
                updates = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), timeout=self.retry_s)

    def _receive(self, spec: LatencyModelSpec, *, announce: bool = True) -> None:
        """Adopt a stored spec of this key, unless it is the one held or this feed's own write coming back."""
        if spec.key != self.key or spec == self._spec:
            return
        if spec in self._own:
            while self._own.popleft() != spec:
                pass  # earlier own writes were overtaken by this one
            return
        self._spec = spec
        self._base = LatencyModel.from_spec(msgspec.structs.replace(spec, correction=1.0))
        self._correction = OnlineCorrection(alpha=self._correction.alpha, bounds=self._correction.bounds, factor=spec.correction)
        self._unpublished = 0
        log.info("latency model %s: adopted the model fitted at %.0f, correction %.4f", self.key, spec.fitted_at, spec.correction)
        if announce:
            self._announce()

    def _announce(self) -> None:
        self.changed.set()
        model = self.model
        for listener in list(self.listeners):
            try:
                listener(model)
            except Exception:
                log.exception("latency model %s: a listener failed", self.key)

    async def _publish_when_due(self) -> None:
        """The writer behind `publishing`: a failed write is logged, and retried when the next one is due."""
        while True:
            await self._due.wait()
            self._due.clear()
            try:
                await self.publish_correction()
            except Exception as exc:  # the writer outlives a failed write
                log.warning("latency model %s: could not publish the correction: %r", self.key, exc)
