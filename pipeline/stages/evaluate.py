"""Evaluate: candidate and its parent champion scored on the same held-out, time-later slice of the day, which
the candidate never trained on. The rules live in `pipeline.checks.gate` (floors, paired-bootstrap regressions overall
and per declared slice, calibration); this stage gathers the data, applies them, and leaves the evidence on the
training run: metrics, tags and an HTML report with plots, so a reviewer sees why it passed or failed."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from datetime import date

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel

from feature_store.spec import FeatureSpec
from pipeline import registry
from pipeline.checks.gate import (
    Check,
    GateConfig,
    Interval,
    SliceMetrics,
    decide,
    slice_labels,
    slice_metrics,
    summarize,
)
from pipeline.checks.metrics import ece, scores_valid, summary
from pipeline.config import Settings
from pipeline.errors import StageError
from pipeline.learn.holdout import split_by_time
from pipeline.learn.model import ModelBundle
from pipeline.learn.policies import REFIT, WARM
from pipeline.runtime import Runtime, parse_day, runtime
from pipeline.stages.validate import VALIDATED
from pipeline.tags import Tag

log = logging.getLogger("flywheel.evaluate")
REPORT_ARTIFACT_DIR = "evaluation"


class EvalResult(BaseModel):
    day: str
    run_id: str
    champion_version: str
    candidate: dict[str, float | None]
    champion: dict[str, float | None]
    passed: bool
    reason: str
    checks: list[Check] = []
    auc_diff: Interval | None = None
    logloss_diff: Interval | None = None
    slices: list[SliceMetrics] = []
    report_uri: str | None = None
    report_path: str | None = None
    holdout_rows: int = 0
    holdout_days: list[str] = []


def gate(cand: dict, champ: dict, cand_valid: bool, min_auc: float, max_regression: float) -> tuple[bool, str]:
    """Point-estimate gate, kept for callers without the holdout rows at hand (no CI, no slices)."""
    if not cand_valid:
        return False, "candidate produced NaN or out-of-range scores"
    if cand["auc"] is None or champ["auc"] is None:
        ok = cand["logloss"] <= champ["logloss"] * (1 + max_regression)
        return ok, f"holdout has one class; log-loss {cand['logloss']:.4f} vs champion {champ['logloss']:.4f}"
    if cand["auc"] < min_auc:
        return False, f"AUC {cand['auc']:.4f} below floor {min_auc}"
    if cand["auc"] < champ["auc"] - max_regression:
        return False, f"AUC {cand['auc']:.4f} regresses more than {max_regression} vs champion {champ['auc']:.4f}"
    return True, f"AUC {cand['auc']:.4f} vs champion {champ['auc']:.4f} (allowed regression {max_regression})"


def _finite(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if v is not None and np.isfinite(v)}


def tag_json(value: object, limit: int = 4900) -> str:
    """JSON for a tag, cut to fit MLflow's tag size limit (the report carries the full detail)."""
    text = json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def registered_auc(tags: dict[str, str]) -> float | None:
    """The holdout AUC a version was registered with (its own evaluation, or bootstrap's): the yardstick for
    telling that a champion has collapsed."""
    try:
        auc = json.loads(tags.get(Tag.METRICS, "{}")).get("candidate", {}).get("auc")
    except (ValueError, AttributeError):
        return None
    return float(auc) if isinstance(auc, int | float) else None


@dataclass(frozen=True)
class Judgement:
    """The gate's verdict on one candidate against the champion over one holdout, with its evidence."""

    cfg: GateConfig
    cand: dict
    champ: dict
    eces: dict[str, float]
    slices: list[SliceMetrics]
    checks: list[Check]
    auc_ci: Interval | None
    ll_ci: Interval | None
    passed: bool
    reason: str
    pc: np.ndarray
    pp: np.ndarray

    @property
    def primary(self) -> float:
        """What candidates are ranked by: holdout AUC, or minus the log-loss on a one-class holdout."""
        return self.cand["auc"] if self.cand.get("auc") is not None else -self.cand["logloss"]


