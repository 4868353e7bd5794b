"""`flywheel nightly` as an unattended job sees it: the exit status says whether the loop is stuck, and stdout
still carries the night's JSON (real CLI script, real MLflow server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import LOOP_HEALTH_FAILED
from pipeline.config import LEGACY, REPO, env_name
from pipeline.ops.stack import settings_env
from pipeline.runtime import runtime
from pipeline.stages.bootstrap import bootstrap
from tests.helpers import LOANS_SPEC, loans_frame
from tests.integration.test_pipeline_stages import DAY, log_day

pytestmark = pytest.mark.integration


def _nightly(env: dict[str, str], **knobs: str) -> subprocess.CompletedProcess:
    flywheel = str(Path(sys.executable).parent / "flywheel")
    return subprocess.run([flywheel, "nightly", "--day", DAY.isoformat()], capture_output=True, text=True,
                          env={**env, **{env_name(*LEGACY[k]): v for k, v in knobs.items()}}, timeout=600)


def test_nightly_exits_3_when_loop_health_fails_and_0_when_it_only_warns(settings_factory, tmp_path):
    # review mode and nobody approves: the night trains and registers, the champion stays the bootstrap one
    # (trained on the day before D), so D is one night without a promotion
    s = settings_factory(spec_path=LOANS_SPEC, epochs=3, batch_size=64, promotion_mode="review")
    rt = runtime(s)
    pd.concat([loans_frame(DAY - timedelta(days=d), 300, seed=1) for d in (3, 2, 1)]).to_parquet(
        tmp_path / "h.parquet")
    assert bootstrap(tmp_path / "h.parquet", rt).version == "1"
    log_day(rt, loans_frame(DAY, 400, seed=2))
    env = {**os.environ, **settings_env(s), "PYTHONPATH": str(REPO)}

    warned = _nightly(env, loop_health_warn_nights="1", loop_health_fail_nights="5")
    assert warned.returncode == 0, warned.stderr[-3000:]
    out = json.loads(warned.stdout)
    assert out["promote"]["promoted"] is False and out["loop_health"]["status"] == "warn"
    assert "loop health warn" in warned.stderr and "1 night without a promotion" in warned.stderr

    failed = _nightly(env, loop_health_warn_nights="1", loop_health_fail_nights="1")
    assert failed.returncode == LOOP_HEALTH_FAILED == 3, failed.stderr[-3000:]
    out = json.loads(failed.stdout)  # the night's result is still printed, whole
    assert out["register"]["version"] == "2" and out["loop_health"]["status"] == "fail"
    assert f"loop health failed on {DAY} (exit 3)" in failed.stderr
