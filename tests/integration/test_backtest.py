"""`flywheel backtest` through the CLI on a tiny stream: a real MLflow, a real model server, the nightly stages.
One row per period with finite AUC for the loop and every reference, and an interrupted backtest resumes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import LOANS_SPEC, loans_frame

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("loop", "frozen", "scratch", "hgb_all", "hgb_last")


def _backtest(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "FLYWHEEL_MIN_ROWS": "50",
           "FLYWHEEL_BOOTSTRAP_MIN_STEPS": "10", "FLYWHEEL_EPOCHS": "1", "FLYWHEEL_BOOTSTRAP_SAMPLES": "50",
           **(env or {})}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "backtest", "--spec", str(LOANS_SPEC),
                          "--history", str(tmp_path / "history.parquet"), "--stream", str(tmp_path / "stream.parquet"),
                          "--label-delay", "1h", "--home", str(tmp_path / "home"), "--out", str(tmp_path / "report"),
                          *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def expected_online_eval(rows: pd.DataFrame) -> list[str]:
    """What each period's online evaluation must say on a stream too small to judge: `no_baseline` while the
    champion is still bootstrap's model (no `previous`: every night so far was held), `wait` after a promotion."""
    promoted = (rows["gate"] == "promoted").cumsum().shift(fill_value=0)
    return ["wait" if p else "no_baseline" for p in promoted]


@pytest.mark.slow
def test_backtest_reports_every_period_and_resumes(tmp_path):
    start = date(2026, 3, 1)
    frame = lambda days: pd.concat([loans_frame(start + timedelta(days=d), 300, 3) for d in days])  # noqa: E731
    frame(range(3)).to_parquet(tmp_path / "history.parquet", index=False)
    frame(range(3, 6)).to_parquet(tmp_path / "stream.parquet", index=False)

    first = _backtest(tmp_path, "--max-periods", "2")
    assert first["periods"] == 2
    periods = tmp_path / "home" / "backtest" / "periods"
    done = {p.name: p.stat().st_mtime_ns for p in periods.iterdir()}
    assert sorted(done) == ["p00000.json", "p00001.json"]

    second = _backtest(tmp_path)  # resumes: the two finished periods are read back, not replayed
    assert {p.name: p.stat().st_mtime_ns for p in periods.iterdir() if p.name in done} == done
    assert second["periods"] == 3

    rows = pd.read_csv(tmp_path / "report" / "backtest.csv")
    assert list(rows["period"]) == [0, 1, 2]
    assert list(rows["logical_date"]) == ["2026-03-04", "2026-03-05", "2026-03-06"]
    for m in MODELS:
        assert rows[f"{m}_auc"].map(math.isfinite).all(), m
    assert rows["served_version"].iloc[0] == 1  # test-then-train: the first period is served by bootstrap's model
    assert rows["trained"].all() and (rows["nightly_s"] > 0).all()
    # the online evaluation ran before each night: no `previous` until a night promoted, then too few labels
    assert list(rows["online_eval"]) == expected_online_eval(rows)
    assert second["rollbacks"] == 0
    # every night trained: loop health said so (no waiting), and the report counts its verdicts
    assert set(rows["loop_health"]) <= {"ok", "warn"} and rows["waiting_rows"].isna().all()
    assert sum(second["loop_health"].values()) == 3 and second["nights_waiting_for_rows"] == 0
    assert (tmp_path / "report" / "backtest.html").read_text().count("data:image/png;base64,") == 1
    for m in MODELS:
        assert second[m]["mean_auc"] is not None


@pytest.mark.slow
def test_a_champion_that_does_worse_live_is_rolled_back_during_the_backtest(tmp_path):
    """As in production, the online evaluation judges each period's champion on the rows it served, before
    the night. One period's labels follow another rule (a one-off: the label was set by product, not risk):
    the model trained on it wins that period's holdout and is promoted, then does worse than `previous` on the
    next period's usual labels and is rolled back; that night warm-starts from the restored version."""
    start = date(2026, 3, 1)
    days = lambda ds: pd.concat([loans_frame(start + timedelta(days=d), 700, 4) for d in ds])  # noqa: E731
    days(range(3)).to_parquet(tmp_path / "history.parquet", index=False)
    odd = days([3])
    odd["defaulted"] = (odd["product"] == "card").astype(int)
    pd.concat([odd, days([4, 5])]).to_parquet(tmp_path / "stream.parquet", index=False)
    env = {"FLYWHEEL_BOOTSTRAP_MIN_STEPS": "300", "FLYWHEEL_EPOCHS": "10", "FLYWHEEL_LEARNING_RATE": "0.01",
           "FLYWHEEL_REPLAY__RATIO": "0", "FLYWHEEL_ONLINE_EVAL__MIN_ROWS": "300",
           "FLYWHEEL_ONLINE_EVAL__MIN_POSITIVES": "20"}
    summary = _backtest(tmp_path, env=env)
    rows = pd.read_csv(tmp_path / "report" / "backtest.csv")
    assert rows["gate"].iloc[0] == "promoted" and rows["served_version"].iloc[1] == 2, rows["gate_reason"].tolist()
    assert list(rows["online_eval"])[:2] == ["no_baseline", "rolled_back"], rows["online_eval_reason"].tolist()
    assert rows["rolled_back"].iloc[1] == 2 and "worse than v1" in rows["online_eval_reason"].iloc[1]
    assert rows["served_version"].iloc[2] != 2 and rows["online_eval"].iloc[2] != "rolled_back"
    assert summary["rollbacks"] == 1
