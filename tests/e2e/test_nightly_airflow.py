"""The whole loop through a real Airflow scheduler, MLflow server and model server, on a tiny day."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from datetime import timedelta

import httpx
import pandas as pd
import pytest
import yaml

from pipeline import registry
from pipeline.config import DEFAULT_SPEC
from pipeline.demo.simulate import Simulator
from pipeline.demo.traffic import send_day
from pipeline.ops import stack
from pipeline.ops.airflow_client import AirflowClient
from pipeline.runtime import runtime
from pipeline.stages.bootstrap import bootstrap
from pipeline.stages.collect import flush_server
from pipeline.stages.materialize import ingest, materialize, open_online_store
from pipeline.tags import Alias, Tag
from tests.helpers import free_port, make_settings

pytestmark = pytest.mark.slow
DAG = "flywheel_nightly"
PER_DAY_EVAL = "flywheel_online_eval_day"
SIM = Simulator(seed=11, rows_per_day=600, horizon_days=10)
BAD_ROWS = 7
REDIS_URI = "redis://127.0.0.1:6379/12"
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


@contextlib.contextmanager
def postgres_databases(*names: str):
    """Databases of this test's own on the machine's PostgreSQL, dropped afterwards; never touches others."""
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        for name in names:
            conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield [f"postgresql+psycopg://postgres@127.0.0.1:5432/{n}" for n in names]
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            for name in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def loop(request, tmp_path_factory):
    """The whole stack, on embedded defaults (SQLite) and on the production profile (PostgreSQL metadata for
    Airflow and MLflow)."""
    home = tmp_path_factory.mktemp(f"e2e-{request.param}")
    port = free_port()
    airflow_port = free_port()
    with contextlib.ExitStack() as stack_:
        backends = {}
        if request.param == "postgres":
            suffix = uuid.uuid4().hex[:8]
            af_db, ml_db = stack_.enter_context(postgres_databases(f"flywheel_af_{suffix}", f"flywheel_ml_{suffix}"))
            backends = {"airflow_db_uri": af_db, "mlflow_backend_uri": ml_db, "online_store_uri": REDIS_URI,
                        "mlflow_auth": True, "mlflow_password": uuid.uuid4().hex,
                        "spec_path": _spec_copy(home, f"ctr_{suffix}")}  # own Redis namespace
        # The day is tiny and nearly signal-free (holdout AUC about 0.58): what is under test is the DAG's path
        # through promote and rollout, so neither a noise-level AUC nor a noise-level log-loss verdict may hold it.
        s = make_settings(home, port, serving_port=free_port(), airflow_port=airflow_port,
                          airflow_url=f"http://127.0.0.1:{airflow_port}", schedule="none", max_auc_regression=1.0,
                          gate_on_inconclusive="pass", **backends)
        stack_.enter_context(_client_env(s))
        yield from _stack(s, home)


def _spec_copy(home, name: str):
    """The demo spec under another name: its Redis keys (flywheel:<spec name>:...) are this test's own."""
    data = yaml.safe_load(DEFAULT_SPEC.read_text())
    data["name"] = name
    path = home / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@contextlib.contextmanager
def _client_env(s):
    """This test process is an MLflow client too: with basic auth on it needs the credentials every process the
    stack starts gets."""
    extra = stack.mlflow_client_env(s)
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stack(s, home):
    try:
        stack.start_mlflow(s)
        rt = runtime(s)
        history = home / "history.parquet"
        SIM.history(3).to_parquet(history)
        bootstrap(history, rt)
        stack.start_server(s)
        stack.start_airflow(s)
        af = AirflowClient(s.airflow_url, s.airflow_user, stack.airflow_password(s))
        for dag_id in (DAG, PER_DAY_EVAL):
            af.wait_for_dag(dag_id, timeout=180)
            af.unpause(dag_id)
        yield s, rt, af
    finally:
        stack.stop_all(s)
        with open_online_store(runtime(s)) as store:
            store.clear()


def _send(s, rt, index: int) -> int:
    url = s.resolved_serving_url()
    day = SIM.day(index)
    bad = day.head(BAD_ROWS).copy()
    bad["price"] = -1.0  # passes the request schema (a number) but violates the spec's range: quarantined
    sent = send_day(url, day, rt.spec.feature_names)
    sent_bad = send_day(url, bad, rt.spec.feature_names)
    assert sent.errors == 0 and sent_bad.errors == 0
    flush_server(url, s.resolved_admin_token())
    return sent.rows + sent_bad.rows


