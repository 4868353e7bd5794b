"""Bad history files a user brings to `bootstrap`, against the real MLflow server: refused with the reason,
or trained on without the bad rows, which stay in quarantine_bootstrap/ with theirs."""

from __future__ import annotations

import math
import time
from datetime import date, timedelta

import pandas as pd
import pytest

from pipeline import registry
from pipeline.errors import ServiceUnavailable, StageError
from pipeline.runtime import runtime
from pipeline.stages.bootstrap import QUARANTINE_BOOTSTRAP, bootstrap
from pipeline.tags import Alias
from tests.helpers import LOANS_SPEC, free_port, loans_frame, make_settings

pytestmark = pytest.mark.integration
DAY = date(2026, 3, 10)


def _history(tmp_path, frame: pd.DataFrame):
    path = tmp_path / "history.parquet"
    frame.to_parquet(path)
    return path


def _frame(days=(3, 2, 1), n=300) -> pd.DataFrame:
    return pd.concat([loans_frame(DAY - timedelta(days=d), n, seed=1) for d in days], ignore_index=True)


@pytest.fixture
def rt(settings_factory):
    return runtime(settings_factory(spec_path=LOANS_SPEC, batch_size=64, bootstrap_min_steps=20))


def test_bootstrap_quarantines_inf_and_out_of_range_rows_and_counts_duplicates(rt, tmp_path):
    frame = _frame()
    frame.loc[0, "amount"] = math.inf
    frame.loc[1, "income_ratio"] = -math.inf
    frame.loc[2, "amount"] = -3.0  # spec: min 0
    frame.loc[3, "tenure_months"] = 601.0  # spec: max 600
    frame = pd.concat([frame, frame.iloc[100:110]], ignore_index=True)  # ten rows appended twice
    out = bootstrap(_history(tmp_path, frame), rt)
    assert out.rejected == 4 and out.rows == len(frame) - 4 and out.duplicates == 10
    assert out.holdout["auc"] is not None and out.quarantine == f"{QUARANTINE_BOOTSTRAP}/dt={DAY - timedelta(days=1)}"
    q = rt.lake.read_partition(QUARANTINE_BOOTSTRAP, DAY - timedelta(days=1)).to_pandas()
    assert sorted(q.reason) == ["amount below min 0", "amount is infinite", "income_ratio is infinite",
                                "tenure_months above max 600"]


def test_one_class_history_is_refused_and_registers_nothing(rt, tmp_path):
    frame = _frame().assign(defaulted=0)
    with pytest.raises(StageError, match=r"only label defaulted=0: there is no signal to learn from"):
        bootstrap(_history(tmp_path, frame), rt)
    assert registry.get_alias(rt.client(), rt.model_name, Alias.CHAMPION) is None


def test_history_whose_rows_all_fail_says_why_per_column_and_keeps_them(rt, tmp_path):
    frame = _frame(days=(1,), n=120).assign(amount=-1.0)
    frame.loc[:9, "defaulted"] = 7
    with pytest.raises(StageError) as e:
        bootstrap(_history(tmp_path, frame), rt)
    msg = str(e.value)
    assert "0 usable rows (120 rejected)" in msg and "amount below min 0: 120 rows" in msg
    assert "label not 0/1: 10 rows" in msg and f"{QUARANTINE_BOOTSTRAP}/dt={DAY - timedelta(days=1)}" in msg
    assert rt.lake.read_partition(QUARANTINE_BOOTSTRAP, DAY - timedelta(days=1)).num_rows == 120


def test_bootstrap_without_mlflow_fails_in_seconds_naming_the_fix(tmp_path):
    r = runtime(make_settings(tmp_path / "home", free_port(), spec_path=LOANS_SPEC))
    start = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=r"`bootstrap` needs MLflow.*flywheel --home .* up --no-airflow"):
        bootstrap(_history(tmp_path, _frame()), r)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("refit", [True, False])
def test_the_champion_learns_from_the_holdout_its_metrics_were_measured_on(settings_factory, tmp_path, refit):
    """The holdout is the history's newest fifth. It measures the first model, then (refit on, the default) the
    champion trains on it too: a region that only the newest rows bring gets its own embedding row."""
    r = runtime(settings_factory(spec_path=LOANS_SPEC, batch_size=64, bootstrap_min_steps=20,
                                 bootstrap_refit=refit))
    frame = _frame().sort_values("applied_at", ignore_index=True)
    frame.loc[frame.index[-40:], "region"] = "r-only-lately"  # inside the holdout (the newest 180 of 900 rows)
    out = bootstrap(_history(tmp_path, frame), r)
    champion = registry.load_version(r.client(), r.model_name, out.version, r.cache_dir)
    assert ("r-only-lately" in champion.vocabs["region"].ids) is refit
    assert out.holdout["rows"] == 180 and 0.5 < out.holdout["auc"] < 1  # measured before the refit, on unseen rows
    run = r.client().get_run(registry.get_version(r.client(), r.model_name, out.version).run_id)
    assert run.data.params["refit_on_whole_history"] == str(refit)
