"""Learning-curve extrapolation: where a trial's validation curve is heading, and how sure that is.

A trial reports its validation metric at every evaluation. Fitted with the power law ``y = a + b·t^-c``
(``pow3``, the first of the curve families of Domhan et al., 2015, and the usual shape of a loss against steps),
the curve predicts the metric at the end of the trial's schedule. The fit is linear in ``a`` and ``b`` once
``c`` is fixed, so ``c`` is searched on a grid and ``(a, b)`` solved by least squares for each: no optimizer
to diverge, the same answer every time. The uncertainty is a residual bootstrap: the curve refitted to its own
fitted values plus resampled residuals, each refit's prediction plus one more resampled residual (the final
evaluation is noisy too). The optimistic end of that spread is what early stopping compares
(:meth:`tune.early_stop.ParetoHalving.forecast_dominated`): a trial is stopped only when even its optimistic
forecast loses.

Curves are handled minimized (a loss; an accuracy is negated first) and must improve: ``b >= 0``. A curve that
got worse is fitted flat at its mean. Learning-rate schedules that anneal (cosine, linear) bend the last part of
a curve down beyond the power law; :func:`calibration` measures that bias on the study's completed trials and
the forecast is moved by it, toward optimism only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_POINTS = 4  # three parameters: with fewer points there is no residual left to judge the fit by
_RATES = np.geomspace(0.02, 4.0, 48)  # the exponent c: from nearly logarithmic to quickly flattening


@dataclass(frozen=True)
class CurveFit:
    """``a + b·(t/scale)^-c``; ``scale`` (the last fitted step) keeps ``t^-c`` near 1 for any step count."""

    a: float
    b: float
    c: float
    scale: float

    def at(self, step: float) -> float:
        return self.a + self.b * (step / self.scale) ** -self.c


@dataclass(frozen=True)
class Forecast:
    """The metric predicted at ``step`` (minimized) and the spread of the bootstrap's predictions around it."""

    step: int
    predicted: float
    low: float  # the optimistic end: the ``quantile`` of the bootstrap's predictions
    high: float  # the pessimistic end: the ``1 - quantile``
    fit: CurveFit


def _design(steps: np.ndarray, scale: float) -> np.ndarray:
    """(rates, points) of ``(t/scale)^-c`` for every searched exponent."""
    return (steps[None, :] / scale) ** -_RATES[:, None]


def _solve(basis: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares of ``y`` (boots, points) on ``[1, basis]`` for every exponent: (a, b, sse), each (boots, rates);
    ``b`` held at 0 (``a`` = the mean) where the free solution would have the curve get worse."""
    x_mean = basis.mean(axis=1)  # (rates,)
    xc = basis - x_mean[:, None]
    sxx = np.maximum((xc ** 2).sum(axis=1), 1e-300)
    y_mean = y.mean(axis=1, keepdims=True)  # (boots, 1)
    b = np.maximum(((y - y_mean) @ xc.T) / sxx, 0.0)  # (boots, rates)
    a = y_mean - b * x_mean[None, :]
    fitted = a[:, :, None] + b[:, :, None] * basis[None, :, :]  # (boots, rates, points)
    sse = ((y[:, None, :] - fitted) ** 2).sum(axis=2)
    return a, b, sse


def fit_power_law(steps: Sequence[float], values: Sequence[float]) -> CurveFit | None:
    """The least-squares ``a + b·t^-c`` through a minimized curve; None with fewer than MIN_POINTS finite points."""
    t, y = _finite(steps, values)
    if t is None:
        return None
    scale = float(t[-1])
    a, b, sse = _solve(_design(t, scale), y[None, :])
    best = int(np.argmin(sse[0]))
    return CurveFit(float(a[0, best]), float(b[0, best]), float(_RATES[best]), scale)


def forecast(steps: Sequence[float], values: Sequence[float], at: int, boots: int = 200, quantile: float = 0.1,
             seed: int = 0) -> Forecast | None:
    """The curve's value at step ``at``, with the ``quantile`` and ``1 - quantile`` of a residual bootstrap (the
    refits' predictions plus a resampled residual); None with fewer than MIN_POINTS finite points."""
    t, y = _finite(steps, values)
    if t is None:
        return None
    fit = fit_power_law(t, y)
    fitted = np.array([fit.at(s) for s in t])
    # residuals inflated by sqrt(n / (n - 3)): a three-parameter fit leaves them smaller than the noise
    residuals = (y - fitted) * math.sqrt(len(t) / (len(t) - 3)) if len(t) > 3 else y - fitted
    rng = np.random.default_rng(seed)
    resampled = fitted[None, :] + rng.choice(residuals, size=(boots, len(t)))
    basis = _design(t, fit.scale)
    a, b, sse = _solve(basis, resampled)
    best = np.argmin(sse, axis=1)
    rows = np.arange(boots)
    ahead = (at / fit.scale) ** -_RATES[best]
    predictions = a[rows, best] + b[rows, best] * ahead + rng.choice(residuals, size=boots)
    low, high = np.quantile(predictions, [quantile, 1 - quantile])
    return Forecast(int(at), fit.at(at), float(low), float(high), fit)


def _finite(steps: Sequence[float], values: Sequence[float]):
    """(steps, values) as arrays, the points with a finite value only, in step order; (None, None) if too few."""
    pairs = sorted((float(s), float(v)) for s, v in zip(steps, values, strict=True) if math.isfinite(v) and s > 0)
    if len(pairs) < MIN_POINTS:
        return None, None
    t, y = np.array(pairs).T
    return t, y


def calibration(curves: Sequence[tuple[Sequence[tuple[int, float]], float]], fraction: float) -> float:
    """How far the completed ``curves`` ended below what their first ``fraction`` of steps forecast (minimized):
    the most optimistic error, 0 when none ended better than forecast (never positive: it only moves a forecast
    toward optimism). Each curve is ((step, value), ...) with its final step last, and its final value."""
    errors = []
    for history, final in curves:
        if not history:
            continue
        end = history[-1][0]
        prefix = [(s, v) for s, v in history if s <= fraction * end + 1e-9]
        fit = fit_power_law([s for s, _ in prefix], [v for _, v in prefix])
        if fit is not None and math.isfinite(final):
            errors.append(final - fit.at(end))
    return min(0.0, min(errors, default=0.0))