def test_nightly_dag_run_collects_quarantines_trains_promotes_and_rolls_out(loop):
    s, rt, af = loop
    day = SIM.day_date(3)
    rows = _send(s, rt, 3)

    run_id = af.trigger(DAG, day)
    assert af.wait_run(DAG, run_id, timeout=600) == "success", af.task_states(DAG, run_id)
    states = af.task_states(DAG, run_id)
    assert set(states.values()) == {"success"}, states

    training = rt.lake.read_manifest("training", day)
    assert training["rows"] == rows and training["inputs"]["prediction_segments"]
    quarantine = rt.lake.read_partition("quarantine", day).to_pandas()
    assert len(quarantine) == BAD_ROWS and (quarantine.price < 0).all()
    assert quarantine.reason.str.contains("price").all()
    assert rt.lake.read_manifest("validated", day)["rows"] == rows - BAD_ROWS

    client = rt.client()
    champion = registry.get_alias(client, rt.model_name, Alias.CHAMPION)
    assert champion.version == "2"
    assert champion.tags[Tag.PARENT] == "1" and champion.tags[Tag.DAY] == day.isoformat()
    assert Tag.RUN in champion.tags and "flywheel.metrics" in champion.tags
    assert registry.get_alias(client, rt.model_name, Alias.PREVIOUS).version == "1"
    assert registry.get_alias(client, rt.model_name, Alias.CHALLENGER) is None  # cleared once it is champion

    health = httpx.get(f"{s.resolved_serving_url()}/health").json()
    assert health["model_version"] == "2"
    assert af.xcom(DAG, run_id, "rollout")["served_version"] == "2"
    note = af.request("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}").json()["note"]
    assert note.startswith("v2 promoted: AUC ") and "serving v2" in note, note
    events = af.request("GET", "/api/v2/assets/events").json()["asset_events"]
    partitions = {e["name"]: e.get("partition_key") for e in events
                  if e["source_dag_id"] == DAG and e["source_run_id"] == run_id}
    assert partitions == {name: day.isoformat() for name in
                          ("flywheel_training_day", "flywheel_validated_day", "flywheel_candidate")}, partitions

    # The collected day's partition starts the per-day online evaluation of that very day.
    eval_run = af.partition_run(PER_DAY_EVAL, day.isoformat())
    assert af.wait_run(PER_DAY_EVAL, eval_run, timeout=300) == "success", af.task_states(PER_DAY_EVAL, eval_run)
    judged = af.xcom(PER_DAY_EVAL, eval_run, "online_eval")
    assert judged["day"] == day.isoformat() and judged["days"][-1] == day.isoformat(), judged

    # Re-running the day through Airflow (clear + rerun) changes nothing: same rows, same version.
    r = af.request("POST", f"/api/v2/dags/{DAG}/clearTaskInstances",
                   json={"dag_run_id": run_id, "dry_run": False, "only_failed": False, "reset_dag_runs": True})
    assert r.status_code == 200, r.text
    time.sleep(2)
    assert af.wait_run(DAG, run_id, timeout=600) == "success", af.task_states(DAG, run_id)
    versions = client.search_model_versions(f"name = '{rt.model_name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert rt.lake.read_manifest("training", day)["rows"] == rows


def test_a_day_without_logs_fails_with_a_clear_message_and_trains_nothing(loop):
    s, rt, af = loop
    day = SIM.day_date(3) + timedelta(days=30)
    run_id = af.trigger(DAG, day)
    assert af.wait_run(DAG, run_id, timeout=300) == "failed"
    states = af.task_states(DAG, run_id)
    assert states["collect"] == "failed" and states["train"] in ("upstream_failed", None)
    log = af.request("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/collect/logs/1",
                     params={"full_content": True}, headers={"Accept": "application/x-ndjson"}).text
    assert f"no prediction log for {day}" in log
    note = af.request("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}").json()["note"]
    assert note.startswith("collect stopped the night: no prediction log"), note


def test_schema_upgrade_is_a_no_op_the_second_time(loop):
    s, _, _ = loop
    assert stack.db_upgrade(s) == {"airflow": "ok", "mlflow": "ok"}
    assert stack.db_upgrade(s) == {"airflow": "ok", "mlflow": "ok"}


def test_secrets_never_reach_logs_task_logs_or_mlflow_params(loop):
    s, rt, af = loop
    secrets = {
        "admin token": s.resolved_admin_token(),
        "airflow password": stack.airflow_password(s),
        "jwt secret": (s.home_abs / "secrets" / "airflow_jwt_secret").read_text().strip(),
    }
    if s.mlflow_auth:
        secrets["mlflow password"] = s.mlflow_password
    files = [*s.run_dir.glob("*.log"), *(s.home_abs / "airflow" / "logs").rglob("*")]
    assert any(f.is_file() and f.stat().st_size for f in files), "there are logs to inspect"
    for f in files:
        if f.is_file():
            text = f.read_text(errors="replace")
            for what, value in secrets.items():
                assert value not in text, f"{what} leaked into {f}"
    client = rt.client()
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        blob = str(run.data.params) + str(run.data.tags)
        for what, value in secrets.items():
            assert value not in blob, f"{what} leaked into MLflow run {run.info.run_id}"


def test_the_profiles_online_store_fills_entity_features_at_serving(loop):
    """Embedded profile: SQLite under the home; production profile: the machine's Redis."""
    s, rt, _ = loop
    with open_online_store(rt) as store:
        assert type(store).__name__ == ("RedisStore" if s.online_store_uri else "SQLiteStore")
    row = SIM.day(9).head(1)[rt.spec.feature_names].to_dict(orient="records")[0]
    ingest("user", pd.DataFrame({"user_id": [row["user_id"]], "event_time": [pd.Timestamp("2026-01-01", tz="UTC")],
                                 "user_segment": ["e2e-segment"]}), rt)
    assert not materialize(None, rt).noop
    url = s.resolved_serving_url()
    omitted = {k: v for k, v in row.items() if k != "user_segment"}
    filled = httpx.post(f"{url}/predict", json={"rows": [omitted]})
    explicit = httpx.post(f"{url}/predict", json={"rows": [{**row, "user_segment": "e2e-segment"}]})
    assert filled.status_code == 200 and explicit.status_code == 200, filled.text
    assert filled.json()["scores"] == pytest.approx(explicit.json()["scores"])
