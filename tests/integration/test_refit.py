"""The refit: while every labeled row so far is small, a night also trains the first model's recipe on all of
them (the replay reservoir, which has never dropped a row, and tonight's training rows, never tonight's
holdout); once the reservoir samples, or the rows pass `refit_max_rows`, a night trains the warm start alone."""

from __future__ import annotations

from datetime import date, timedelta

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline import registry
from pipeline.runtime import runtime
from pipeline.stages.bootstrap import bootstrap
from pipeline.stages.evaluate import evaluate
from pipeline.stages.register import register_candidate
from pipeline.stages.train import train
from tests.helpers import LOANS_SPEC, loans_frame
from tests.integration.test_drift_policies import put_day

pytestmark = pytest.mark.integration
DAY = date(2026, 6, 1)
HISTORY_ROWS = 900


def start(rt, tmp_path) -> pd.DataFrame:
    history = pd.concat([loans_frame(DAY - timedelta(days=d), HISTORY_ROWS // 3, seed=d) for d in (3, 2, 1)])
    history.to_parquet(tmp_path / "history.parquet")
    bootstrap(tmp_path / "history.parquet", rt)
    return history


def test_a_small_stream_refits_on_every_row_so_far(settings_factory, tmp_path):
    rt = runtime(settings_factory(spec_path=LOANS_SPEC, epochs=2, batch_size=64, bootstrap_samples=100))
    history = start(rt, tmp_path)
    put_day(rt, DAY, loans_frame(DAY, 400, seed=9))
    out = train(DAY, rt)
    assert out.candidates == ["warm", "refit"]
    run = rt.client().get_run(out.run_id)
    assert int(run.data.params["refit_rows"]) == HISTORY_ROWS + out.train_rows  # the holdout is not among them
    policies = mlflow.artifacts.load_dict(f"runs:/{out.run_id}/policies.json")
    refit = next(c for c in policies["candidates"] if c["policy"] == "refit")
    first = pd.to_datetime(history["applied_at"]).min().date()
    assert refit["window"] == f"{first}/{DAY}" and "passed" in refit
    assert refit["calibration"]["rows"] > 0  # calibrated on the time-latest slice of all its rows
    warm = next(c for c in policies["candidates"] if c["policy"] == "warm")
    assert out.policy == "refit" and refit["passed"]  # the warm start was not confidently better
    assert ("auc_vs_base" in warm) == warm["passed"]  # a warm start that passed had to prove it was better
    assert run.data.tags["flywheel.policy"] == "refit"

    ev = evaluate(DAY, out.run_id, rt)  # the logged model is the chosen one, judged like any candidate
    chosen = next(c for c in policies["candidates"] if c["policy"] == out.policy)
    assert ev.candidate["auc"] == pytest.approx(chosen["holdout"]["auc"])
    assert ev.passed, ev.reason
    version = register_candidate(DAY, ev, rt).version
    assert rt.client().get_model_version(rt.model_name, version).tags["flywheel.policy"] == "refit"
    again = train(DAY, rt)  # idempotent: found, not trained again
    assert again.reused and again.run_id == out.run_id and again.candidates == out.candidates


def test_the_refit_learns_the_whole_past_where_the_warm_start_cannot(settings_factory, tmp_path):
    """The case the refit exists for: a history of one concept and a night of a few hundred rows of another. A
    warm start takes a few steps on them (and replays the old concept); a refit on everything learns what the
    data as a whole says."""
    rt = runtime(settings_factory(spec_path=LOANS_SPEC, epochs=1, batch_size=256, bootstrap_samples=100,
                                  replay_ratio=1.0))
    start(rt, tmp_path)
    from tests.integration.test_drift_policies import stream_day

    day = DAY
    put_day(rt, day, pd.concat([stream_day(day - timedelta(days=k), 1200, seed=20 + k, flipped=True)
                                for k in range(1)]))
    out = train(day, rt)
    policies = mlflow.artifacts.load_dict(f"runs:/{out.run_id}/policies.json")
    by = {c["policy"]: c for c in policies["candidates"]}
    assert set(by) == {"warm", "refit"}
    assert by["refit"]["holdout"]["auc"] > by["warm"]["holdout"]["auc"] + 0.1  # 0.70 against 0.34 when written
    assert out.policy == "refit"


@pytest.mark.parametrize("override", [{"replay_rows": 600}, {"refit_max_rows": 1000}],
                         ids=["the reservoir has dropped rows", "past refit_max_rows"])
def test_no_refit_once_the_past_is_sampled_or_large(settings_factory, tmp_path, override):
    rt = runtime(settings_factory(spec_path=LOANS_SPEC, epochs=2, batch_size=64, bootstrap_samples=100, **override))
    start(rt, tmp_path)
    put_day(rt, DAY, loans_frame(DAY, 400, seed=9))
    out = train(DAY, rt)
    assert out.candidates == ["warm"] and out.policy == "warm"
    assert "refit_rows" not in rt.client().get_run(out.run_id).data.params
    assert registry.get_alias(rt.client(), rt.model_name, "champion").version == "1"
    assert np.isfinite(out.final_loss)
