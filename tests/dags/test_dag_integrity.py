"""DAG files parse cheaply and declare what the loop relies on (Airflow best practice: a DagBag test)."""

from __future__ import annotations

import subprocess
import sys
import time

from pipeline.ops.stack import REPO


def _dagbag_probe(extra_env: dict[str, str], tmp_path, dag_id: str = "flywheel_nightly") -> str:
    code = (
        "import json, time; t=time.monotonic()\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"b = DagBag(dag_folder={str(REPO / 'dags')!r})\n"
        f"d = b.dags.get({dag_id!r})\n"
        "import sys\n"
        "print(json.dumps({'errors': {k: str(v) for k, v in b.import_errors.items()},"
        " 'heavy': sorted(m for m in ('torch', 'mlflow', 'great_expectations', 'pandas') if m in sys.modules),"
        " 'tags': sorted(d.tags) if d else None, 'tasks': [t.task_id for t in d.tasks] if d else None,"
        " 'retries': sorted({t.retries for t in d.tasks}) if d else None,"
        " 'max_active_runs': d.max_active_runs if d else None, 'timetable': type(d.timetable).__name__ if d else None,"
        " 'doc': bool(d.doc_md) if d else None,"
        " 'undocumented': sorted(t.task_id for t in d.tasks if not t.doc_md) if d else None,"
        " 'teardowns': sorted(t.task_id for t in d.tasks if t.is_teardown) if d else None}))\n"
    )
    env = {"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PATH": "/usr/bin:/bin",
           **extra_env}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=REPO)
    return out.stdout.strip().splitlines()[-1]


def test_nightly_dag_imports_cleanly_without_heavy_modules(tmp_path):
    import json

    start = time.monotonic()
    info = json.loads(_dagbag_probe({}, tmp_path))
    assert info["errors"] == {}
    assert info["heavy"] == [], "DAG parsing must not import torch/mlflow/great-expectations/pandas"
    assert info["tasks"] == ["wait_for_labels", "collect", "validate", "train", "evaluate", "register",
                             "await_approval", "promote", "rollout", "loop_health", "note"]
    assert info["teardowns"] == ["loop_health", "note"], "a finished night's state is its stages' state"
    assert set(info["undocumented"]) <= {"wait_for_labels", "await_approval"}
    assert info["tags"] == ["flywheel", "training"] and info["retries"] == [2]
    assert info["max_active_runs"] == 1 and info["doc"]
    assert info["timetable"] == "CronDataIntervalTimetable"
    assert time.monotonic() - start < 60


def test_materialize_dag_declares_one_task_and_follows_its_schedule_setting(tmp_path):
    import json

    info = json.loads(_dagbag_probe({}, tmp_path, "flywheel_materialize"))
    assert info["errors"] == {} and info["heavy"] == []
    assert info["tasks"] == ["materialize"] and info["tags"] == ["features", "flywheel"]
    assert info["retries"] == [2] and info["max_active_runs"] == 1 and info["doc"]
    assert info["timetable"] == "CronDataIntervalTimetable"
    off = json.loads(_dagbag_probe({"FLYWHEEL_MATERIALIZE_SCHEDULE": "none"}, tmp_path, "flywheel_materialize"))
    assert off["timetable"] == "NullTimetable"


def test_schedule_can_be_turned_off_by_config(tmp_path):
    import json

    info = json.loads(_dagbag_probe({"FLYWHEEL_SCHEDULE": "none"}, tmp_path))
    assert info["errors"] == {} and info["timetable"] == "NullTimetable"


def test_a_broken_feature_spec_is_an_import_error_naming_the_file(tmp_path):
    import json

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    info = json.loads(_dagbag_probe({"FLYWHEEL_SPEC_PATH": str(bad)}, tmp_path))
    assert any(str(bad) in e for e in info["errors"].values())


def test_every_dag_runs_for_a_historical_logical_date(tmp_path):
    """A run triggered or backfilled for a logical date before a DAG's start date gets no task instances, and
    Airflow marks it a success having run nothing: a backtest's 1994 online evaluation did exactly that under
    the old 2024 start date. Every Flywheel DAG must accept the dates of a user's history."""
    import json

    code = (
        "import json\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"b = DagBag(dag_folder={str(REPO / 'dags')!r})\n"
        "print(json.dumps({i: d.start_date.isoformat() for i, d in b.dags.items()}))\n"
    )
    env = {"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO)
    starts = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"flywheel_nightly", "flywheel_online_eval", "flywheel_online_eval_day", "flywheel_rollback",
            "flywheel_materialize"} <= set(starts)
    assert all(start <= "1970-01-02T00:00:00+00:00" for start in starts.values()), starts
