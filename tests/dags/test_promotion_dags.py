"""The rollback and online-evaluation DAGs parse cheaply, declare their triggers, and wire one task each; the
nightly DAG waits for review in a deferrable task placed between register and promote."""

from __future__ import annotations

import json
import subprocess
import sys

from pipeline.ops.stack import REPO

PROBE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
b = DagBag(dag_folder={folder!r})
out = {{'errors': {{k: str(v) for k, v in b.import_errors.items()}},
       'heavy': sorted(m for m in ('torch', 'mlflow', 'great_expectations') if m in sys.modules)}}
for dag_id in ('flywheel_rollback', 'flywheel_online_eval', 'flywheel_online_eval_day', 'flywheel_nightly'):
    d = b.dags.get(dag_id)
    out[dag_id] = None if d is None else {{
        'tasks': [t.task_id for t in d.tasks], 'timetable': type(d.timetable).__name__,
        'params': sorted(d.params.keys()), 'max_active_runs': d.max_active_runs, 'doc': bool(d.doc_md),
        'upstream': {{t.task_id: sorted(t.upstream_task_ids) for t in d.tasks}},
        'types': {{t.task_id: type(t).__name__ for t in d.tasks}}}}
print(json.dumps(out))
"""


def _probe(tmp_path, extra_env: dict[str, str] | None = None) -> dict:
    env = {"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PATH": "/usr/bin:/bin",
           **(extra_env or {})}
    out = subprocess.run([sys.executable, "-c", PROBE.format(folder=str(REPO / "dags"))], env=env,
                         capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_rollback_and_online_eval_dags(tmp_path):
    info = _probe(tmp_path)
    assert info["errors"] == {} and info["heavy"] == []
    rb = info["flywheel_rollback"]
    assert rb["tasks"] == ["rollback"] and rb["timetable"] == "NullTimetable"  # manual trigger only
    assert rb["params"] == ["expected_champion", "reason"] and rb["doc"]
    oe = info["flywheel_online_eval"]
    assert oe["tasks"] == ["online_eval", "canary_eval"] and oe["timetable"] == "CronDataIntervalTimetable"
    assert oe["max_active_runs"] == 1 and oe["doc"]
    per_day = info["flywheel_online_eval_day"]  # follows the collected day's partition, not the clock
    assert per_day["tasks"] == oe["tasks"] and per_day["timetable"] == "PartitionedAssetTimetable"
    nightly = info["flywheel_nightly"]
    assert nightly["upstream"]["await_approval"] == ["register"]
    assert nightly["upstream"]["promote"] == ["await_approval", "register"]
    assert nightly["types"]["await_approval"] == "AwaitApprovalOperator"


def test_online_eval_schedule_can_be_turned_off(tmp_path):
    info = _probe(tmp_path, {"FLYWHEEL_ONLINE_EVAL_SCHEDULE": "none"})
    assert info["errors"] == {} and info["flywheel_online_eval"]["timetable"] == "NullTimetable"
