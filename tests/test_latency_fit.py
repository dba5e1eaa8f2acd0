"""Fitting the step-time model: exact recovery, non-negativity, quality numbers, and the online correction."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tropical.latency import LatencyModel, OnlineCorrection
from tropical.latency.fit import fit_decode, fit_latency_model, fit_prefill, nonnegative_least_squares


def test_prefill_fit_recovers_known_coefficients() -> None:
    c0, c1, c2 = 2e-8, 1.5e-4, 0.02
    samples = [(n, c0 * n * n + c1 * n + c2) for n in (64, 128, 512, 1024, 2048, 4096, 8192)]
    fit = fit_prefill(samples)
    assert (fit.c0, fit.c1, fit.c2) == pytest.approx((c0, c1, c2), rel=1e-9)
    assert fit.rel_std == pytest.approx(0.0, abs=1e-9)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.samples == 7


def test_decode_fit_recovers_known_coefficients() -> None:
    d0, d1, d2 = 0.015, 8e-5, 4e-7
    samples = [(b, b * c, d0 + d1 * b + d2 * b * c) for b in (1, 4, 16, 64, 128) for c in (128, 1024, 2048)]
    fit = fit_decode(samples)
    assert (fit.d0, fit.d1, fit.d2) == pytest.approx((d0, d1, d2), rel=1e-9)
    assert fit.predict(10, 5000) == pytest.approx(d0 + d1 * 10 + d2 * 5000)


def test_coefficients_stay_non_negative_when_the_data_slopes_down() -> None:
    # Noisy short-prompt profile in which longer prompts happened to run faster.
    samples = [(100, 0.050), (200, 0.048), (300, 0.047), (400, 0.046)]
    fit = fit_prefill(samples)
    assert min(fit.c0, fit.c1, fit.c2) >= 0.0
    times = [fit.predict(n) for n in range(0, 5000, 100)]
    assert times == sorted(times), "a longer prompt must never be predicted cheaper"
    assert fit.c2 == pytest.approx(np.mean([0.050, 0.048, 0.047, 0.046]), rel=0.01)


def test_relative_fit_quality_by_hand() -> None:
    # Two samples with the same features: the fit is one number x = d0 + d1.
    # Relative least squares: (x − 1)² + ((x − 3)/3)² is smallest at x = 1.2.
    # Ratios actual/predicted − 1 are −1/6 and 3/2: RMS √((1/36 + 9/4)/2), max 3/2.
    fit = fit_decode([(1, 0, 1.0), (1, 0, 3.0)])
    assert fit.predict(1, 0) == pytest.approx(1.2)
    assert fit.rel_std == pytest.approx(math.sqrt((1 / 36 + 9 / 4) / 2))
    assert fit.quality.max_rel_error == pytest.approx(1.5)
    assert fit.r2 == pytest.approx(1 - (0.2**2 + 1.8**2) / 2.0)

    absolute = fit_decode([(1, 0, 1.0), (1, 0, 3.0)], relative=False)
    assert absolute.predict(1, 0) == pytest.approx(2.0)
    assert absolute.rel_std == pytest.approx(0.5)


def test_relative_weighting_keeps_short_prompts_accurate() -> None:
    # A long prompt with an off-model bump would dominate an absolute fit.
    truth = lambda n: 1e-8 * n * n + 1e-4 * n + 0.01  # noqa: E731
    samples = [(n, truth(n)) for n in (32, 64, 128, 256, 512)] + [(16384, truth(16384) * 1.3)]
    relative, absolute = fit_prefill(samples), fit_prefill(samples, relative=False)
    error = lambda fit: abs(fit.predict(64) / truth(64) - 1)  # noqa: E731
    assert error(relative) < 0.05
    assert error(relative) < error(absolute)


def test_fixed_context_slope_is_kept_and_the_rest_fitted() -> None:
    d0, d1, d2 = 0.04, 1e-3, 1e-7
    samples = [(b, b * 1022, d0 + d1 * b + d2 * b * 1022) for b in (1, 2, 4, 8, 16, 32, 64, 128)]
    fit = fit_decode(samples, context_slope=d2)
    assert (fit.d0, fit.d1, fit.d2) == pytest.approx((d0, d1, d2), rel=1e-9)
    with pytest.raises(ValueError):
        fit_decode(samples, context_slope=-1.0)


def test_fit_latency_model_carries_spreads_and_name() -> None:
    prefill = [(n, 1e-4 * n + 0.01) for n in (100, 1000, 2000)]
    decode = [(1, 100, 0.02), (8, 800, 0.021), (64, 6400, 0.03), (64, 64000, 0.033)]
    model = fit_latency_model(prefill, decode, name="toy")
    assert isinstance(model, LatencyModel)
    assert model.name == "toy"
    assert model.prefill_time(1000) == pytest.approx(0.11)
    assert model.prefill_std == pytest.approx(0.0, abs=1e-9)
    assert model.decode_std == pytest.approx(fit_decode(decode).rel_std)
    assert model.decode_std > 0.0


@pytest.mark.parametrize(
    "samples",
    [[], [(100, 0.0)], [(100, -1.0)], [(-5, 0.1)], [(100, float("nan"))]],
    ids=["empty", "zero time", "negative time", "negative tokens", "nan"],
)
def test_unusable_samples_are_refused(samples: list[tuple[int, float]]) -> None:
    with pytest.raises(ValueError):
        fit_prefill(samples)


@settings(max_examples=60, deadline=None)
@given(
    a=arrays(np.float64, (8, 3), elements=st.floats(0.0, 10.0, allow_nan=False)),
    b=arrays(np.float64, (8,), elements=st.floats(-10.0, 10.0, allow_nan=False)),
)
def test_nnls_satisfies_the_optimality_conditions(a: np.ndarray, b: np.ndarray) -> None:
    x = nonnegative_least_squares(a, b)
    assert np.all(x >= 0.0)
    gradient = a.T @ (a @ x - b)
    scale = 1.0 + np.abs(a.T @ b).max() + np.abs(a.T @ a).max() * (1.0 + np.abs(x).max())
    # KKT: zero gradient where x > 0, and no descent direction into x ≥ 0 where x = 0.
    assert np.all(np.abs(gradient[x > 0]) <= 1e-7 * scale)
    assert np.all(gradient[x == 0] >= -1e-7 * scale)


def test_nnls_ignores_columns_too_small_to_scale() -> None:
    a = np.full((8, 3), 5e-324)  # subnormal: their norms underflow
    a[:, 2] = 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = nonnegative_least_squares(a, np.ones(8))
    assert x[:2].tolist() == [0.0, 0.0] and x[2] == pytest.approx(0.5)


# --- online correction -------------------------------------------------------------------

MODEL = LatencyModel(c0=1e-8, c1=1e-4, c2=0.01, d0=0.02, d1=1e-4, d2=1e-7)


def test_correction_is_an_ewma_of_actual_over_predicted() -> None:
    correction = OnlineCorrection(alpha=0.5)
    assert correction.factor == 1.0
    correction.update(predicted=0.1, actual=0.2)  # ratio 2
    assert correction.factor == pytest.approx(1.5)
    correction.update(predicted=0.1, actual=0.1)  # ratio 1
    assert correction.factor == pytest.approx(1.25)
    assert correction.samples == 2


def test_correction_clamps_outliers_and_ignores_unusable_pairs() -> None:
    correction = OnlineCorrection(alpha=0.1, bounds=(0.5, 2.0))
    correction.update(predicted=0.01, actual=5.0)  # ratio 500, clamped to 2 before averaging
    assert correction.factor == pytest.approx(1.1)
    for predicted, actual in [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, -2.0), (float("nan"), 1.0), (1.0, float("inf"))]:
        correction.update(predicted, actual)
    assert correction.factor == pytest.approx(1.1)
    assert correction.samples == 1
    for _ in range(500):
        correction.update(predicted=1.0, actual=0.001)
    assert correction.factor == pytest.approx(0.5)


def test_correction_applies_as_a_scaled_model_and_chains() -> None:
    corrected = OnlineCorrection(alpha=1.0).update(0.1, 0.13).apply(MODEL)
    assert corrected.prefill_time(1000) == pytest.approx(1.3 * MODEL.prefill_time(1000))
    assert corrected.decode_time(8, 4000) == pytest.approx(1.3 * MODEL.decode_time(8, 4000))


@pytest.mark.parametrize("kwargs", [{"alpha": 0.0}, {"alpha": 1.5}, {"bounds": (1.2, 2.0)}, {"bounds": (0.5, 0.9)}, {"bounds": (0.0, 2.0)}])
def test_correction_rejects_nonsense_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        OnlineCorrection(**kwargs)
