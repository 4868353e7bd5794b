"""Evaluate: candidate and its parent champion scored on the same held-out, time-later slice of the day, which
the candidate never trained on. The gate: finite scores, an absolute AUC floor, and no more than the allowed
regression against the champion."""

from __future__ import annotations

import logging
from datetime import date

import numpy as np
from pydantic import BaseModel

from pipeline import registry
from pipeline.metrics import scores_valid, summary
from pipeline.runtime import Runtime, StageError, parse_day, runtime, split_by_time
from pipeline.validate import VALIDATED

log = logging.getLogger("flywheel.evaluate")


class EvalResult(BaseModel):
    day: str
    run_id: str
    champion_version: str
    candidate: dict[str, float | None]
    champion: dict[str, float | None]
    passed: bool
    reason: str


def gate(cand: dict, champ: dict, cand_valid: bool, min_auc: float, max_regression: float) -> tuple[bool, str]:
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


def evaluate(day: str | date, run_id: str, rt: Runtime | None = None) -> EvalResult:
    import mlflow

    rt = rt or runtime()
    day = parse_day(day)
    s, spec = rt.settings, rt.spec
    client = rt.client()
    run = client.get_run(run_id)
    parent = run.data.tags.get(registry.TAG_PARENT)
    if parent is None:
        raise StageError(f"run {run_id} has no {registry.TAG_PARENT} tag: not a Flywheel training run")
    frame = rt.lake.read_partition(VALIDATED, day).to_pandas()
    _, holdout = split_by_time(frame, spec.event_time, s.holdout_fraction)
    if len(holdout) == 0:
        raise StageError(f"day {day} has an empty holdout slice; raise holdout_fraction or min_rows")
    y = holdout[spec.label.name].to_numpy(dtype=np.float64)
    candidate = registry.load_run_bundle(run_id, rt.cache_dir)
    champion = registry.load_version(client, rt.model_name, parent, rt.cache_dir)
    pc, pp = candidate.predict(holdout), champion.predict(holdout)
    cand, champ = summary(y, pc), summary(y, pp)
    passed, reason = gate(cand, champ, scores_valid(pc), s.min_auc, s.max_auc_regression)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"holdout_{k}": v for k, v in cand.items() if v is not None and np.isfinite(v)})
        mlflow.log_metrics({f"champion_holdout_{k}": v for k, v in champ.items() if v is not None and np.isfinite(v)})
        mlflow.set_tags({"flywheel.gate_passed": str(passed).lower(), "flywheel.gate_reason": reason})
    result = EvalResult(day=day.isoformat(), run_id=run_id, champion_version=parent, candidate=cand,
                        champion=champ, passed=passed, reason=reason)
    log.info("evaluated %s", result.model_dump_json())
    return result
