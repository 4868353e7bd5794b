"""Our metrics against independent implementations: AUC against sklearn's `roc_auc_score`, ECE against a
plain per-bin loop. The headline AUC, the slice AUCs and every bootstrap resample share one AUC function, so
pinning it here pins the whole evaluation report. Weighted metrics are not offered, so none are tested."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import roc_auc_score

from pipeline.checks.metrics import auc, ece, rank_auc, summary
from pipeline.checks.paired import paired_auc_diff


def sample(n: int, seed: int, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    p = 1 / (1 + np.exp(-(x - 1)))
    y = (rng.uniform(size=n) < p).astype(np.float64)
    return y, (np.round(p, decimals) if decimals is not None else p)


def plain_ece(y: np.ndarray, p: np.ndarray, bins: int) -> float:
    """ECE spelled out: bins [k/bins, (k+1)/bins), the last one closed at 1; each non-empty bin contributes
    its share of rows times |mean score - positive rate|."""
    total = 0.0
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        in_bin = (p >= lo) & ((p <= hi) if k == bins - 1 else (p < hi))
        if in_bin.any():
            total += in_bin.sum() / len(p) * abs(p[in_bin].mean() - y[in_bin].mean())
    return float(total)


@pytest.mark.parametrize(("n", "seed", "decimals"), [(2, 0, None), (50, 1, None), (5000, 2, None),
                                                     (3000, 3, 1), (3000, 4, 2), (400, 5, 0)])
def test_auc_matches_sklearn_with_and_without_ties(n, seed, decimals):
    y, p = sample(n, seed, decimals)
    if len(np.unique(y)) < 2:
        y[0] = 1 - y[0]
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert summary(y, p)["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_auc_of_constant_scores_is_one_half():
    y = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    assert auc(y, np.full(5, 0.3)) == pytest.approx(roc_auc_score(y, np.full(5, 0.3))) == 0.5


@pytest.mark.parametrize("label", [0.0, 1.0])
def test_one_class_gives_an_undefined_auc_not_a_crash(label):
    y, p = np.full(100, label), sample(100, 0)[1]
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(roc_auc_score(y, p))  # the reference: undefined, and says so
    assert auc(y, p) is None and math.isnan(rank_auc(y, p))
    assert summary(y, p)["auc"] is None
    assert paired_auc_diff(y, p, p, 50, 0.95, seed=0) is None


def test_auc_refuses_nan_scores_like_sklearn():
    y, p = sample(100, 1)
    p[3] = np.nan
    with pytest.raises(ValueError):
        roc_auc_score(y, p)
    with pytest.raises(ValueError, match="NaN"):
        auc(y, p)


def test_the_bootstrap_estimate_is_the_headline_difference():
    y, pc = sample(2000, 6)
    pp = np.round(pc, 1)
    ci = paired_auc_diff(y, pc, pp, 50, 0.95, seed=0)
    assert ci.estimate == pytest.approx(roc_auc_score(y, pc) - roc_auc_score(y, pp), abs=1e-12)


@pytest.mark.parametrize(("n", "seed", "decimals", "bins"), [(5000, 0, None, 10), (3000, 1, 1, 10),
                                                             (3000, 2, 2, 20), (200, 3, None, 15),
                                                             (1000, 4, 1, 5), (7, 5, None, 10)])
def test_ece_matches_a_plain_per_bin_loop(n, seed, decimals, bins):
    y, p = sample(n, seed, decimals)
    assert ece(y, p, bins) == pytest.approx(plain_ece(y, p, bins), abs=1e-12)


def test_ece_puts_a_score_on_an_edge_in_the_bin_above():
    """0.3 is in [0.3, 0.4): a perfectly calibrated bin there, an all-wrong one below."""
    y = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    p = np.array([0.3] * 10 + [0.25, 0.25])
    assert ece(y, p, 10) == pytest.approx(plain_ece(y, p, 10), abs=1e-12)
    assert ece(y, p, 10) == pytest.approx(2 / 12 * 0.25 + 10 / 12 * 0.4)


def test_ece_on_scores_at_the_ends_and_one_class():
    y = np.array([0.0, 0.0, 1.0, 1.0])
    assert ece(y, np.array([0.0, 0.0, 1.0, 1.0]), 10) == 0.0
    ones = np.ones(6)
    p = np.linspace(0.05, 0.95, 6)
    assert ece(ones, p, 10) == pytest.approx(plain_ece(ones, p, 10)) == pytest.approx(1 - p.mean())
    assert ece(np.zeros(0), np.zeros(0), 10) == math.inf
