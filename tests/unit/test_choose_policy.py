"""Choosing among a drift night's candidates: the warm start stays unless a challenger is confidently better on
the holdout, so a challenger that only fitted the day's noise best is not what serves tomorrow."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from pipeline.config import Settings
from pipeline.stages.train import Candidate, choose

BIG_Y = (np.random.default_rng(2).uniform(size=4000) < 0.3).astype(float)  # a holdout that can tell models apart


def _candidate(policy: str, y: np.ndarray, noise: float, rng: np.random.Generator, passed: bool = True) -> Candidate:
    scores = 1 / (1 + np.exp(-(2.0 * (y - 0.5) + rng.normal(0, noise, len(y)))))
    auc_proxy = float(np.mean(scores[y == 1]) - np.mean(scores[y == 0]))
    # choose() reads the judgement's verdict, scores and ranking value only
    judgement = SimpleNamespace(passed=passed, pc=scores, primary=auc_proxy)
    return Candidate(policy, bundle=None, result=None, seconds=0.0, window="", judgement=judgement)


def test_a_challenger_must_beat_the_warm_start_confidently():
    s = Settings()
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=90) < 0.15).astype(float)  # a small day's holdout: ~13 positives
    warm = _candidate("warm", y, 2.0, rng)
    lucky = _candidate("shrink", y, 1.9, np.random.default_rng(1))  # as good, a point estimate apart
    assert choose([warm, lucky], y, s) is warm
    assert lucky.vs_base is not None and lucky.vs_base.low <= 0 < lucky.vs_base.high

    weak = _candidate("warm", BIG_Y, 3.0, np.random.default_rng(3))
    strong = _candidate("fresh", BIG_Y, 0.5, np.random.default_rng(4))
    assert choose([weak, strong], BIG_Y, s) is strong and strong.vs_base.low > 0


def test_a_failing_warm_start_is_still_what_a_challenger_must_beat():
    s = Settings()
    rng = np.random.default_rng(5)
    y = (rng.uniform(size=90) < 0.15).astype(float)
    warm = _candidate("warm", y, 2.0, rng, passed=False)
    lucky = _candidate("shrink", y, 1.9, np.random.default_rng(6))
    assert choose([warm, lucky], y, s) is warm  # held tonight; the next night catches up on the day
    weak = _candidate("warm", BIG_Y, 3.0, np.random.default_rng(3), passed=False)
    strong = _candidate("fresh", BIG_Y, 0.5, np.random.default_rng(4))
    failing = _candidate("shrink", BIG_Y, 0.1, np.random.default_rng(7), passed=False)
    assert choose([weak, failing, strong], BIG_Y, s) is strong and failing.vs_base is None


def test_the_refit_serves_unless_the_warm_start_is_confidently_better():
    """The refit is the recipe the warm start approximates (the first model's training on every row so far), so
    a noise-level difference goes to it; a warm start has to prove itself to stay."""
    s = Settings()
    y = (np.random.default_rng(8).uniform(size=90) < 0.15).astype(float)
    warm = _candidate("warm", y, 1.9, np.random.default_rng(9))
    refit = _candidate("refit", y, 2.0, np.random.default_rng(10))  # as good, a point estimate apart
    assert choose([warm, refit], y, s) is refit
    assert warm.vs_base is not None and warm.vs_base.low <= 0 < warm.vs_base.high

    strong_warm = _candidate("warm", BIG_Y, 0.5, np.random.default_rng(4))
    weak_refit = _candidate("refit", BIG_Y, 3.0, np.random.default_rng(3))
    assert choose([strong_warm, weak_refit], BIG_Y, s) is strong_warm and strong_warm.vs_base.low > 0

    failing = _candidate("refit", y, 0.1, np.random.default_rng(11), passed=False)
    assert choose([warm, failing], y, s) is warm  # the gate's verdict comes first
    held = _candidate("warm", y, 0.1, np.random.default_rng(12), passed=False)
    assert choose([held, refit], y, s) is refit


def test_a_drift_challenger_must_beat_the_refit_when_the_refit_serves():
    s = Settings()
    warm = _candidate("warm", BIG_Y, 3.0, np.random.default_rng(3))
    refit = _candidate("refit", BIG_Y, 1.0, np.random.default_rng(13))
    shrink = _candidate("shrink", BIG_Y, 2.0, np.random.default_rng(14))  # better than the warm start only
    assert choose([warm, refit, shrink], BIG_Y, s) is refit
    assert shrink.vs_base.high < 0
    fresh = _candidate("fresh", BIG_Y, 0.3, np.random.default_rng(15))
    assert choose([warm, refit, shrink, fresh], BIG_Y, s) is fresh and fresh.vs_base.low > 0
