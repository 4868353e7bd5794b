"""Airflow on the CeleryExecutor, as `stack.start_airflow` runs it in the production profile: PostgreSQL
metadata and Celery results (this test's own database, dropped afterwards), the machine's real Redis as the
broker (this test's own DB number, flushed afterwards), and a Celery worker started and stopped by the stack."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from pipeline.ops import stack
from pipeline.ops.airflow_client import AirflowClient
from tests.e2e.test_nightly_airflow import postgres_databases
from tests.helpers import free_port, make_settings

pytestmark = pytest.mark.slow
REDIS_DB = 14
DAG = "flywheel_celery_probe"
PROBE_DAG = '''
import os
import pendulum
from airflow.sdk import dag, task


@dag(dag_id="DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
     tags=["probe"])
def probe():
    @task(pool="POOL")
    def where_am_i() -> dict:
        """The command lines of this task's process ancestry: a Celery worker is among them."""
        chain, pid = [], os.getpid()
        while pid > 1:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                chain.append(f.read().replace(b"\\0", b" ").decode())
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        return {"ancestry": chain}

    where_am_i()


probe()
'''


@pytest.fixture(scope="module")
def celery_stack(tmp_path_factory):
    import redis

    home = tmp_path_factory.mktemp("celery")
    dags = home / "dags"
    dags.mkdir()
    (dags / "probe.py").write_text(PROBE_DAG.replace("DAG_ID", DAG).replace("POOL", "gpu-probe"))
    broker = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    assert broker.dbsize() == 0, f"redis DB {REDIS_DB} is not empty: pick another for this test"
    suffix = uuid.uuid4().hex[:8]
    with postgres_databases(f"flywheel_celery_{suffix}") as (db,):
        airflow_port = free_port()
        s = make_settings(home, free_port(), airflow_port=airflow_port, airflow_url=f"http://127.0.0.1:{airflow_port}",
                          airflow_db_uri=db, airflow_executor="CeleryExecutor", airflow_celery_concurrency=1,
                          airflow_broker_url=f"redis://127.0.0.1:6379/{REDIS_DB}",
                          airflow_result_backend="db+" + db, airflow_dags_folder=dags, gpu_pool="gpu-probe")
        try:
            start = time.monotonic()
            stack.start_airflow(s)
            af = AirflowClient(s.airflow_url, s.airflow_user, stack.airflow_password(s))
            af.wait_for_dag(DAG, timeout=180)
            startup_s = time.monotonic() - start
            yield s, af, startup_s
        finally:
            stopped = stack.stop_all(s)
            broker.flushdb()
            broker.close()
        assert "airflow-celery-worker" in stopped


def test_a_task_runs_to_success_through_the_scheduler_and_the_celery_worker(celery_stack):
    from datetime import date

    s, af, startup_s = celery_stack
    assert (s.run_dir / "airflow-celery-worker.pid").exists()
    pool = af.request("GET", "/api/v2/pools/gpu-probe").json()
    assert pool["slots"] == s.cluster.gpu_pool_slots
    af.unpause(DAG)
    start = time.monotonic()
    run_id = af.trigger(DAG, date(2026, 3, 1))
    assert af.wait_run(DAG, run_id, timeout=300) == "success", af.task_states(DAG, run_id)
    run_s = time.monotonic() - start
    ti = af.request("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/where_am_i").json()
    ancestry = af.xcom(DAG, run_id, "where_am_i")["ancestry"]
    assert any("celery" in c and "worker" in c for c in ancestry), ancestry
    assert not any("scheduler" in c for c in ancestry), "ran in the scheduler's LocalExecutor, not Celery"
    print(json.dumps({"celery_startup_s": round(startup_s, 1), "trigger_to_success_s": round(run_s, 1),
                      "task_duration_s": ti.get("duration"), "pool": ti.get("pool"), "queue": ti.get("queue")}))
    assert ti["pool"] == "gpu-probe"
