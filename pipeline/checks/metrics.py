"""Offline metrics, robust to the degenerate days that real streams produce (one class only, tiny days).

AUC is computed one way everywhere (the headline, slices and every bootstrap resample): the Mann-Whitney rank
formula with tied scores averaged, which is what `sklearn.metrics.roc_auc_score` computes for binary labels, but
cheap enough to run thousands of times per night and with one-class samples answered as "undefined" rather than
an exception. `tests/unit/test_metrics_crosscheck.py` pins it to sklearn."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import log_loss


def rank_auc(y: np.ndarray, p: np.ndarray) -> float:
    """AUC without input checks, for the bootstrap's inner loop: NaN when the sample has one class only, so a
    degenerate resample is dropped instead of stopping the interval."""
    pos = y > 0.5
    n_pos = int(pos.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(p)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """AUC, or None when it is undefined (one class only). Non-finite scores are an error, as in sklearn: an
    AUC over NaN ranks would look like a number and mean nothing."""
    if len(np.unique(y)) != 2:
        return None
    if not np.all(np.isfinite(p)):
        raise ValueError("AUC of scores that contain NaN or infinity")
    return rank_auc(y, p)


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    return float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1]))


def scores_valid(p: np.ndarray) -> bool:
    return bool(len(p)) and bool(np.all(np.isfinite(p))) and bool(np.all((p >= 0) & (p <= 1)))


def reliability(y: np.ndarray, p: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width score bin [k/bins, (k+1)/bins) (the last one closed): mean score, observed positive
    rate, row count (NaN where a bin is empty). Edges are k/bins, not `linspace`'s start + k*step, which puts
    0.3, 0.6 and 0.7 a rounding error above themselves and so a score of exactly 0.3 in the bin below."""
    edges = np.arange(bins + 1) / bins
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(idx, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=p, minlength=bins) / counts
        rate = np.bincount(idx, weights=y, minlength=bins) / counts
    return mean_p, rate, counts


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the row-weighted gap between predicted and observed rate per score bin;
    infinite for no rows or invalid scores, so it can never pass a ceiling by accident."""
    if len(y) == 0 or not scores_valid(p):
        return math.inf
    mean_p, rate, counts = reliability(y, p, bins)
    full = counts > 0
    return float(np.sum(counts[full] * np.abs(mean_p[full] - rate[full])) / counts.sum())


def summary(y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    if not scores_valid(p):
        return {"auc": None, "logloss": math.inf, "rows": float(len(y)), "mean_score": None}
    return {"auc": auc(y, p), "logloss": logloss(y, p), "rows": float(len(y)), "mean_score": float(p.mean()),
            "label_rate": float(y.mean()) if len(y) else None}
