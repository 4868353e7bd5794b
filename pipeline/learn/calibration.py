"""Post-hoc calibration: an increasing affine map of the network's logit (Platt scaling, or temperature scaling
when the shift is pinned at 0), fitted after every training on a time-later slice the weights never trained on.

Why: a network trained to low log-loss on one period is routinely over- or under-confident on the next (a
bootstrap holdout scored a mean of 0.77 against a 0.51 label rate), and then every log-loss and ECE the gate
compares is noise about the miscalibration rather than about the model. Two parameters fitted on a few hundred
rows fix the level and the spread; the map is strictly increasing, so ranking metrics (AUC) are untouched.

The map lives on the network (`CTRNet.calibration`) and in the bundle's config.json, so every path that scores
through the network (`ModelBundle.predict`, the server's batched `bundle.net(...)`, the pyfunc wrapper) applies
it; training always works on the raw logit. A bundle saved before calibration existed loads as the identity.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

log = logging.getLogger("flywheel.calibration")

Method = Literal["platt", "temperature", "none"]
MIN_SCALE, MAX_SCALE = 1e-2, 1e2


@dataclass(frozen=True)
class Calibration:
    """p = sigmoid(scale * logit + shift); `rows` is the size of the slice it was fitted on (0: never fitted)."""

    scale: float = 1.0
    shift: float = 0.0
    method: str = "none"
    rows: int = 0

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.shift == 0.0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.identity else logits * self.scale + self.shift

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> Calibration:
        """None (a bundle from before calibration) is the identity."""
        if not data:
            return cls()
        return cls(float(data["scale"]), float(data["shift"]), str(data.get("method", "platt")),
                   int(data.get("rows", 0)))


def _nll(z: np.ndarray, t: np.ndarray, w: np.ndarray, a: float, b: float) -> float:
    s = a * z + b
    return float(np.sum(w * (np.logaddexp(0.0, s) - t * s)))


def fit(logits: np.ndarray, labels: np.ndarray, method: Method = "platt", min_rows: int = 50,
        weights: np.ndarray | None = None, prior: Calibration | None = None, prior_rows: float = 0.0) -> Calibration:
    """Fit the map by Newton's method on the weighted log-loss, with Platt's smoothed targets ((n+ + 1) /
    (n+ + 2) for positives, 1 / (n- + 2) for negatives) so a small slice cannot push scores to 0 or 1. A slice
    under `min_rows` or with one class fits nothing: it keeps `prior`, else the identity, which is what the
    network alone would say.

    A `prior` (a warm start's parent map) weighs as `prior_rows` pseudo-rows: the slice's own logits again, with
    the prior's probabilities as soft targets. The fit is then a MAP estimate that moves from the prior in
    proportion to the evidence. A night's validation slice is often under a hundred rows with a handful of
    positives, and Platt's two parameters fitted on that alone swung from scale 0.45 to 1.04 on consecutive
    nights of one stream whose champion's map (787 rows) was the identity; the candidates' log-loss then lost to
    the champion's by 5-13 % at equal AUC, and the gate held every night (bench/results/backtest.md, round 7)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    w = np.ones_like(z) if weights is None else np.asarray(weights, dtype=np.float64)
    ok = np.isfinite(z) & np.isfinite(y)
    z, y, w = z[ok], y[ok], w[ok]
    pos, neg = float(w[y > 0.5].sum()), float(w[y <= 0.5].sum())
    if method == "none":
        return Calibration()
    if len(z) < min_rows or pos == 0 or neg == 0:
        return prior if prior is not None else Calibration()
    rows = len(z)
    t = np.where(y > 0.5, (pos + 1) / (pos + 2), 1 / (neg + 2))
    a, b = 1.0, 0.0
    fit_shift = method == "platt"
    if prior is not None and prior_rows > 0:
        a, b = prior.scale, prior.shift if fit_shift else 0.0
        t = np.concatenate([t, 1 / (1 + np.exp(-(prior.scale * z + prior.shift)))])
        w = np.concatenate([w, w * (prior_rows / w.sum())])
        z = np.concatenate([z, z])
    for _ in range(100):
        p = 1 / (1 + np.exp(-(a * z + b)))
        g = w * (p - t)
        h = w * p * (1 - p) + 1e-12
        grad = np.array([np.sum(g * z), np.sum(g)]) if fit_shift else np.array([np.sum(g * z)])
        if fit_shift:
            hess = np.array([[np.sum(h * z * z), np.sum(h * z)], [np.sum(h * z), np.sum(h)]])
        else:
            hess = np.array([[np.sum(h * z * z)]])
        step = np.linalg.solve(hess + 1e-9 * np.eye(len(grad)), grad)
        before, shrink = _nll(z, t, w, a, b), 1.0
        while shrink > 1e-4:  # backtracking: Newton may overshoot on a nearly separable slice
            na = min(max(a - shrink * step[0], MIN_SCALE), MAX_SCALE)
            nb = b - shrink * step[1] if fit_shift else 0.0
            if _nll(z, t, w, na, nb) <= before:
                break
            shrink /= 2
        else:
            break
        done = abs(na - a) + abs(nb - b) < 1e-7
        a, b = na, nb
        if done:
            break
    if not (math.isfinite(a) and math.isfinite(b)):
        log.warning("calibration did not converge on %d rows; keeping the identity", rows)
        return Calibration()
    return Calibration(float(a), float(b), method, rows)
