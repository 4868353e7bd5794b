"""The promotion gate as pure functions over labels and two score vectors, so every rule is unit-testable on
small arrays and the same code judges the nightly candidate (offline) and the live champion (online).

Differences between candidate and champion are judged by a paired bootstrap confidence interval of
candidate-minus-champion: a regression beyond the margin blocks only when the whole interval lies past it, and a
noise-level difference (an interval that straddles the margin) is decided by `gate_on_inconclusive`, never by
which side of the line one lucky sample fell on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel
from scipy.stats import rankdata

from feature_store.spec import FeatureSpec
from feature_store.vocab import Vocabulary, canonical
from pipeline.checks.metrics import scores_valid

Verdict = Literal["better", "non_inferior", "inconclusive", "worse"]


class Interval(BaseModel):
    estimate: float
    low: float
    high: float
    samples: int


class Check(BaseModel):
    name: str
    passed: bool
    detail: str


class SliceMetrics(BaseModel):
    slice: str
    value: str
    rows: int
    positives: int
    candidate_auc: float | None
    champion_auc: float | None
    auc_diff: Interval | None
    gated: bool


@dataclass(frozen=True)
class GateConfig:
    min_auc: float
    max_auc_regression: float
    max_logloss_regression: float
    max_ece: float
    max_slice_auc_regression: float
    min_slice_rows: int
    bootstrap_samples: int
    confidence: float
    on_inconclusive: Literal["pass", "fail"]
    ece_bins: int
    seed: int

    @classmethod
    def from_settings(cls, s) -> GateConfig:
        return cls(s.min_auc, s.max_auc_regression, s.max_logloss_regression, s.max_ece,
                   s.max_slice_auc_regression, s.min_slice_rows, s.bootstrap_samples, s.bootstrap_confidence,
                   s.gate_on_inconclusive, s.ece_bins, s.seed)


def reliability(y: np.ndarray, p: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width score bin: mean score, observed positive rate, row count (NaN where a bin is empty)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(idx, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=p, minlength=bins) / counts
        rate = np.bincount(idx, weights=y, minlength=bins) / counts
    return mean_p, rate, counts


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the row-weighted gap between predicted and observed rate per score bin."""
    if len(y) == 0 or not scores_valid(p):
        return math.inf
    mean_p, rate, counts = reliability(y, p, bins)
    full = counts > 0
    return float(np.sum(counts[full] * np.abs(mean_p[full] - rate[full])) / counts.sum())


def _auc_fast(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney AUC (ties averaged); NaN when a resample has one class."""
    pos = y > 0.5
    n_pos = int(pos.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(p)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def paired_auc_diff(y: np.ndarray, pc: np.ndarray, pp: np.ndarray, samples: int, confidence: float,
                    seed: int) -> Interval | None:
    """Bootstrap CI of AUC(candidate) - AUC(champion), resampling rows once for both models (paired), so the
    shared difficulty of the sample cancels and only the models' difference is left in the interval."""
    if len(np.unique(y)) < 2:
        return None
    rng = np.random.default_rng(seed)
    n = len(y)
    diffs = np.empty(samples)
    for i in range(samples):
        idx = rng.integers(0, n, n)
        diffs[i] = _auc_fast(y[idx], pc[idx]) - _auc_fast(y[idx], pp[idx])
    diffs = diffs[np.isfinite(diffs)]
    if len(diffs) < samples // 2:
        return None
    a = (1 - confidence) / 2
    return Interval(estimate=_auc_fast(y, pc) - _auc_fast(y, pp), low=float(np.quantile(diffs, a)),
                    high=float(np.quantile(diffs, 1 - a)), samples=len(diffs))


def row_logloss(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-7, 1 - 1e-7)
    return -(y * np.log(q) + (1 - y) * np.log(1 - q))


def paired_logloss_diff(y: np.ndarray, pc: np.ndarray, pp: np.ndarray, samples: int, confidence: float,
                        seed: int) -> Interval:
    """Bootstrap CI of log-loss(candidate) - log-loss(champion): a mean of per-row differences, so cheap."""
    d = row_logloss(y, pc) - row_logloss(y, pp)
    rng = np.random.default_rng(seed)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(samples)])
    a = (1 - confidence) / 2
    return Interval(estimate=float(d.mean()), low=float(np.quantile(means, a)),
                    high=float(np.quantile(means, 1 - a)), samples=samples)


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


def _judge(name: str, v: Verdict, detail: str, on_inconclusive: str) -> Check:
    passed = v in ("better", "non_inferior") or (v == "inconclusive" and on_inconclusive == "pass")
    return Check(name=name, passed=passed, detail=f"{v}: {detail}")


def slice_labels(spec: FeatureSpec, frame: pd.DataFrame, parent_vocabs: dict[str, Vocabulary]) -> dict[str, pd.Series]:
    """For each declared slice, each row's slice value (NaN = in no slice value that is reported)."""
    out: dict[str, pd.Series] = {}
    for name, sl in spec.slices.items():
        values = canonical(frame[sl.feature].reset_index(drop=True))
        if sl.kind == "new_vs_returning":
            known = parent_vocabs.get(sl.feature)
            if known is None:
                raise ValueError(f"slice {name!r}: the parent model has no vocabulary for {sl.feature!r}")
            seen = values.isin(list(known.ids)).fillna(False).to_numpy(dtype=bool)
            out[name] = pd.Series(np.where(seen, "returning", "new"), dtype=object)
        else:
            top = values.value_counts().head(sl.top).index
            out[name] = values.where(values.isin(top)).astype(object)
    return out


