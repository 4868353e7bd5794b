"""Offline metrics, robust to the degenerate days that real streams produce (one class only, tiny days)."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score


def auc(y: np.ndarray, p: np.ndarray) -> float | None:
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else None


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    return float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1]))


def scores_valid(p: np.ndarray) -> bool:
    return bool(len(p)) and bool(np.all(np.isfinite(p))) and bool(np.all((p >= 0) & (p <= 1)))


def summary(y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    if not scores_valid(p):
        return {"auc": None, "logloss": math.inf, "rows": float(len(y)), "mean_score": None}
    return {"auc": auc(y, p), "logloss": logloss(y, p), "rows": float(len(y)), "mean_score": float(p.mean()),
            "label_rate": float(y.mean()) if len(y) else None}
