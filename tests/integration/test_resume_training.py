"""A training process killed mid-epoch (SIGKILL, as a preempted node) resumes from its last checkpoint and ends
with the same weights as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import LOANS_SPEC, loans_frame

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def command(data: Path, out: Path, ckpt: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.learn.ddp_train", "--data", str(data), "--out", str(out), "--spec",
            str(LOANS_SPEC), "--epochs", "3", "--batch-size", "32", "--lr", "0.01", "--seed", "11",
            "--checkpoint-dir", str(ckpt), "--checkpoint-every", "25", "--device", "cpu"]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    day = date(2026, 3, 1)
    frame = pd.concat([loans_frame(day + timedelta(days=i), 1000, seed=3) for i in range(3)], ignore_index=True)
    data = tmp_path / "data.parquet"
    frame.to_parquet(data)

    subprocess.run(command(data, tmp_path / "straight", tmp_path / "ck-straight"), check=True, env=env(),
                   cwd=ROOT, timeout=120)
    straight = json.loads((tmp_path / "straight" / "result.json").read_text())

    ckpt = tmp_path / "ck-killed" / "checkpoint.pt"
    proc = subprocess.Popen(command(data, tmp_path / "killed", ckpt.parent), env=env(), cwd=ROOT)
    deadline = time.monotonic() + 90
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "training finished before it could be killed"
    assert ckpt.exists() and not (tmp_path / "killed" / "result.json").exists()

    subprocess.run(command(data, tmp_path / "killed", ckpt.parent), check=True, env=env(), cwd=ROOT, timeout=120)
    resumed = json.loads((tmp_path / "killed" / "result.json").read_text())
    assert 0 < resumed["resumed_at_step"] < straight["steps"]
    assert resumed["steps"] == straight["steps"]
    assert resumed["losses"] == straight["losses"]
    assert resumed["weights_digest"] == straight["weights_digest"]
    assert not ckpt.exists()  # a finished run leaves no checkpoint to resume by mistake
