"""`up`, `down`, `up` on one home through the real CLI: restarting a stack whose Airflow already has the GPU
pool must resize it, not fail (Airflow 3 validates a pool PATCH as a whole pool)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import REPO
from pipeline.ops import stack
from pipeline.ops.airflow_client import AirflowClient
from tests.helpers import free_port, make_settings

pytestmark = pytest.mark.slow


def test_up_down_up_on_one_home_keeps_and_resizes_the_gpu_pool(tmp_path):
    home, mlflow_port, airflow_port = tmp_path / "home", free_port(), free_port()
    s = make_settings(home, mlflow_port, airflow_port=airflow_port, airflow_url=f"http://127.0.0.1:{airflow_port}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLYWHEEL_MLFLOW_PORT": str(mlflow_port),
           "FLYWHEEL_MLFLOW_TRACKING_URI": s.mlflow_tracking_uri, "FLYWHEEL_AIRFLOW_PORT": str(airflow_port),
           "FLYWHEEL_AIRFLOW_URL": s.airflow_url, "FLYWHEEL_SCHEDULE": "none"}
    flywheel = [str(Path(sys.executable).parent / "flywheel"), "--home", str(home)]

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess:
        out = subprocess.run([*flywheel, *args], env={**env, **extra}, capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    try:
        first = cli("up", "--no-server")
        assert f"flywheel --home {home.resolve()} down" in first.stderr and "Model server" not in first.stderr
        assert "stopped: " in cli("down").stderr
        cli("up", "--no-server", FLYWHEEL_GPU_POOL_SLOTS="3")
        af = AirflowClient(s.airflow_url, s.airflow_user, stack.airflow_password(s))
        pool = af.request("GET", f"/api/v2/pools/{s.cluster.gpu_pool}").json()
        assert pool["slots"] == 3 and pool["include_deferred"] is False
    finally:
        stack.stop_all(s)
