"""One paired comparison of two models on the same labeled rows, used by every decision that weighs a new model
against an old one: the nightly promotion gate (candidate vs champion on the holdout, `pipeline.checks.gate`)
and the online evaluation (live champion vs the version it replaced, `pipeline.release.online_eval`).

Rows are resampled once for both models (paired), so the shared difficulty of the sample cancels and only the
models' difference is left in the interval. The verdict reads where that interval lies relative to the allowed
regression, so a noise-level difference is "inconclusive", never decided by which side of the line one lucky
sample fell on. Both callers thus get the same numbers and the same verdict from the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel

from pipeline.checks.metrics import ece, rank_auc

Verdict = Literal["better", "non_inferior", "inconclusive", "worse"]
Metric = Literal["auc", "logloss"]
#: Which direction is an improvement, per metric a paired comparison is defined for.
HIGHER_IS_BETTER: dict[str, bool] = {"auc": True, "logloss": False, "ece": False}


class Interval(BaseModel):
    estimate: float
    low: float
    high: float
    samples: int


@dataclass(frozen=True)
class PairedComparison:
    """Candidate-minus-baseline on one metric over `rows` paired rows: the estimate and its bootstrap interval
    (None when the difference is undefined, e.g. AUC on one class), and the verdict against `margin`."""

    metric: Metric
    rows: int
    margin: float
    interval: Interval | None
    verdict: Verdict

    @property
    def delta(self) -> float | None:
        return None if self.interval is None else self.interval.estimate

    @property
    def low(self) -> float | None:
        return None if self.interval is None else self.interval.low

    @property
    def high(self) -> float | None:
        return None if self.interval is None else self.interval.high


def _bounds(values: np.ndarray, confidence: float) -> tuple[float, float]:
    a = (1 - confidence) / 2
    return float(np.quantile(values, a)), float(np.quantile(values, 1 - a))


def paired_auc_diff(y: np.ndarray, pc: np.ndarray, pp: np.ndarray, samples: int, confidence: float,
                    seed: int) -> Interval | None:
    """Bootstrap CI of AUC(candidate) - AUC(champion); None when the rows have one class, or when more than
    half of the resamples do (the interval would describe the few lucky ones)."""
    if len(np.unique(y)) < 2:
        return None
    rng = np.random.default_rng(seed)
    n = len(y)
    diffs = np.empty(samples)
    for i in range(samples):
        idx = rng.integers(0, n, n)
        diffs[i] = rank_auc(y[idx], pc[idx]) - rank_auc(y[idx], pp[idx])
    diffs = diffs[np.isfinite(diffs)]
    if len(diffs) < samples // 2:
        return None
    low, high = _bounds(diffs, confidence)
    return Interval(estimate=rank_auc(y, pc) - rank_auc(y, pp), low=low, high=high, samples=len(diffs))


def row_logloss(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-7, 1 - 1e-7)
    return -(y * np.log(q) + (1 - y) * np.log(1 - q))


def paired_logloss_diff(y: np.ndarray, pc: np.ndarray, pp: np.ndarray, samples: int, confidence: float,
                        seed: int) -> Interval:
    """Bootstrap CI of log-loss(candidate) - log-loss(champion): a mean of per-row differences, so cheap."""
    d = row_logloss(y, pc) - row_logloss(y, pp)
    rng = np.random.default_rng(seed)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(samples)])
    low, high = _bounds(means, confidence)
    return Interval(estimate=float(d.mean()), low=low, high=high, samples=samples)


def paired_ece_diff(y: np.ndarray, pc: np.ndarray, pp: np.ndarray, bins: int, samples: int, confidence: float,
                    seed: int) -> tuple[Interval, Interval]:
    """Bootstrap CIs of ECE(candidate) - ECE(champion) (paired, like AUC) and of the candidate's own ECE: a
    binned calibration error is as noisy as its sample is small, so it is judged by an interval too."""
    rng = np.random.default_rng(seed)
    n = len(y)
    diffs, own = np.empty(samples), np.empty(samples)
    for i in range(samples):
        idx = rng.integers(0, n, n)
        own[i] = ece(y[idx], pc[idx], bins)
        diffs[i] = own[i] - ece(y[idx], pp[idx], bins)
    c_ece = ece(y, pc, bins)
    d_low, d_high = _bounds(diffs, confidence)
    o_low, o_high = _bounds(own, confidence)
    return (Interval(estimate=c_ece - ece(y, pp, bins), low=d_low, high=d_high, samples=samples),
            Interval(estimate=c_ece, low=o_low, high=o_high, samples=samples))


def verdict(diff: Interval, margin: float, higher_is_better: bool = True) -> Verdict:
    """Where the CI of candidate-minus-champion lies relative to the allowed regression `margin`."""
    lo, hi = (diff.low, diff.high) if higher_is_better else (-diff.high, -diff.low)
    if hi < -margin:
        return "worse"
    if lo > 0:
        return "better"
    if lo >= -margin:
        return "non_inferior"
    return "inconclusive"


def compare_paired(metric: Metric, y: np.ndarray, pc: np.ndarray, pp: np.ndarray, margin: float, samples: int,
                   confidence: float, seed: int) -> PairedComparison:
    """Candidate `pc` against baseline `pp` on `metric`, allowed to regress by `margin` (in the metric's own
    units). An undefined difference (AUC on one class) is "inconclusive": it can neither block nor promote."""
    ci = (paired_auc_diff if metric == "auc" else paired_logloss_diff)(y, pc, pp, samples, confidence, seed)
    v: Verdict = "inconclusive" if ci is None else verdict(ci, margin, HIGHER_IS_BETTER[metric])
    return PairedComparison(metric=metric, rows=len(y), margin=margin, interval=ci, verdict=v)
