"""Review mode in a real Airflow run (`dag.test()`, which runs triggers in line): the approval task defers,
frees its worker slot, and resumes when a reviewer tags the version in the real MLflow registry."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.demo.simulate import Simulator
from pipeline.ops.stack import REPO
from pipeline.runtime import runtime
from pipeline.stages.bootstrap import bootstrap

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # an Airflow DB migration + dag.test(): ~1 min

DAG_FILE = '''
import pendulum
from airflow.sdk import dag

from pipeline.orchestration.review_trigger import AwaitApprovalOperator


@dag(dag_id="review_probe", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"))
def review_probe():
    AwaitApprovalOperator(task_id="await_approval", registered={"version": "1"})


review_probe_dag = review_probe()
'''

RUN = '''
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
from review_probe import review_probe_dag
from pipeline import registry
from pipeline.release.review import decide
from pipeline.runtime import runtime
from pipeline.tags import Tag

def approve():  # a reviewer who reacts a few seconds after the review was requested
    rt = runtime()
    while Tag.REVIEW_REQUESTED_AT not in registry.get_version(rt.client(), rt.model_name, "1").tags:
        time.sleep(0.2)
    time.sleep(3)
    decide("1", "approved", "dana", "ship it")

threading.Thread(target=approve, daemon=True).start()
start = time.monotonic()
run = review_probe_dag.test()
ti = run.get_task_instance("await_approval")
print(json.dumps({"state": str(run.state), "seconds": time.monotonic() - start,
                  "tries": ti.try_number, "next_method": ti.next_method}))
'''


def _airflow_in_review_mode(settings_factory, tmp_path, **extra_env: str) -> tuple:
    """A bootstrapped champion in review mode and a migrated Airflow home whose DAG folder holds the probe DAG."""
    s = settings_factory(promotion_mode="review", approval_poll_interval_s=0.5, min_rows=50)
    rt = runtime(s)
    Simulator(seed=1, rows_per_day=200).history(2).to_parquet(tmp_path / "h.parquet")
    assert bootstrap(tmp_path / "h.parquet", rt).version == "1"
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "review_probe.py").write_text(DAG_FILE)
    env = {"PATH": "/usr/bin:/bin", "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "FLYWHEEL_HOME": str(s.home),
           "FLYWHEEL_MLFLOW_TRACKING_URI": s.mlflow_tracking_uri, "FLYWHEEL_MODEL_NAME": rt.model_name,
           "FLYWHEEL_PROMOTION_MODE": "review", "FLYWHEEL_APPROVAL_POLL_INTERVAL_S": "0.5",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **extra_env}
    subprocess.run([str(REPO / ".venv" / "bin" / "airflow"), "db", "migrate"], env=env, check=True,
                   capture_output=True, cwd=REPO)
    return rt, dags, env


def test_approval_task_defers_and_resumes_on_the_reviewers_tag(settings_factory, tmp_path):
    rt, dags, env = _airflow_in_review_mode(settings_factory, tmp_path)
    out = subprocess.run([sys.executable, "-c", RUN, str(dags)], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "running trigger in line" in out.stdout  # waited in a trigger, not in a worker
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["state"] == "success" and result["seconds"] >= 3 and result["tries"] == 1
    tags = rt.client().get_model_version(rt.model_name, "1").tags
    assert tags["flywheel.approval"] == "approved" and tags["flywheel.approver"] == "dana"
    assert tags["flywheel.approval_observed_at"] >= tags["flywheel.approval_at"] >= tags["flywheel.review_requested_at"]


RUN_AGAIN = '''
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
from review_probe import review_probe_dag
from pipeline import registry
from pipeline.runtime import runtime
from pipeline.tags import Tag

rt = runtime()
first = review_probe_dag.test()  # nobody reviews: the trigger times out and the task fails
timed_out = Tag.REVIEW_TIMED_OUT_AT in registry.get_version(rt.client(), rt.model_name, "1").tags

def approve_in_the_ui():  # only the tag, as a reviewer editing it in the MLflow UI would
    while Tag.REVIEW_TIMED_OUT_AT in registry.get_version(rt.client(), rt.model_name, "1").tags:
        time.sleep(0.2)
    time.sleep(1)
    rt.client().set_model_version_tag(rt.model_name, "1", Tag.APPROVAL, "approved")

threading.Thread(target=approve_in_the_ui, daemon=True).start()
second = review_probe_dag.test()  # the task runs again, as after clearing it: a fresh wait, not an instant timeout
tags = registry.get_version(rt.client(), rt.model_name, "1").tags
print(json.dumps({"first": str(first.state), "timed_out": timed_out, "second": str(second.state),
                  "approval_at": tags.get(Tag.APPROVAL_AT)}))
'''


def test_a_timed_out_review_waits_again_when_the_task_runs_again(settings_factory, tmp_path):
    rt, dags, env = _airflow_in_review_mode(settings_factory, tmp_path, FLYWHEEL_APPROVAL_TIMEOUT_S="4")
    out = subprocess.run([sys.executable, "-c", RUN_AGAIN, str(dags)], env=env, capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["first"] == "failed" and result["timed_out"], result
    assert result["second"] == "success" and result["approval_at"] not in (None, "None"), result
