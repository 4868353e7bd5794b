"""The promotion gate as pure functions over labels and two score vectors, so every rule is unit-testable on
small arrays and the same code judges the nightly candidate (offline) and the live champion (online).

Differences between candidate and champion are judged by a paired bootstrap confidence interval of
candidate-minus-champion (`pipeline.checks.paired`, the comparison the online evaluation uses too): a regression beyond the margin blocks only when the whole interval lies past it, and a
noise-level difference (an interval that straddles the margin) is decided by `gate_on_inconclusive`, never by
which side of the line one lucky sample fell on. Its default, `estimate`, gives it to the better point estimate:
the likelier of the two to be better, where `pass` promoted every candidate not proven worse and let a small
stream's loop follow each day's noise (25 of 40 public-stream nights were inconclusive), and `fail` froze it.
`estimate` lifted the loop's mean AUC on each of five public streams, by 0.001-0.013, and cost the simulator
0.001 (bench/results/backtest.md). Every check is sized to its sample: ECE gets a paired CI too,
and is only reported below `ece_min_rows`.

The metrics are weighed, not each given a veto. AUC and log-loss are primary. A candidate clearly better on them
(one confidently better, neither confidently worse) is not held back by calibration alone: that is fixed by
calibrating, while keeping the champion keeps serving the worse ranker. A failing champion (holdout AUC below
`min_auc`, or `champion_collapse_auc_drop` below the AUC it was registered with) is itself a reason to act: a
candidate not confidently worse on AUC replaces it whatever its calibration, log-loss, floor or slices. A
confident AUC regression always blocks. A rule that was outweighed stays in the checks as failed but not
blocking, so the report shows what was overruled and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel

from feature_store.spec import FeatureSpec
from feature_store.vocab import Vocabulary, canonical
from pipeline.checks.metrics import rank_auc, scores_valid
from pipeline.checks.paired import (
    Interval,
    Verdict,
    compare_paired,
    paired_auc_diff,
    paired_ece_diff,
    verdict,
)
from pipeline.config import Settings, knob


class Check(BaseModel):
    name: str
    passed: bool
    detail: str
    blocking: bool = True


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
    on_inconclusive: Literal["pass", "fail", "estimate"]
    ece_bins: int
    seed: int
    max_ece_regression: float = 0.01
    ece_min_rows: int = 300
    champion_collapse_auc_drop: float = 0.1
    refit_on_inconclusive: Literal["pass", "fail", "estimate"] = "pass"

    @classmethod
    def from_settings(cls, s: Settings) -> GateConfig:
        """By keyword from the `gate` section, whose fields are these (tests/unit/test_config.py holds them
        equal): a reordered or added field cannot silently swap or drop a threshold."""
        return cls(**s.gate.model_dump(), seed=s.seed)


def _judge(name: str, v: Verdict, detail: str, on_inconclusive: str, setting: str,
           estimate_favours: bool = True) -> Check:
    """`estimate_favours`: the point estimate of the difference is not against the candidate, which decides an
    inconclusive verdict under `on_inconclusive=estimate`. Slices leave it True: they guard against a confident
    regression in one segment, and a neutral candidate would have every one of k slice estimates on its side
    only once in 2^k nights."""
    passed = v in ("better", "non_inferior") or (
        v == "inconclusive" and (on_inconclusive == "pass" or (on_inconclusive == "estimate" and estimate_favours)))
    hint = "" if passed else f" (to allow more, raise {knob(setting)}" + (
        f"; or set {knob('gate_on_inconclusive')}=pass" if v == "inconclusive" else "") + ")"
    return Check(name=name, passed=passed, detail=f"{v}: {detail}{hint}")


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
                candidate_auc=rank_auc(ys, pc[m]) if two else None,
                champion_auc=rank_auc(ys, pp[m]) if two else None,
                auc_diff=paired_auc_diff(ys, pc[m], pp[m], cfg.bootstrap_samples, cfg.confidence, cfg.seed)
                if gated else None, gated=gated))
    return rows


def champion_failing(champ: dict, registered_auc: float | None, cfg: GateConfig) -> str | None:
    """Why the champion itself is failing on this holdout, or None: its AUC below the floor, or collapsed far
    below the AUC it was registered with (a data bug upstream, a concept drift it cannot follow)."""
    auc = champ.get("auc")
    if auc is None:
        return None
    if auc < cfg.min_auc:
        return f"champion holdout AUC {auc:.4f} is below min_auc {cfg.min_auc}"
    if registered_auc is not None and auc < registered_auc - cfg.champion_collapse_auc_drop:
        return (f"champion holdout AUC {auc:.4f} collapsed from the {registered_auc:.4f} it was registered with "
                f"(more than champion_collapse_auc_drop {cfg.champion_collapse_auc_drop})")
    return None


def _calibration(y: np.ndarray, pc: np.ndarray, pp: np.ndarray, eces: dict[str, float], cfg: GateConfig) -> Check:
    """Fails only when the candidate is confidently above the ECE ceiling and confidently worse calibrated than
    the champion (by more than `max_ece_regression`); below `ece_min_rows` it is only reported."""
    c_ece, p_ece = eces["candidate"], eces["champion"]
    if len(y) < cfg.ece_min_rows:
        return Check(name="ece_ceiling", passed=True, blocking=False,
                     detail=f"not gated: ECE {c_ece:.4f} vs champion {p_ece:.4f} on {len(y)} rows, fewer than "
                            f"ece_min_rows {cfg.ece_min_rows}")
    diff, own = paired_ece_diff(y, pc, pp, cfg.ece_bins, cfg.bootstrap_samples, cfg.confidence, cfg.seed)
    above = own.low > cfg.max_ece
    worse = verdict(diff, cfg.max_ece_regression, higher_is_better=False) == "worse"
    detail = (f"ECE {c_ece:.4f} (CI [{own.low:.4f}, {own.high:.4f}]) vs champion {p_ece:.4f}, diff CI "
              f"[{diff.low:+.4f}, {diff.high:+.4f}]; fails only if confidently above max_ece {cfg.max_ece} and "
              f"worse than the champion by more than max_ece_regression {cfg.max_ece_regression}")
    if above and worse:
        detail += f" (raise {knob('max_ece')} or {knob('max_ece_regression')})"
    return Check(name="ece_ceiling", passed=not (above and worse), detail=detail)


def _outweigh(check: Check, why: str) -> Check:
    return check if check.passed else check.model_copy(update={"blocking": False,
                                                                "detail": f"{check.detail}; outweighed: {why}"})


def decide(y: np.ndarray, pc: np.ndarray, pp: np.ndarray, cand: dict, champ: dict, eces: dict[str, float],
           slices: list[SliceMetrics], cfg: GateConfig, champion_registered_auc: float | None = None,
           ) -> tuple[list[Check], Interval | None, Interval | None]:
    """Every rule as a named check; the gate passes if no blocking check fails (see the module docstring for
    how they are weighed). Returns the checks and the AUC and log-loss CIs."""
    if not scores_valid(pc):
        bad = int(np.sum(~np.isfinite(pc)) + np.sum(np.isfinite(pc) & ((pc < 0) | (pc > 1))))
        return [Check(name="valid_scores", passed=False,
                      detail=f"candidate produced {bad} NaN or out-of-range scores of {len(pc)}")], None, None
    if not scores_valid(pp):
        raise ValueError("the champion produced NaN or out-of-range scores on the holdout; it cannot be a baseline")
    checks = [Check(name="valid_scores", passed=True, detail=f"{len(pc)} finite scores in [0, 1]")]
    failing = champion_failing(champ, champion_registered_auc, cfg)
    checks.append(Check(name="champion_health", passed=failing is None, blocking=False,
                        detail=failing or f"champion holdout AUC {champ.get('auc')} (registered with "
                                          f"{champion_registered_auc})"))
    ll = compare_paired("logloss", y, pc, pp, cfg.max_logloss_regression * champ["logloss"],
                        cfg.bootstrap_samples, cfg.confidence, cfg.seed)
    ll_v = ll.verdict
    ll_check = _judge("logloss_vs_champion", ll_v, f"log-loss {cand['logloss']:.4f} vs {champ['logloss']:.4f}, "
                      f"diff CI [{ll.low:+.4f}, {ll.high:+.4f}], allowed +{ll.margin:.4f}", cfg.on_inconclusive,
                      "max_logloss_regression", ll.interval is None or ll.interval.estimate <= 0)
    auc_ci, auc_v, auc_checks = None, None, []
    if cand["auc"] is None:
        auc_checks.append(Check(name="auc_floor", passed=True, detail="holdout has one class: AUC undefined"))
    else:
        floor_ok = cand["auc"] >= cfg.min_auc
        auc_checks.append(Check(name="auc_floor", passed=floor_ok, detail=f"AUC {cand['auc']:.4f} (floor min_auc "
                                f"{cfg.min_auc}{'' if floor_ok else '; lower ' + knob('min_auc')})"))
        auc_cmp = compare_paired("auc", y, pc, pp, cfg.max_auc_regression, cfg.bootstrap_samples,
                                 cfg.confidence, cfg.seed)
        auc_ci = auc_cmp.interval
        if auc_ci is not None:
            auc_v = auc_cmp.verdict
            auc_checks.append(_judge("auc_vs_champion", auc_v, f"AUC {cand['auc']:.4f} vs {champ['auc']:.4f}, diff "
                                     f"CI [{auc_cmp.low:+.4f}, {auc_cmp.high:+.4f}], allowed "
                                     f"-{cfg.max_auc_regression}", cfg.on_inconclusive, "max_auc_regression",
                                     auc_ci.estimate >= 0))
    calibration = _calibration(y, pc, pp, eces, cfg)
    slice_checks = [_judge(f"slice:{sm.slice}={sm.value}", verdict(sm.auc_diff, cfg.max_slice_auc_regression),
                           f"AUC {sm.candidate_auc:.4f} vs {sm.champion_auc:.4f} on {sm.rows} rows, diff CI "
                           f"[{sm.auc_diff.low:+.4f}, {sm.auc_diff.high:+.4f}], allowed "
                           f"-{cfg.max_slice_auc_regression}", cfg.on_inconclusive, "max_slice_auc_regression")
                    for sm in slices if sm.gated and sm.auc_diff is not None]
    clearly_better = "better" in (auc_v, ll_v) and "worse" not in (auc_v, ll_v)
    if failing is not None and auc_v != "worse":
        why = f"the champion is failing ({failing}) and the candidate is not worse on AUC"
        if cand["auc"] is not None and cand["auc"] > champ["auc"]:
            auc_checks[0] = _outweigh(auc_checks[0], why)
        ll_check, calibration = _outweigh(ll_check, why), _outweigh(calibration, why)
        slice_checks = [_outweigh(c, why) for c in slice_checks]
        if auc_v == "inconclusive":
            auc_checks[-1] = _outweigh(auc_checks[-1], why)
    elif clearly_better:
        calibration = _outweigh(calibration, f"clearly better on the primary metrics (AUC {auc_v}, log-loss "
                                             f"{ll_v}); calibration alone does not keep the worse ranker")
    return [*checks, ll_check, calibration, *auc_checks, *slice_checks], auc_ci, ll.interval


def summarize(checks: list[Check]) -> tuple[bool, str]:
    failed = [c for c in checks if not c.passed and c.blocking]
    if failed:
        return False, "; ".join(f"{c.name} {c.detail}" for c in failed)
    headline = next((c for c in checks if c.name == "auc_vs_champion"), None) or checks[-1]
    overruled = [c.name for c in checks if not c.passed and c.name != "champion_health"]
    sick = next((c.detail for c in checks if c.name == "champion_health" and not c.passed), None)
    note = (f"; outweighed: {', '.join(overruled)}" if overruled else "") + (f"; {sick}" if sick else "")
    lead = f"all {len(checks)} checks passed" if not overruled else f"passed on the weight of {len(checks)} checks"
    return True, f"{lead} ({headline.name} {headline.detail}){note}"
