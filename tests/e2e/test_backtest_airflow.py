"""`flywheel backtest --airflow`: every night is a run of the nightly DAG through the scratch home's own Airflow
scheduler, and the loop it measures is the one the in-process nightly measures: the same served versions, gate
outcomes and AUCs, period by period."""

from __future__ import annotations

from datetime import date, timedelta

import pandas as pd
import pytest

from tests.helpers import loans_frame
from tests.integration.test_backtest import _backtest, expected_online_eval

pytestmark = pytest.mark.slow


def test_backtest_through_airflow_measures_the_same_loop(tmp_path):
    start = date(2026, 3, 1)
    frame = lambda days: pd.concat([loans_frame(start + timedelta(days=d), 300, 3) for d in days])  # noqa: E731
    frame(range(3)).to_parquet(tmp_path / "history.parquet", index=False)
    frame(range(3, 5)).to_parquet(tmp_path / "stream.parquet", index=False)
    (tmp_path / "local").mkdir()
    for name in ("history.parquet", "stream.parquet"):
        (tmp_path / "local" / name).write_bytes((tmp_path / name).read_bytes())

    summary = _backtest(tmp_path, "--airflow")
    assert summary["periods"] == 2 and "through the scheduler" in summary["period_note"]
    dag = pd.read_csv(tmp_path / "report" / "backtest.csv")
    assert list(dag["dag_run"]) == ["backtest__2026-03-04", "backtest__2026-03-05"]
    assert dag["trained"].all() and list(dag["online_eval"]) == expected_online_eval(dag)
    _backtest(tmp_path / "local")
    local = pd.read_csv(tmp_path / "local" / "report" / "backtest.csv")
    assert local["dag_run"].isna().all()
    for column in ("served_version", "gate", "candidate", "champion_after", "online_eval"):
        assert list(dag[column]) == list(local[column]), column
    for column in ("loop_auc", "frozen_auc", "hgb_all_auc"):
        assert dag[column].tolist() == pytest.approx(local[column].tolist(), abs=1e-9), column
