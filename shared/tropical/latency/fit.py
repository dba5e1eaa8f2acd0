"""Least-squares fits of the step-time model to profiled samples.

Coefficients are constrained non-negative: on noisy profiles an unconstrained
fit happily returns a negative slope, and a model in which longer prompts or
bigger batches get cheaper would mislead every scheduling decision built on it.

The fits minimise *relative* error by default. Step times span three orders of
magnitude (a 128-token prefill against a 16k one); absolute least squares would
fit the long prompts and ignore the short ones, while the spread we publish,
and that policies turn into safety margins, is relative.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from tropical.latency.model import LatencyModel


@dataclass(frozen=True)
class FitQuality:
    """How well a fitted formula reproduces the samples it was fitted to."""

    rel_std: float  # root mean square of actual/predicted − 1
    max_rel_error: float  # worst |actual/predicted − 1|
    r2: float  # coefficient of determination on the raw times
    samples: int


@dataclass(frozen=True)
class PrefillFit:
    """T(L) = c0·L² + c1·L + c2 seconds for one prompt of L tokens."""

    c0: float
    c1: float
    c2: float
    quality: FitQuality

    def predict(self, tokens: int | float) -> float:
        return self.c0 * tokens * tokens + self.c1 * tokens + self.c2

    @property
    def rel_std(self) -> float:
        return self.quality.rel_std

    @property
    def r2(self) -> float:
        return self.quality.r2

    @property
    def samples(self) -> int:
        return self.quality.samples


@dataclass(frozen=True)
class DecodeFit:
    """T(B, Σctx) = d0 + d1·B + d2·Σctx seconds for one decode step."""

    d0: float
    d1: float
    d2: float
    quality: FitQuality

    def predict(self, batch: int | float, context_tokens: int | float) -> float:
        return self.d0 + self.d1 * batch + self.d2 * context_tokens

    @property
    def rel_std(self) -> float:
        return self.quality.rel_std

    @property
    def r2(self) -> float:
        return self.quality.r2

    @property
    def samples(self) -> int:
        return self.quality.samples


def nonnegative_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ‖a·x − b‖ subject to x ≥ 0, for a handful of columns.

    The optimum is the unconstrained least-squares solution on its own support,
    so trying every support and keeping the best feasible one is exact. With
    the three columns of our formulas that is eight tiny solves: simpler and
    sturdier than an iterative active-set method.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    rows, columns = a.shape
    if columns > 12:
        raise ValueError(f"support enumeration is meant for a few columns, got {columns}")
    norms = np.linalg.norm(a, axis=0)
    negligible = norms < np.finfo(float).tiny  # zero, or subnormal: no scaling makes such a column usable
    norms[negligible] = 1.0
    scaled = a / norms  # columns of similar size keep lstsq well conditioned (L² vs 1)
    scaled[:, negligible] = 0.0
    best = np.zeros(columns)
    best_residual = float(b @ b)
    for size in range(1, columns + 1):
        for support in combinations(range(columns), size):
            index = list(support)
            solution, *_ = np.linalg.lstsq(scaled[:, index], b, rcond=None)
            if np.any(solution < 0.0) or not np.all(np.isfinite(solution)):
                continue
            residual = b - scaled[:, index] @ solution
            value = float(residual @ residual)
            if value < best_residual * (1.0 - 1e-12):
                best_residual = value
                best = np.zeros(columns)
                best[index] = solution
    return best / norms


def _fit(features: np.ndarray, times: np.ndarray, relative: bool, offset: np.ndarray | float = 0.0) -> tuple[np.ndarray, FitQuality]:
    """Fit times ≈ features·x + offset with x ≥ 0; `offset` is a part of the time known in advance."""
    if len(times) == 0:
        raise ValueError("cannot fit a latency model to zero samples")
    if not np.all(np.isfinite(features)) or not np.all(np.isfinite(times)):
        raise ValueError("samples must be finite numbers")
    if np.any(times <= 0.0):
        raise ValueError("measured times must be positive")
    if np.any(features < 0.0):
        raise ValueError("token counts and batch sizes must be non-negative")
    weights = 1.0 / times if relative else np.ones_like(times)
    coefficients = nonnegative_least_squares(features * weights[:, None], (times - offset) * weights)
    return coefficients, _quality(features @ coefficients + offset, times)


def _quality(predicted: np.ndarray, times: np.ndarray) -> FitQuality:
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(predicted > 0.0, times / predicted, np.inf)
    relative = ratio - 1.0
    total = float(np.sum((times - times.mean()) ** 2))
    unexplained = float(np.sum((times - predicted) ** 2))
    r2 = 1.0 - unexplained / total if total > 0.0 else (1.0 if unexplained == 0.0 else 0.0)
    return FitQuality(
        rel_std=float(np.sqrt(np.mean(relative**2))),
        max_rel_error=float(np.max(np.abs(relative))),
        r2=r2,
        samples=len(times),
    )


def fit_prefill(samples: Sequence[tuple[int, float]], *, relative: bool = True) -> PrefillFit:
    """Fit c0·L² + c1·L + c2 to (prompt tokens, seconds) samples of isolated prefills."""
    data = np.asarray(samples, dtype=float).reshape(-1, 2)
    tokens, times = data[:, 0], data[:, 1]
    features = np.column_stack([tokens * tokens, tokens, np.ones_like(tokens)])
    (c0, c1, c2), quality = _fit(features, times, relative)
    return PrefillFit(c0=float(c0), c1=float(c1), c2=float(c2), quality=quality)


def fit_decode(
    samples: Sequence[tuple[int, int, float]],
    *,
    relative: bool = True,
    context_slope: float | None = None,
) -> DecodeFit:
    """Fit d0 + d1·B + d2·Σctx to (batch size, total context tokens, seconds) decode-step samples.

    `context_slope` fixes d2 from elsewhere (e.g. KV bytes over memory
    bandwidth) for profiles whose sequences all hold the same context, where
    Σctx moves in lockstep with B and the data cannot tell d1 from d2.
    """
    data = np.asarray(samples, dtype=float).reshape(-1, 3)
    batch, context, times = data[:, 0], data[:, 1], data[:, 2]
    if context_slope is None:
        features = np.column_stack([np.ones_like(batch), batch, context])
        (d0, d1, d2), quality = _fit(features, times, relative)
    else:
        if not (np.isfinite(context_slope) and context_slope >= 0.0):
            raise ValueError(f"context_slope must be a non-negative number, got {context_slope}")
        features = np.column_stack([np.ones_like(batch), batch])
        (d0, d1), quality = _fit(features, times, relative, offset=context_slope * context)
        d2 = context_slope
    return DecodeFit(d0=float(d0), d1=float(d1), d2=float(d2), quality=quality)


def latency_model_from_fits(prefill: PrefillFit, decode: DecodeFit, *, name: str = "") -> LatencyModel:
    return LatencyModel(
        c0=prefill.c0,
        c1=prefill.c1,
        c2=prefill.c2,
        d0=decode.d0,
        d1=decode.d1,
        d2=decode.d2,
        prefill_std=prefill.rel_std,
        decode_std=decode.rel_std,
        name=name,
    )


def fit_latency_model(
    prefill_samples: Sequence[tuple[int, float]],
    decode_samples: Sequence[tuple[int, int, float]],
    *,
    name: str = "",
    relative: bool = True,
) -> LatencyModel:
    """Both fits in one model; the residual spreads travel with it."""
    return latency_model_from_fits(
        fit_prefill(prefill_samples, relative=relative),
        fit_decode(decode_samples, relative=relative),
        name=name,
    )
