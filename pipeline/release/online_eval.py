"""Online evaluation: once labels for the new champion's live traffic arrive, compare it with the champion it
replaced on the very rows it served, and roll it back automatically when it is worse beyond the declared margin.

The collected `training/dt=D` partitions (and, for a day not collected yet, its sealed log segments joined with
the feedback that has arrived: `live_rows`) hold, per row, the served model version, its score and the exact
features it saw; the previous champion is scored offline on those same features. Both models are thus judged
on identical rows (`pipeline.checks.paired.compare_paired`, the comparison the offline gate makes), with no canary split
needed. Too few labeled rows means "wait", never a decision on noise.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pandas as pd
from pydantic import BaseModel

from pipeline import registry
from pipeline.checks.metrics import scores_valid, summary
from pipeline.checks.paired import Interval, compare_paired
from pipeline.errors import StageError
from pipeline.learn.holdout import TIE_BREAKERS
from pipeline.release.live_rows import live_rows
from pipeline.runtime import Runtime, parse_day, runtime
from pipeline.tags import Alias, Tag

log = logging.getLogger("flywheel.online_eval")
TRAINING = "training"  # collect's output table: every served row with its label


class OnlineEvalResult(BaseModel):
    day: str
    champion: str | None
    previous: str | None
    decision: str  # keep | wait | rolled_back | no_baseline
    reason: str
    rows: int
    positives: int
    champion_metrics: dict[str, float | None] = {}
    previous_metrics: dict[str, float | None] = {}
    auc_diff: Interval | None = None
    logloss_diff: Interval | None = None
    days: list[str] = []


def served_rows(rt: Runtime, days: list[date], version: str) -> pd.DataFrame:
    """Labeled rows that `version` served in the given days: a collected day from `training/dt=D`, a day not
    collected yet (today, or yesterday before the nightly run) from its sealed log segments and the feedback
    that has arrived (`live_rows`), so a bad release is judged within the hour, not the next night."""
    frames = []
    today = datetime.now(UTC).date()
    for d in days:
        if rt.lake.read_manifest(TRAINING, d) is None:
            if d <= today:
                live = live_rows(rt, d, version)
                if len(live):
                    frames.append(live)
            continue
        frame = rt.lake.read_partition(TRAINING, d).to_pandas()
        missing = [c for c in ("model_version", "score", rt.spec.label.name) if c not in frame.columns]
        if missing:
            raise StageError(f"{TRAINING}/dt={d} lacks {', '.join(missing)}: not a collected prediction log")
        frames.append(frame[frame["model_version"].astype(str) == version])
    if not frames:
        return pd.DataFrame()
    cols = [*rt.spec.feature_names, "model_version", "score", rt.spec.label.name]
    keys = [c for c in (rt.spec.event_time, *TIE_BREAKERS) if all(c in f.columns for f in frames) and c not in cols]
    # in time order (ties by request id and row), not file order: the paired bootstrap resamples by position
    out = pd.concat([f[cols + keys] for f in frames], ignore_index=True)
    out = (out.sort_values(keys, kind="stable", na_position="last") if keys else out)[cols].reset_index(drop=True)
    return out[np.isfinite(out["score"].to_numpy(dtype=np.float64))].reset_index(drop=True)


class Comparison(BaseModel):
    """`served` (scores as logged) against `baseline` (re-scored offline) on the same labeled live rows."""

    rows: int
    positives: int
    enough: bool
    served_metrics: dict[str, float | None] = {}
    baseline_metrics: dict[str, float | None] = {}
    auc_diff: Interval | None = None
    logloss_diff: Interval | None = None
    auc_verdict: str = "inconclusive"
    logloss_verdict: str = "inconclusive"
    detail: str = ""

    @property
    def worse(self) -> bool:
        return "worse" in (self.auc_verdict, self.logloss_verdict)

    @property
    def at_least_as_good(self) -> bool:
        return {self.auc_verdict, self.logloss_verdict} <= {"better", "non_inferior"}


def compare(rt: Runtime, client, days: list[date], served: str, baseline: str) -> Comparison:
    s, spec = rt.settings, rt.spec
    rows = served_rows(rt, days, served)
    y = rows[spec.label.name].to_numpy(dtype=np.float64) if len(rows) else np.zeros(0)
    n, pos = len(y), int(y.sum())
    if n < s.online_eval.min_rows or pos < s.online_eval.min_positives or n - pos < s.online_eval.min_positives:
        return Comparison(rows=n, positives=pos, enough=False,
                          detail=f"{n} labeled rows ({pos} positive) served by v{served} in {days[0]}..{days[-1]}; "
                                 f"need {s.online_eval.min_rows} rows and {s.online_eval.min_positives} of each class")
    pc = rows["score"].to_numpy(dtype=np.float64)
    pp = registry.load_version(client, rt.model_name, baseline, rt.cache_dir).for_spec(spec).predict(
        rows[spec.feature_names])
    if not scores_valid(pp):
        raise StageError(f"v{baseline} produced NaN or out-of-range scores on the logged features; it is no "
                         "baseline to compare with")
    cm, pm = summary(y, pc), summary(y, pp)
    boot = (s.gate.bootstrap_samples, s.gate.confidence, s.seed)
    auc = compare_paired("auc", y, pc, pp, s.online_eval.max_auc_regression, *boot)
    ll = compare_paired("logloss", y, pc, pp, s.online_eval.max_logloss_regression * pm["logloss"], *boot)
    detail = (f"on {n} live rows ({pos} positive): AUC v{served} {cm['auc']:.4f} vs v{baseline} "
              f"{pm['auc']:.4f} (diff CI {_ci(auc.interval)}, allowed -{auc.margin}: {auc.verdict}); "
              f"log-loss {cm['logloss']:.4f} vs {pm['logloss']:.4f} (diff CI {_ci(ll.interval)}, allowed "
              f"+{ll.margin:.4f}: {ll.verdict})")
    return Comparison(rows=n, positives=pos, enough=True, served_metrics=cm, baseline_metrics=pm,
                      auc_diff=auc.interval, logloss_diff=ll.interval, auc_verdict=auc.verdict,
                      logloss_verdict=ll.verdict, detail=detail)


def window(rt: Runtime, day: date) -> list[date]:
    return [day - timedelta(days=i) for i in range(rt.settings.online_eval.window_days - 1, -1, -1)]


def online_eval(day: str | date, rt: Runtime | None = None) -> OnlineEvalResult:
    from pipeline.release.rollback import rollback

    rt = rt or runtime()
    day = parse_day(day)
    client = rt.client()
    name = rt.model_name
    days = window(rt, day)
    champion = registry.get_alias(client, name, Alias.CHAMPION)
    previous = registry.get_alias(client, name, Alias.PREVIOUS)
    base = {"day": day.isoformat(), "champion": champion.version if champion else None,
            "previous": previous.version if previous else None, "days": [d.isoformat() for d in days]}
    if champion is None:
        raise StageError(f"{name} has no champion to evaluate online: run `flywheel bootstrap` first")
    if previous is None:
        return OnlineEvalResult(**base, decision="no_baseline", rows=0, positives=0,
                                reason=f"champion v{champion.version} has no 'previous' version to compare with")
    c = compare(rt, client, days, champion.version, previous.version)
    if not c.enough:
        result = OnlineEvalResult(**base, decision="wait", rows=c.rows, positives=c.positives, reason=c.detail)
        _record(client, name, champion.version, result)
        return result
    common = {**base, "rows": c.rows, "positives": c.positives, "champion_metrics": c.served_metrics,
              "previous_metrics": c.baseline_metrics, "auc_diff": c.auc_diff, "logloss_diff": c.logloss_diff}
    if c.worse:
        reason = f"online evaluation: v{champion.version} worse than v{previous.version} {c.detail}"
        result = OnlineEvalResult(**common, decision="rolled_back", reason=reason)
        _record(client, name, champion.version, result)
        rollback(reason, expected_champion=champion.version, by="online_eval", rt=rt)
        log.warning("%s", reason)
        return result
    result = OnlineEvalResult(**common, decision="keep", reason=f"v{champion.version} holds up {c.detail}")
    _record(client, name, champion.version, result)
    return result


def _ci(ci: Interval | None) -> str:
    return "n/a" if ci is None else f"[{ci.low:+.4f}, {ci.high:+.4f}]"


def _record(client, name: str, version: str, result: OnlineEvalResult) -> None:
    client.set_model_version_tag(name, version, Tag.ONLINE_EVAL, f"{result.decision}: {result.reason}"[:4900])
    client.set_model_version_tag(name, version, Tag.ONLINE_EVAL_AT, datetime.now(UTC).isoformat())
