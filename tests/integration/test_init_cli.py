"""`flywheel init` on a real public dataset, through the CLI: the draft loads, and bootstraps as is against the
real MLflow server. The dataset is river's bundled phishing websites table (1,250 labelled pages, shipped in
the installed package: no download); an event time is added (the file has none) and its label column is
renamed to `label`, the reserved name users most often bring."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest

from feature_store.spec import load_spec
from pipeline.config import REPO

pytestmark = pytest.mark.integration


def _phishing(tmp_path) -> Path:
    river = Path(importlib.util.find_spec("river").origin).parent
    frame = pd.read_csv(river / "datasets" / "phishing.csv.gz").rename(columns={"is_phishing": "label"})
    frame["seen_at"] = pd.date_range("2026-01-01", periods=len(frame), freq="6min", tz="UTC")
    path = tmp_path / "phishing.parquet"
    frame.to_parquet(path, index=False)
    return path


def test_init_drafts_a_spec_that_loads_and_bootstraps_as_is(tmp_path, mlflow_server):
    url, _ = mlflow_server
    history, out = _phishing(tmp_path), tmp_path / "spec.yaml"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLYWHEEL_MLFLOW_TRACKING_URI": url,
           "FLYWHEEL_MODEL_NAME": f"phishing-{uuid.uuid4().hex[:8]}"}
    flywheel = [str(Path(sys.executable).parent / "flywheel"), "--home", str(tmp_path / "home")]

    init = subprocess.run([*flywheel, "init", "--history", str(history), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert init.returncode == 0, init.stderr
    assert "guess: event time: 'seen_at', the first timestamp column" in init.stderr
    assert "guess: label: 'label', its name reads like an outcome" in init.stderr
    assert "calls it 'label_value' and reads it from 'label'" in init.stderr and f"wrote {out}" in init.stderr
    spec = load_spec(out)
    assert spec.name == "spec", "the draft is named after the file it is written to, not 'history'"
    assert spec.label.name == "label_value" and spec.label.source == "label" and len(spec.numeric) == 9

    boot = subprocess.run([*flywheel, "--spec", str(out), "bootstrap", "--history", str(history)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert boot.returncode == 0, boot.stderr[-3000:]
    result = json.loads(boot.stdout)
    assert result["version"] == "1" and result["rows"] == 1250 and result["rejected"] == 0
    assert result["holdout"]["auc"] > 0.8 and "is champion" in boot.stderr
    again = subprocess.run([*flywheel, "init", "--history", str(history), "--out", str(out)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "exists: pass --force" in again.stderr


def test_backtest_takes_the_spec_before_or_after_the_command_and_names_it_when_missing(tmp_path):
    """`init` prints `flywheel --spec S bootstrap ...`; the same order must work for backtest."""
    flywheel = [str(Path(sys.executable).parent / "flywheel"), "--home", str(tmp_path / "home")]
    data = ["--history", str(tmp_path / "h.parquet"), "--stream", str(tmp_path / "s.parquet")]
    for name in ("h.parquet", "s.parquet"):
        (tmp_path / name).write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400"}  # rich boxes would wrap the paths
    missing = subprocess.run([*flywheel, "backtest", *data], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and "backtest needs the stream's feature spec" in missing.stdout + missing.stderr
    for argv in ([*flywheel, "--spec", str(tmp_path / "mine.yaml"), "backtest", *data],
                 [*flywheel, "backtest", "--spec", str(tmp_path / "mine.yaml"), *data]):
        run = subprocess.run(argv, capture_output=True, text=True, env=env)
        assert run.returncode == 2 and "mine.yaml" in run.stdout + run.stderr, run.stdout + run.stderr
        assert "Traceback" not in run.stdout + run.stderr
    gone = subprocess.run([*flywheel, "backtest", "--spec", str(tmp_path / "h.parquet"), "--history",
                           str(tmp_path / "nowhere.parquet"), "--stream", str(tmp_path / "s.parquet")],
                          capture_output=True, text=True, env=env)
    assert gone.returncode == 2 and "nowhere.parquet" in gone.stderr and "Traceback" not in gone.stderr


def test_a_bad_setting_is_one_line_naming_it_and_its_variable(tmp_path):
    """A setting's value from the environment that the config refuses ends any command with one line and exit 2,
    like a bad spec; not a traceback of the settings model."""
    flywheel = [str(Path(sys.executable).parent / "flywheel"), "--home", str(tmp_path / "home"), "history"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400", "FLYWHEEL_CALIBRATION_PRIOR_ROWS": "-1"}
    run = subprocess.run(flywheel, capture_output=True, text=True, env=env)
    out = run.stdout + run.stderr
    assert run.returncode == 2 and "Traceback" not in out, out
    assert "training.calibration_prior_rows='-1' (FLYWHEEL_TRAINING__CALIBRATION_PRIOR_ROWS)" in out, out
    assert "greater than or equal to 0" in out and len(out.strip().splitlines()) == 1, out
