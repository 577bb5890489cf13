"""A size-to-time line, the profiler's one fit: t = fixed + per-unit * size."""
from __future__ import annotations

import numpy as np


def fit_affine(xs, ts) -> tuple[float, float]:
    """t = a + b*x, least squares in relative error (small sizes matter as much as big)."""
    x, t = np.asarray(xs, float), np.asarray(ts, float)
    w = 1.0 / t
    M = np.stack([w, w * x], axis=1)
    (a, b), *_ = np.linalg.lstsq(M, t * w, rcond=None)
    if b > 0 and a >= 0:
        return float(a), float(b)
    # noise (a busy host) can tilt the fit
    i = int(np.argmax(x))
    if b > 0:  # negative intercept: a pure rate through the largest point
        return 0.0, float(t[i] / x[i])
    # no growth with size seen: the fastest time is the fixed part, the largest size's excess
    # (at least a sliver of its time) the rate, so no rate the machine never showed is claimed
    a = float(t.min())
    return a, max(float(t[i]) - a, 1e-2 * float(t[i])) / float(x[i])
