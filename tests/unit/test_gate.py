"""The gate's rules on small arrays: calibration error, the paired bootstrap, verdicts, slices, spec errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from feature_store.spec import FeatureSpec, load_spec
from feature_store.vocab import Vocabulary
from pipeline.checks.gate import (
    GateConfig,
    Interval,
    decide,
    paired_auc_diff,
    slice_labels,
    slice_metrics,
    summarize,
    verdict,
)
from pipeline.checks.metrics import ece, summary
from pipeline.errors import SpecError
from tests.helpers import LOANS_SPEC

CFG = GateConfig(min_auc=0.55, max_auc_regression=0.01, max_logloss_regression=0.05, max_ece=0.1,
                 max_slice_auc_regression=0.02, min_slice_rows=100, bootstrap_samples=200, confidence=0.95,
                 on_inconclusive="pass", ece_bins=10, seed=0)


def data(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    p = 1 / (1 + np.exp(-(x - 1)))
    y = (rng.uniform(size=n) < p).astype(float)
    return y, p


def eces(y: np.ndarray, cand: np.ndarray, champ: np.ndarray) -> dict[str, float]:
    return {"candidate": ece(y, cand), "champion": ece(y, champ)}


def test_ece_is_zero_for_calibrated_scores_and_large_for_miscalibrated():
    y, p = data(20000)
    assert ece(y, p) < 0.02
    assert ece(y, np.clip(p + 0.3, 0, 1)) > 0.25
    assert ece(y, np.full_like(p, np.nan)) == float("inf")


def test_paired_bootstrap_does_not_call_noise_a_regression():
    y, p = data()
    noisy = np.clip(p + np.random.default_rng(1).normal(0, 0.01, len(p)), 0, 1)
    ci = paired_auc_diff(y, noisy, p, 200, 0.95, seed=0)
    assert ci.low < 0 < ci.high or abs(ci.estimate) < 0.002
    assert verdict(ci, margin=0.01) in ("non_inferior", "inconclusive", "better")
    # a candidate that lost most of its signal is confidently worse
    worse = 0.5 * p + 0.5 * np.random.default_rng(2).uniform(size=len(p))
    ci_bad = paired_auc_diff(y, worse, p, 200, 0.95, seed=0)
    assert ci_bad.high < -0.01 and verdict(ci_bad, margin=0.01) == "worse"


def test_verdicts_by_where_the_interval_lies():
    iv = lambda lo, hi: Interval(estimate=(lo + hi) / 2, low=lo, high=hi, samples=100)  # noqa: E731
    assert verdict(iv(-0.05, -0.02), 0.01) == "worse"
    assert verdict(iv(0.001, 0.02), 0.01) == "better"
    assert verdict(iv(-0.005, 0.01), 0.01) == "non_inferior"
    assert verdict(iv(-0.03, 0.01), 0.01) == "inconclusive"
    # lower is better (log-loss): a confident rise beyond the margin is worse
    assert verdict(iv(0.02, 0.05), 0.01, higher_is_better=False) == "worse"
    assert verdict(iv(-0.05, -0.02), 0.01, higher_is_better=False) == "better"


def test_decide_fails_nan_and_flipped_candidates_and_passes_a_copy():
    y, p = data()
    s = summary(y, p)
    checks, _, _ = decide(y, p.copy(), p, s, s, eces(y, p, p), [], CFG)
    assert summarize(checks)[0], checks
    nan = p.copy()
    nan[::7] = np.nan
    checks, _, _ = decide(y, nan, p, summary(y, nan), s, eces(y, nan, p), [], CFG)
    ok, reason = summarize(checks)
    assert not ok and "NaN or out-of-range" in reason
    flipped = 1 - p
    checks, ci, _ = decide(y, flipped, p, summary(y, flipped), s, eces(y, flipped, p), [], CFG)
    failed = {c.name for c in checks if not c.passed}
    assert {"auc_floor", "auc_vs_champion", "logloss_vs_champion", "ece_ceiling"} <= failed
    assert ci.high < 0


def test_inconclusive_is_decided_by_config():
    y, p = data(400, seed=3)
    cand = np.clip(p + np.random.default_rng(4).normal(0, 0.08, len(p)), 0, 1)
    strict = GateConfig(**{**CFG.__dict__, "on_inconclusive": "fail", "max_auc_regression": 0.0,
                           "max_logloss_regression": 0.0})
    checks, ci, _ = decide(y, cand, p, summary(y, cand), summary(y, p), eces(y, cand, p), [], strict)
    auc_check = next(c for c in checks if c.name == "auc_vs_champion")
    assert ci.low < 0 and auc_check.detail.split(":")[0] in ("inconclusive", "worse") and not auc_check.passed


@pytest.mark.parametrize("sign", [1, -1])
def test_under_estimate_a_noise_level_difference_goes_to_the_better_point_estimate(sign):
    """A candidate a hair better or worse than the champion on 150 rows: both CIs straddle the margin. `pass`
    promotes either; `estimate` (the default) promotes only the one whose estimate does not favour the champion."""
    y, p = data(150, seed=5)
    logit = np.log(p / (1 - p))
    cand = 1 / (1 + np.exp(-(logit + sign * 0.25 * np.random.default_rng(6).normal(size=len(p)) * (y - 0.5))))
    results = {}
    for mode in ("pass", "estimate"):
        cfg = GateConfig(**{**CFG.__dict__, "on_inconclusive": mode})
        checks, ci, ll = decide(y, cand, p, summary(y, cand), summary(y, p), eces(y, cand, p), [], cfg)
        auc_check = next(c for c in checks if c.name == "auc_vs_champion")
        assert auc_check.detail.startswith("inconclusive") and ci.low < -cfg.max_auc_regression < ci.high
        results[mode] = summarize(checks)[0]
    assert results["pass"] and results["estimate"] is (sign > 0)


def test_slices_new_vs_returning_and_top_categories():
    raw = load_spec(LOANS_SPEC).model_dump()
    raw["slices"] = {"account": {"feature": "account_no", "kind": "new_vs_returning"},
                     "region": {"feature": "region", "top": 2}}
    spec = FeatureSpec.model_validate(raw)
    frame = pd.DataFrame({"account_no": ["a", "b", "c", None, "a"], "region": ["r1", "r1", "r2", "r3", "r2"]})
    vocab = Vocabulary({"a": 1, "b": 2})
    labels = slice_labels(spec, frame, {"account_no": vocab})
    assert labels["account"].tolist() == ["returning", "returning", "new", "new", "returning"]
    assert labels["region"].tolist()[:3] == ["r1", "r1", "r2"] and pd.isna(labels["region"].iloc[3])
    with pytest.raises(ValueError, match="no vocabulary for 'account_no'"):
        slice_labels(spec, frame, {})


def test_slice_regression_is_gated_and_small_slices_are_only_reported():
    y, p = data(4000)
    group = pd.Series(np.where(np.arange(len(y)) % 4 == 0, "minor", "major"), dtype=object)
    tiny = pd.Series(np.where(np.arange(len(y)) < 50, "tiny", None), dtype=object)
    cand = p.copy()
    minor = (group == "minor").to_numpy()
    cand[minor] = np.random.default_rng(5).uniform(size=minor.sum())  # candidate broken on one slice only
    rows = slice_metrics(y, cand, p, {"g": group, "t": tiny}, CFG)
    by = {(r.slice, r.value): r for r in rows}
    assert by[("t", "tiny")].gated is False and by[("t", "tiny")].auc_diff is None
    assert by[("g", "minor")].gated and by[("g", "minor")].auc_diff.high < -0.02
    checks, _, _ = decide(y, cand, p, summary(y, cand), summary(y, p), eces(y, cand, p), rows, CFG)
    failed = [c.name for c in checks if not c.passed]
    assert "slice:g=minor" in failed and "slice:g=major" not in failed


def test_spec_slices_must_name_a_categorical_feature(tmp_path):
    base = LOANS_SPEC.read_text()
    for slices, msg in (("slices:\n  s: {feature: nope}\n", "unknown feature 'nope'"),
                        ("slices:\n  s: {feature: amount}\n", "must be categorical"),
                        ("slices:\n  s: {feature: region, kind: weird}\n", "slices.s.kind")):
        path = tmp_path / "s.yaml"
        path.write_text(base + slices)
        with pytest.raises(SpecError, match=msg):
            load_spec(path)
    path.write_text(base + "slices:\n  accounts: {feature: account_no, kind: new_vs_returning}\n")
    spec = load_spec(path)
    assert spec.slices["accounts"].kind == "new_vs_returning" and spec.digest == load_spec(LOANS_SPEC).digest


# --- weighing the metrics (issue 13) ------------------------------------------------------------------------


def _sig(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def stream(n: int, seed: int = 0) -> tuple[np.random.Generator, np.ndarray, np.ndarray, np.ndarray]:
    """Two signals x and w; the label follows both."""
    rng = np.random.default_rng(seed)
    x, w = rng.normal(size=n), rng.normal(size=n)
    return rng, x, w, (rng.uniform(size=n) < _sig(2 * x + w - 0.3)).astype(float)


def calibrated(feature: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A well-calibrated score of one feature: logistic regression fit on the labels themselves."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression().fit(feature[:, None], y).predict_proba(feature[:, None])[:, 1]


def judge(y, pc, pp, registered_auc=None, cfg=CFG):
    checks, _, _ = decide(y, pc, pp, summary(y, pc), summary(y, pp), eces(y, pc, pp), [], cfg, registered_auc)
    return {c.name: c for c in checks}, summarize(checks)


def test_a_clearly_better_candidate_is_not_held_back_by_calibration_alone():
    rng, x, w, y = stream(2000)
    champion = calibrated(x + rng.normal(0, 1.5, len(x)), y)  # weak ranker, calibrated
    candidate = _sig(2 * x + w - 0.3 + 1.0)  # the right ranker, over-predicting
    assert ece(y, candidate) > CFG.max_ece > ece(y, champion)  # the old rule vetoed exactly this
    checks, (passed, reason) = judge(y, candidate, champion)
    assert passed, reason
    cal = checks["ece_ceiling"]
    assert not cal.passed and not cal.blocking and "outweighed: clearly better on the primary metrics" in cal.detail
    assert checks["auc_vs_champion"].detail.startswith("better") and "outweighed: ece_ceiling" in reason


def test_noise_neither_promotes_nor_blocks():
    # a 73-row holdout: ECE is reported, not gated, so a noisy point value cannot veto
    rng, x, w, y = stream(73, seed=0)
    champion = _sig(2 * x + w - 0.3)
    candidate = _sig(2 * x + w - 0.3 + 0.5 + rng.normal(0, 0.1, len(x)))
    assert ece(y, candidate) > max(CFG.max_ece, ece(y, champion))
    checks, (passed, _) = judge(y, candidate, champion)
    assert checks["ece_ceiling"].passed and "not gated" in checks["ece_ceiling"].detail and passed
    # a large holdout where the candidate ranks exactly as well (noise-level AUC difference) but is confidently
    # worse calibrated: noise on AUC is no reason to outweigh calibration, so the candidate is blocked
    rng, x, w, y = stream(2000, seed=1)
    champion = _sig(2 * x + w - 0.3)
    candidate = _sig(2 * x + w - 0.3 + 1.0 + rng.normal(0, 0.05, len(x)))
    checks, (passed, reason) = judge(y, candidate, champion)
    assert checks["auc_vs_champion"].detail.split(":")[0] in ("non_inferior", "inconclusive")
    assert not passed and checks["ece_ceiling"].blocking and not checks["ece_ceiling"].passed
    assert "FLYWHEEL_GATE__MAX_ECE" in reason and "FLYWHEEL_GATE__MAX_LOGLOSS_REGRESSION" in reason


def test_a_collapsed_champion_is_replaced():
    rng, x, w, y = stream(2000, seed=2)
    champion = _sig(0.15 * x + rng.normal(0, 1, len(x)))  # registered at 0.85, now near chance
    candidate = _sig(0.6 * x + 1.2 + rng.normal(0, 1, len(x)))  # ranks better, badly calibrated
    checks, (passed, reason) = judge(y, candidate, champion, registered_auc=0.85)
    assert not checks["champion_health"].passed and "collapsed from the 0.8500" in checks["champion_health"].detail
    assert passed, reason
    assert not checks["logloss_vs_champion"].passed and not checks["logloss_vs_champion"].blocking
    assert "outweighed: logloss_vs_champion, ece_ceiling; champion holdout AUC" in reason
    # the same pair where the champion always was this weak: its confidently better log-loss blocks again
    checks, (passed, reason) = judge(y, candidate, champion, registered_auc=0.6)
    assert checks["champion_health"].passed and not passed and "logloss_vs_champion worse" in reason
    # a champion below the AUC floor is failing too, and a candidate that beats it replaces it, floor or not
    strict = GateConfig(**{**CFG.__dict__, "min_auc": 0.7})
    checks, (passed, reason) = judge(y, candidate, champion, cfg=strict)
    assert passed and not checks["auc_floor"].passed and not checks["auc_floor"].blocking, reason
    assert "below min_auc 0.7" in checks["champion_health"].detail


def test_a_regression_is_blocked_even_against_a_failing_champion():
    rng, x, w, y = stream(2000, seed=3)
    champion = _sig(2 * x + w - 0.3)
    worse = _sig(0.3 * x + rng.normal(0, 2, len(x)))
    checks, (passed, reason) = judge(y, worse, champion)
    assert not passed and checks["auc_vs_champion"].detail.startswith("worse")
    assert "auc_vs_champion worse" in reason and "FLYWHEEL_GATE__MAX_AUC_REGRESSION" in reason
    checks, (passed, _) = judge(y, worse, champion, registered_auc=0.99)  # "collapsed" from 0.99, still better
    assert not checks["champion_health"].passed and not passed and checks["auc_vs_champion"].blocking


def test_ece_interval_is_paired_and_sized_to_the_sample():
    from pipeline.checks.gate import paired_ece_diff

    rng, x, w, y = stream(4000, seed=4)
    p = _sig(2 * x + w - 0.3)
    same, own = paired_ece_diff(y, p, p.copy(), 10, 200, 0.95, seed=0)
    assert same.low == same.high == 0.0 and own.low <= ece(y, p) + 0.01
    small, _ = paired_ece_diff(y[:100], np.clip(p[:100] + 0.05, 0, 1), p[:100], 10, 200, 0.95, seed=0)
    large, _ = paired_ece_diff(y, np.clip(p + 0.05, 0, 1), p, 10, 200, 0.95, seed=0)
    assert large.high - large.low < small.high - small.low


def _old_rank_auc(y: np.ndarray, p: np.ndarray) -> float:
    from scipy.stats import rankdata

    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((rankdata(p)[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _old_paired(metric: str, y: np.ndarray, pc: np.ndarray, pp: np.ndarray, margin: float, samples: int,
                confidence: float, seed: int) -> tuple[float, float, float, int, str] | None:
    """The formulas the gate and the online evaluation each wrote out before they shared `compare_paired`:
    paired resampling, quantile interval, verdict against the margin. Kept to pin that nothing moved."""
    rng = np.random.default_rng(seed)
    n, a = len(y), (1 - confidence) / 2
    if metric == "auc":
        if len(np.unique(y)) < 2:
            return None
        diffs = np.empty(samples)
        for i in range(samples):
            idx = rng.integers(0, n, n)
            diffs[i] = _old_rank_auc(y[idx], pc[idx]) - _old_rank_auc(y[idx], pp[idx])
        diffs = diffs[np.isfinite(diffs)]
        if len(diffs) < samples // 2:
            return None
        est, lo, hi = _old_rank_auc(y, pc) - _old_rank_auc(y, pp), np.quantile(diffs, a), np.quantile(diffs, 1 - a)
        count = len(diffs)
    else:
        q_c, q_p = np.clip(pc, 1e-7, 1 - 1e-7), np.clip(pp, 1e-7, 1 - 1e-7)
        d = -(y * np.log(q_c) + (1 - y) * np.log(1 - q_c)) + (y * np.log(q_p) + (1 - y) * np.log(1 - q_p))
        means = np.array([d[rng.integers(0, n, n)].mean() for _ in range(samples)])
        est, lo, hi, count = d.mean(), np.quantile(means, a), np.quantile(means, 1 - a), samples
    low, high = (lo, hi) if metric == "auc" else (-hi, -lo)
    v = ("worse" if high < -margin else "better" if low > 0 else "non_inferior" if low >= -margin
         else "inconclusive")
    return float(est), float(lo), float(hi), count, v


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("metric", ["auc", "logloss"])
def test_compare_paired_reproduces_the_old_formulas_exactly(seed, metric):
    from pipeline.checks.paired import compare_paired

    n = [30, 200, 1000, 2500, 12][seed]
    y, p = data(n, seed)
    rng = np.random.default_rng(100 + seed)
    pc = np.clip(p + rng.normal(scale=[0.3, 0.05, 0.1, 0.02, 0.2][seed], size=n), 0, 1)
    pp = np.round(p, 1) if seed % 2 else p
    for margin in (0.0, 0.005, 0.02, 0.1):
        got = compare_paired(metric, y, pc, pp, margin, 200, 0.9, seed)
        old = _old_paired(metric, y, pc, pp, margin, 200, 0.9, seed)
        assert got.rows == n and got.margin == margin
        if old is None:
            assert got.interval is None and got.verdict == "inconclusive"
        else:
            assert (got.delta, got.low, got.high, got.interval.samples, got.verdict) == old


def test_compare_paired_on_one_class_decides_nothing():
    from pipeline.checks.paired import compare_paired

    y, p = np.ones(300), data(300)[1]
    auc_cmp = compare_paired("auc", y, p, p, 0.01, 100, 0.95, 0)
    assert auc_cmp.interval is None and auc_cmp.delta is None and auc_cmp.verdict == "inconclusive"
    ll_cmp = compare_paired("logloss", y, np.clip(p - 0.2, 0, 1), p, 0.01, 100, 0.95, 0)
    assert ll_cmp.verdict == "worse" and ll_cmp.delta > 0
