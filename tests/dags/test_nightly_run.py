"""The real nightly DAG file run by Airflow (`dag.test()`) for one logical date, against the real MLflow server:
every stage task takes its day from the run (no upstream XCom carries it), and the stages pass on only the
results they declare (run id, evaluation, version)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta

import pandas as pd
import pytest

from pipeline.ops.stack import REPO, airflow_env, settings_env
from pipeline.runtime import runtime
from pipeline.stages.bootstrap import bootstrap
from pipeline.stages.sequence import STAGE_NAMES
from pipeline.tags import Tag
from tests.helpers import LOANS_SPEC, loans_frame
from tests.integration.test_pipeline_stages import DAY, log_day

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # an Airflow DB migration + one training night: ~1 min

RUN = '''
import json, sys
import pendulum
from airflow.dag_processing.dagbag import DagBag

dag = DagBag(dag_folder=sys.argv[1]).dags["flywheel_nightly"]
run = dag.test(logical_date=pendulum.parse(sys.argv[2]))
tis = {ti.task_id: ti for ti in run.get_task_instances()}
print(json.dumps({"state": str(run.state), "states": {k: str(ti.state) for k, ti in tis.items()},
                  "collect": tis["collect"].xcom_pull(task_ids="collect"),
                  "register": tis["register"].xcom_pull(task_ids="register"),
                  "health": tis["loop_health"].xcom_pull(task_ids="loop_health")}))
'''


def run_night(s, tmp_path, day_rows: int) -> tuple[object, subprocess.CompletedProcess, dict]:
    """Bootstrap on three days, log DAY's `day_rows` rows, and run the nightly DAG for DAY with `dag.test()`."""
    rt = runtime(s)
    pd.concat([loans_frame(DAY - timedelta(days=d), 300, seed=1) for d in (3, 2, 1)]).to_parquet(
        tmp_path / "h.parquet")
    assert bootstrap(tmp_path / "h.parquet", rt).version == "1"
    log_day(rt, loans_frame(DAY, day_rows, seed=2))
    env = {"PATH": "/usr/bin:/bin", **settings_env(s), **airflow_env(s), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    subprocess.run([str(REPO / ".venv" / "bin" / "airflow"), "db", "migrate"], env=env, check=True,
                   capture_output=True, cwd=REPO)
    out = subprocess.run([sys.executable, "-c", RUN, str(REPO / "dags"), f"{DAY.isoformat()}T00:00:00+00:00"],
                         env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return rt, out, json.loads(out.stdout.strip().splitlines()[-1])


def test_each_stage_task_reads_the_day_from_the_run(settings_factory, tmp_path):
    s = settings_factory(spec_path=LOANS_SPEC, epochs=3, batch_size=64, max_auc_regression=0.5)
    rt, out, result = run_night(s, tmp_path, 400)
    states = result["states"]
    failures = [line for line in out.stderr.splitlines() if "Error" in line or "error" in line][-20:]
    assert [states[n] for n in STAGE_NAMES if n != "rollout"] == ["success"] * 6, (states, failures)
    assert states["await_approval"] == "success" and states["loop_health"] == "success", states
    # no model server runs here: a promoted champion's rollout fails, an unpromoted one is skipped
    assert states["rollout"] in ("failed", "skipped"), states
    assert result["collect"]["day"] == DAY.isoformat() and result["health"]["status"] in ("ok", "warn")
    version = result["register"]["version"]
    tags = rt.client().get_model_version(rt.model_name, version).tags
    assert version == "2" and tags[Tag.DAY] == DAY.isoformat()


def test_a_small_day_skips_training_and_the_run_succeeds(settings_factory, tmp_path):
    """A day of fewer labeled rows than `min_rows` is validated, then the night has nothing to train: `train`
    and everything after it are skipped (not failed, nor retried), and the run succeeds with its note saying
    why. Before, the row-count rule failed the night, and every such night after it."""
    rt, out, result = run_night(settings_factory(spec_path=LOANS_SPEC, epochs=2, batch_size=64, min_rows=100),
                                tmp_path, 40)
    states = result["states"]
    assert states["collect"] == states["validate"] == "success", states
    assert all(states[n] == "skipped" for n in ("train", "evaluate", "register", "await_approval", "promote",
                                                 "rollout")), states
    assert result["state"].endswith("success") and states["loop_health"] == "success", states
    assert result["health"]["nights_without_training"] == 1
    assert "fewer than validation.min_rows=100" in out.stderr + out.stdout
    assert 0 < rt.lake.read_manifest("validated", DAY)["rows"] < 100  # kept, validated, waiting to be pooled
    assert [v.version for v in rt.client().search_model_versions(f"name = '{rt.model_name}'")] == ["1"]
