"""Online calibration: scale an offline model by how fast the hardware runs today.

Profiles go stale (another tenant on the node, thermal limits, a different
kernel version), so workers report measured step times and the model is
multiplied by an exponentially weighted mean of actual/predicted. One factor,
not a refit: a handful of live samples cannot pin down six coefficients, but
they do tell us reliably that "everything is 10 % slower".
"""

from __future__ import annotations

import math

from tropical.latency.model import LatencyModel


class OnlineCorrection:
    """EWMA of actual/predicted step times, clamped to `bounds`.

    Each observation is clamped before it enters the average, so one stalled
    step (a GC pause, a preempted host thread) moves the factor by at most
    `alpha` times the bound instead of dragging it anywhere.
    """

    def __init__(self, *, alpha: float = 0.1, bounds: tuple[float, float] = (0.5, 2.0), factor: float = 1.0) -> None:
        low, high = bounds
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not 0.0 < low <= 1.0 <= high:
            raise ValueError(f"bounds must satisfy 0 < low <= 1 <= high, got {bounds}")
        self.alpha = alpha
        self.bounds = (float(low), float(high))
        self._factor = self._clamp(factor)
        self.samples = 0

    @property
    def factor(self) -> float:
        return self._factor

    def update(self, predicted: float, actual: float) -> OnlineCorrection:
        """Fold in one measured step; ignores unusable pairs. Returns self for chaining."""
        if not (math.isfinite(predicted) and math.isfinite(actual)) or predicted <= 0.0 or actual <= 0.0:
            return self
        ratio = self._clamp(actual / predicted)
        self._factor = self._clamp((1.0 - self.alpha) * self._factor + self.alpha * ratio)
        self.samples += 1
        return self

    def apply(self, model: LatencyModel) -> LatencyModel:
        return model.scaled(self._factor)

    def _clamp(self, value: float) -> float:
        low, high = self.bounds
        return min(max(value, low), high)

    def __repr__(self) -> str:
        return f"OnlineCorrection(factor={self._factor:.4f}, alpha={self.alpha}, bounds={self.bounds}, samples={self.samples})"
