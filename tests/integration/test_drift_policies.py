"""Drift-reactive challengers: a night whose champion collapses on the new day (the label rule flipped) trains
the warm start, shrink-and-perturb and a fresh model on the recent window, the gate's rules pick the best on the
holdout, and the run and the version say which policy won; an ordinary night trains exactly one warm start."""

from __future__ import annotations

from datetime import date, timedelta

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from feature_store.offline import Lake
from pipeline import registry
from pipeline.checks.drift import DRIFT
from pipeline.learn.policies import DriftSignal
from pipeline.runtime import runtime
from pipeline.stages.bootstrap import bootstrap
from pipeline.stages.evaluate import evaluate
from pipeline.stages.register import register_candidate
from pipeline.stages.train import severe_drift, train
from pipeline.stages.validate import VALIDATED
from pipeline.tags import Tag
from tests.helpers import LOANS_SPEC, loans_frame
from tests.integration.test_streaming_train import validated

pytestmark = pytest.mark.integration
DAY = date(2026, 5, 10)


def stream_day(day: date, n: int, seed: int, flipped: bool = False) -> pd.DataFrame:
    """Loans whose default risk rises with the income ratio, or, after the concept drift, falls with it (same
    inputs, same base rate: only the rule changed, so no input distribution moves)."""
    frame = loans_frame(day, n, seed)
    rng = np.random.default_rng([seed, day.toordinal(), 99])
    region = frame["region"].str[1:].astype(int).to_numpy()
    ratio = frame["income_ratio"].to_numpy()
    sign = -1.0 if flipped else 1.0
    logit = -1.0 + 0.4 * (region - 2) + sign * 12 * (ratio - 0.3) + 0.3 * (np.log(frame["amount"]) - 8)
    return frame.assign(defaulted=(rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(int))


def put_day(rt, day: date, frame: pd.DataFrame) -> None:
    rt.lake.write_partition(VALIDATED, day, pa.Table.from_pandas(validated(frame), preserve_index=False))


def test_drift_night_trains_challengers_and_the_gate_picks_one(settings_factory, tmp_path):
    # A replay share of 1 makes the warm start's inertia plain: half of what it learns from is the old concept.
    # No refit: this is about the drift challengers alone (tests/integration/test_refit.py has the refit).
    s = settings_factory(spec_path=LOANS_SPEC, epochs=3, batch_size=64, drift_window_days=1, replay_ratio=1.0,
                         bootstrap_samples=100, refit_max_rows=0)
    history = pd.concat([stream_day(DAY - timedelta(days=d), 1000, seed=1) for d in (3, 2, 1)])
    history.to_parquet(tmp_path / "history.parquet")
    rt = runtime(s)
    boot = bootstrap(tmp_path / "history.parquet", rt)
    client = rt.client()
    first = registry.load_version(client, rt.model_name, boot.version, rt.cache_dir)
    assert not first.calibration.identity and first.calibration.rows > 0  # the first model is calibrated too

    put_day(rt, DAY, stream_day(DAY, 3000, seed=5))
    calm = train(DAY, rt)
    assert calm.candidates == ["warm"] and calm.policy == "warm" and calm.drift_trigger == []
    run = client.get_run(calm.run_id)
    assert run.data.tags[Tag.POLICY] == "warm" and run.data.tags[Tag.DRIFT_TRIGGER] == "none"
    assert run.data.params["candidates"] == "warm"
    assert not [k for k in run.data.metrics if k.startswith("policy_")]
    assert "champion_val_auc" in run.data.metrics  # judged, and judged fine

    drift_day = DAY + timedelta(days=1)
    put_day(rt, drift_day, stream_day(drift_day, 3000, seed=6, flipped=True))
    out = train(drift_day, rt)
    assert out.candidates == ["warm", "shrink", "fresh"] and out.drift_trigger
    assert "champion AUC" in out.drift_trigger[0]
    assert out.policy in ("shrink", "fresh")
    run = client.get_run(out.run_id)
    assert run.data.tags[Tag.POLICY] == out.policy and "champion AUC" in run.data.tags[Tag.DRIFT_TRIGGER]
    m = run.data.metrics
    assert m[f"policy_{out.policy}_holdout_primary"] > m["policy_warm_holdout_primary"]
    assert m[f"policy_{out.policy}_passed"] == 1.0
    policies = mlflow.artifacts.load_dict(f"runs:/{out.run_id}/policies.json")
    assert policies["winner"] == out.policy and len(policies["candidates"]) == 3
    won = next(c for c in policies["candidates"] if c["policy"] == out.policy)
    assert won["auc_vs_base"]["low"] > 0  # it had to beat the warm start confidently, not by a point estimate

    ev = evaluate(drift_day, out.run_id, rt)  # the logged model is the winner: the gate agrees with the choice
    assert ev.passed and ev.candidate["auc"] == pytest.approx(m[f"policy_{out.policy}_holdout_primary"])
    version = register_candidate(drift_day, ev, rt).version
    assert client.get_model_version(rt.model_name, version).tags[Tag.POLICY] == out.policy
    again = train(drift_day, rt)  # idempotent: the same run, the same policy, nothing retrained
    assert again.reused and again.run_id == out.run_id and again.policy == out.policy
    assert again.candidates == out.candidates


def test_severe_drift_report_is_a_drift_night(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    assert severe_drift(lake, DAY) == []
    lake.write_partition(DRIFT, DAY, pa.Table.from_pylist([
        {"name": "amount", "kind": "numeric", "psi": 0.8, "severity": "severe", "reference": None, "current": None},
        {"name": "region", "kind": "categorical", "psi": 0.12, "severity": "moderate", "reference": None,
         "current": None}]))
    severe = severe_drift(lake, DAY)
    assert severe == ["amount (PSI 0.80)"]
    assert DriftSignal(severe).triggered and not DriftSignal([]).triggered
    small_drop = DriftSignal([], champion_auc=0.70, reference_auc=0.72, auc_drop_threshold=0.05)
    big_drop = DriftSignal([], champion_auc=0.55, reference_auc=0.72, auc_drop_threshold=0.05)
    assert not small_drop.triggered and big_drop.triggered
    assert not DriftSignal([], champion_auc=0.55, reference_auc=0.72, auc_drop_threshold=0).triggered
