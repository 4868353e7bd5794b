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


def _backtest(tmp_path: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "FLYWHEEL_MIN_ROWS": "50",
           "FLYWHEEL_BOOTSTRAP_MIN_STEPS": "10", "FLYWHEEL_EPOCHS": "1", "FLYWHEEL_BOOTSTRAP_SAMPLES": "50"}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "backtest", "--spec", str(LOANS_SPEC),
                          "--history", str(tmp_path / "history.parquet"), "--stream", str(tmp_path / "stream.parquet"),
                          "--label-delay", "1h", "--home", str(tmp_path / "home"), "--out", str(tmp_path / "report"),
                          *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    assert (tmp_path / "report" / "backtest.html").read_text().count("data:image/png;base64,") == 1
    for m in MODELS:
        assert second[m]["mean_auc"] is not None