def slice_metrics(y: np.ndarray, pc: np.ndarray, pp: np.ndarray, labels: dict[str, pd.Series],
                  cfg: GateConfig) -> list[SliceMetrics]:
    rows = []
    for name, lab in labels.items():
        for value in sorted(lab.dropna().unique(), key=str):
            m = (lab == value).to_numpy()
            ys = y[m]
            two = len(np.unique(ys)) == 2
            gated = two and int(m.sum()) >= cfg.min_slice_rows
            rows.append(SliceMetrics(
                slice=name, value=str(value), rows=int(m.sum()), positives=int(ys.sum()),
                candidate_auc=_auc_fast(ys, pc[m]) if two else None,
                champion_auc=_auc_fast(ys, pp[m]) if two else None,
                auc_diff=paired_auc_diff(ys, pc[m], pp[m], cfg.bootstrap_samples, cfg.confidence, cfg.seed)
                if gated else None, gated=gated))
    return rows


def decide(y: np.ndarray, pc: np.ndarray, pp: np.ndarray, cand: dict, champ: dict, eces: dict[str, float],
           slices: list[SliceMetrics], cfg: GateConfig) -> tuple[list[Check], Interval | None, Interval | None]:
    """Every rule as a named check; the gate passes only if all do. Returns the checks and the two CIs."""
    if not scores_valid(pc):
        bad = int(np.sum(~np.isfinite(pc)) + np.sum(np.isfinite(pc) & ((pc < 0) | (pc > 1))))
        return [Check(name="valid_scores", passed=False,
                      detail=f"candidate produced {bad} NaN or out-of-range scores of {len(pc)}")], None, None
    checks = [Check(name="valid_scores", passed=True, detail=f"{len(pc)} finite scores in [0, 1]")]
    if not scores_valid(pp):
        raise ValueError("the champion produced NaN or out-of-range scores on the holdout; it cannot be a baseline")
    ll = paired_logloss_diff(y, pc, pp, cfg.bootstrap_samples, cfg.confidence, cfg.seed)
    margin = cfg.max_logloss_regression * champ["logloss"]
    checks.append(_judge("logloss_vs_champion", verdict(ll, margin, higher_is_better=False),
                         f"log-loss {cand['logloss']:.4f} vs {champ['logloss']:.4f}, diff CI "
                         f"[{ll.low:+.4f}, {ll.high:+.4f}], allowed +{margin:.4f}", cfg.on_inconclusive))
    # Above the ceiling a candidate still passes if it is no worse calibrated than the champion it replaces:
    # blocking it would keep serving the worse-calibrated model.
    c_ece, p_ece = eces["candidate"], eces["champion"]
    checks.append(Check(name="ece_ceiling", passed=c_ece <= cfg.max_ece or c_ece <= p_ece,
                        detail=f"ECE {c_ece:.4f} vs champion {p_ece:.4f} (ceiling {cfg.max_ece}, or no worse "
                               f"than the champion)"))
    auc_ci = None
    if cand["auc"] is None:
        checks.append(Check(name="auc_floor", passed=True, detail="holdout has one class: AUC undefined"))
    else:
        checks.append(Check(name="auc_floor", passed=cand["auc"] >= cfg.min_auc,
                            detail=f"AUC {cand['auc']:.4f} (floor {cfg.min_auc})"))
        auc_ci = paired_auc_diff(y, pc, pp, cfg.bootstrap_samples, cfg.confidence, cfg.seed)
        if auc_ci is not None:
            checks.append(_judge("auc_vs_champion", verdict(auc_ci, cfg.max_auc_regression),
                                 f"AUC {cand['auc']:.4f} vs {champ['auc']:.4f}, diff CI [{auc_ci.low:+.4f}, "
                                 f"{auc_ci.high:+.4f}], allowed -{cfg.max_auc_regression}", cfg.on_inconclusive))
    for sm in slices:
        if sm.gated and sm.auc_diff is not None:
            checks.append(_judge(f"slice:{sm.slice}={sm.value}", verdict(sm.auc_diff, cfg.max_slice_auc_regression),
                                 f"AUC {sm.candidate_auc:.4f} vs {sm.champion_auc:.4f} on {sm.rows} rows, diff CI "
                                 f"[{sm.auc_diff.low:+.4f}, {sm.auc_diff.high:+.4f}], allowed "
                                 f"-{cfg.max_slice_auc_regression}", cfg.on_inconclusive))
    return checks, auc_ci, ll


def summarize(checks: list[Check]) -> tuple[bool, str]:
    failed = [c for c in checks if not c.passed]
    if failed:
        return False, "; ".join(f"{c.name} {c.detail}" for c in failed)
    headline = next((c for c in checks if c.name == "auc_vs_champion"), None) or checks[-1]
    return True, f"all {len(checks)} checks passed ({headline.name} {headline.detail})"