def judge(s: Settings, spec: FeatureSpec, holdout: pd.DataFrame, candidate: ModelBundle, champion: ModelBundle,
          baseline: str, champion_registered_auc: float | None = None, policy: str = WARM) -> Judgement:
    """Score both models on the holdout and apply the gate's rules: what `evaluate` records and what a night of
    several candidates uses to choose among them. A `refit` candidate's noise-level differences are decided by
    `gate.refit_on_inconclusive`: it learned from every row its champion did and more, by the champion's own
    recipe, and on a small night's holdout the `estimate` rule fails it about half the time on noise alone (the
    email stream: 7 of 10 refits failed on point estimates a few held-out rows apart)."""
    y = holdout[spec.label.name].to_numpy(dtype=np.float64)
    pc, pp = candidate.predict(holdout), champion.predict(holdout)
    if not scores_valid(pp):
        raise StageError(f"{baseline} produced NaN or out-of-range scores; it cannot serve as the baseline "
                         "(roll it back: `flywheel rollback`)")
    cfg = GateConfig.from_settings(s)
    if policy == REFIT:
        cfg = dataclasses.replace(cfg, on_inconclusive=cfg.refit_on_inconclusive)
    cand, champ = summary(y, pc), summary(y, pp)
    eces = {"candidate": ece(y, pc, cfg.ece_bins), "champion": ece(y, pp, cfg.ece_bins)}
    try:
        labels = slice_labels(spec, holdout, champion.vocabs)
    except ValueError as e:
        raise StageError(f"feature spec slices cannot be evaluated: {e}") from e
    slices = slice_metrics(y, pc, pp, labels, cfg) if scores_valid(pc) else []
    checks, auc_ci, ll_ci = decide(y, pc, pp, cand, champ, eces, slices, cfg, champion_registered_auc)
    passed, reason = summarize(checks)
    return Judgement(cfg, cand, champ, eces, slices, checks, auc_ci, ll_ci, passed, reason, pc, pp)


def evaluate(day: str | date, run_id: str, rt: Runtime | None = None) -> EvalResult:
    import mlflow

    from pipeline.checks.eval_report import write_report

    rt = rt or runtime()
    day = parse_day(day)
    s, spec = rt.settings, rt.spec
    client = rt.client()
    run = client.get_run(run_id)
    parent = run.data.tags.get(Tag.PARENT)
    if parent is None:
        raise StageError(f"run {run_id} has no {Tag.PARENT} tag: not a Flywheel training run")
    # A small night (`train.pool`) is judged on the newest rows of all the days it trained on, as it was split.
    pooled = [date.fromisoformat(d) for d in run.data.tags.get(Tag.POOLED, "").split(",") if d] or [day]
    frame = pa.concat_tables([rt.lake.read_partition(VALIDATED, d) for d in pooled]).to_pandas()
    _, holdout = split_by_time(frame, spec.event_time, s.training.holdout_fraction)
    if len(holdout) == 0:
        raise StageError(f"day {day} has an empty holdout slice; raise holdout_fraction or min_rows")
    holdout = holdout.reset_index(drop=True)
    y = holdout[spec.label.name].to_numpy(dtype=np.float64)
    candidate = registry.load_run_bundle(run_id, rt.cache_dir)
    # A champion from before a declared spec migration scores the new holdout as its migrated twin.
    champion = registry.load_version(client, rt.model_name, parent, rt.cache_dir).for_spec(spec)
    j = judge(s, spec, holdout, candidate, champion, f"champion v{parent} on {day}'s holdout",
              registered_auc(registry.get_version(client, rt.model_name, parent).tags),
              policy=run.data.tags.get(Tag.POLICY, WARM))
    report = write_report(
        s.reports_dir / "evaluation" / f"{day.isoformat()}-{run_id}", title=f"{rt.model_name} candidate "
        f"(run {run_id[:8]}, day {day}) vs champion v{parent}", passed=j.passed, reason=j.reason, checks=j.checks,
        candidate=j.cand, champion=j.champ, eces=j.eces, auc_ci=j.auc_ci, logloss_ci=j.ll_ci, slices=j.slices,
        y=y, scores={"candidate": j.pc, f"champion v{parent}": j.pp}, bins=j.cfg.ece_bins)
    report_uri = f"runs:/{run_id}/{REPORT_ARTIFACT_DIR}/{report.name}"
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"holdout_{k}": v for k, v in _finite(j.cand).items()})
        mlflow.log_metrics({f"champion_holdout_{k}": v for k, v in _finite(j.champ).items()})
        mlflow.log_metrics({f"holdout_ece_{k}": v for k, v in _finite(j.eces).items()})
        if j.auc_ci is not None:
            mlflow.log_metrics({"auc_diff": j.auc_ci.estimate, "auc_diff_low": j.auc_ci.low,
                                "auc_diff_high": j.auc_ci.high})
        mlflow.log_artifacts(str(report.parent), REPORT_ARTIFACT_DIR)
        mlflow.set_tags({Tag.GATE_PASSED: str(j.passed).lower(), Tag.GATE_REASON: j.reason[:4900],
                         Tag.EVAL_REPORT: report_uri})
    result = EvalResult(day=day.isoformat(), run_id=run_id, champion_version=parent, candidate=j.cand,
                        champion=j.champ, passed=j.passed, reason=j.reason, checks=j.checks, auc_diff=j.auc_ci,
                        logloss_diff=j.ll_ci, slices=j.slices, report_uri=report_uri, report_path=str(report),
                        holdout_rows=len(holdout), holdout_days=[d.isoformat() for d in pooled])
    log.info("evaluated run %s: %s (%s); report %s", run_id, "passed" if j.passed else "FAILED", j.reason, report)
    return result
