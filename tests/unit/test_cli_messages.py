"""What the CLI says it did: true for the options it was given, and a failing service named in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import REPO
from pipeline.ops import stack
from pipeline.runtime import runtime
from pipeline.stages.nightly import roll_out_if_served
from pipeline.stages.promote import PromoteResult
from tests.helpers import LOANS_SPEC, free_port, make_settings


def test_describe_names_only_what_started_the_model_and_a_true_stop_command(tmp_path):
    s = make_settings(tmp_path / "home", free_port(), spec_path=LOANS_SPEC)
    text = stack.describe(s, airflow=False, server=True)
    assert "Airflow" not in text and "password" not in text and "<spec>" not in text
    assert "Models -> flywheel-loans" in text and f"flywheel --home {s.home_abs} down" in text
    assert "make down" not in text and "Model server" in text
    assert "Model server" not in stack.describe(s, airflow=True, server=False)


def test_nightly_rollout_without_a_server_is_skipped_with_the_reason(tmp_path):
    rt = runtime(make_settings(tmp_path / "home", free_port(), spec_path=LOANS_SPEC, serving_port=free_port()))
    won = PromoteResult(version="3", promoted=True, previous="2", reason="passed the gate")
    out = roll_out_if_served(won, rt)
    assert "no model server answers at" in out["skipped"] and "champion v3 is in the registry" in out["skipped"]
    lost = PromoteResult(version="3", promoted=False, previous=None, reason="auc regressed")
    assert "no promotion (auc regressed)" in roll_out_if_served(lost, rt)["skipped"]


def test_cli_commands_needing_mlflow_fail_in_seconds_naming_the_fix(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLYWHEEL_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    flywheel = str(Path(sys.executable).parent / "flywheel")
    home = tmp_path / "home"
    for args in (["nightly", "--day", "2026-03-10"], ["promote", "--version", "1"]):
        start = time.monotonic()
        out = subprocess.run([flywheel, "--home", str(home), "--spec", str(LOANS_SPEC), *args],
                             capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and f"`{args[0]}` needs MLflow" in lines[0], out.stderr
        assert f"flywheel --home {home.resolve()} up" in lines[0]
        assert time.monotonic() - start < 60  # the import of the CLI included; no minutes of client retries
