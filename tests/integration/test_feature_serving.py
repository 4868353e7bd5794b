"""The feature store end to end: offline tables -> materialization (incremental, idempotent, also as an Airflow
DAG run) -> online store (SQLite and the real Redis) -> the real model server filling omitted entity features,
and the prediction log carrying the values actually used."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from feature_store.entity_tables import table_name
from feature_store.log_schema import PREDICTIONS
from feature_store.spec import load_spec
from pipeline.cli import app
from pipeline.config import DEFAULT_SPEC, get_settings
from pipeline.demo.simulate import Simulator
from pipeline.errors import StageError
from pipeline.ops import stack
from pipeline.runtime import runtime
from pipeline.stages.bootstrap import bootstrap
from pipeline.stages.materialize import ingest, materialize, open_online_store
from tests.helpers import free_port, make_settings, start_server_on_champion

pytestmark = pytest.mark.integration
REDIS_URI = "redis://127.0.0.1:6379/13"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
S = timedelta(seconds=1)
CTR = load_spec(DEFAULT_SPEC)
SIM = Simulator(seed=11, rows_per_day=300, horizon_days=6)
SOURCES = {"user_segment": "UserSegment", "device": "Device"}  # the serving fixture's spec reads these


def segments(*rows: tuple[str, datetime, str]) -> pd.DataFrame:
    return pd.DataFrame({"user_id": [r[0] for r in rows], "event_time": [r[1] for r in rows],
                         "user_segment": [r[2] for r in rows]})


def _cleanup(rt) -> None:
    with open_online_store(rt) as st:
        st.clear()


@pytest.fixture(params=["sqlite", "redis"])
def rt(request, tmp_path):
    uri = None if request.param == "sqlite" else REDIS_URI
    r = runtime(make_settings(tmp_path / "home", 1, online_store_uri=uri,
                              spec_path=_spec_copy(tmp_path, f"ctr{uuid.uuid4().hex[:8]}")))
    yield r
    _cleanup(r)


def _spec_copy(tmp_path, name: str, sources: bool = False):
    """The CTR spec under a unique name: the store's namespace, so parallel runs never share Redis keys. With
    `sources`, two features are read from differently named columns (`source:`); the model is the same (the
    digest ignores where a feature is read from) and rows under spec names must still be served."""
    text = DEFAULT_SPEC.read_text().replace("name: ctr", f"name: {name}", 1)
    if sources:
        for feature, source in SOURCES.items():
            text = text.replace(f"  {feature}: {{type: categorical", f"  {feature}: {{source: {source}, "
                                "type: categorical", 1)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_materialize_is_incremental_and_idempotent(rt):
    ingest("user", segments(("u1", T0, "a"), ("u1", T0 + S, "b"), ("u2", T0 + timedelta(days=1), "c")), rt)
    first = materialize(T0, rt)
    user = next(e for e in first.entities if e.entity == "user")
    assert user.partitions_read == [T0.date()] and user.values_written == 1
    assert materialize(T0, rt).noop, "same up_to, nothing new: no partition read"
    with open_online_store(rt) as st:
        assert st.read("user", ["u1", "u2"], ["user_segment"])[0]["user_segment"].value == "a"  # not t+1s yet
        assert st.read("user", ["u2"], ["user_segment"]) == [{}]
    later = next(e for e in materialize(None, rt).entities if e.entity == "user")
    # day 1 was cut off at T0 before, day 2 is new; both are read, nothing else
    assert later.partitions_read == [T0.date(), T0.date() + timedelta(days=1)] and later.keys == 2
    assert materialize(None, rt).noop
    ingest("user", segments(("u2", T0 + timedelta(days=1, seconds=5), "d")), rt)  # rewrites day 2 only
    again = next(e for e in materialize(None, rt).entities if e.entity == "user")
    assert again.partitions_read == [T0.date() + timedelta(days=1)]
    with open_online_store(rt) as st:
        got = st.read("user", ["u1", "u2"], ["user_segment"])
        assert [g["user_segment"].value for g in got] == ["b", "d"]
        assert got[1]["user_segment"].as_of == T0 + timedelta(days=1, seconds=5)
        # an older value ingested late never replaces the newer one already online
        st.clear("user")
    assert not materialize(None, rt).noop, "a cleared store forgets its watermark and is reloaded"
    ingest("user", segments(("u2", T0 + 2 * S, "older")), rt)  # rewrites day 1, which alone is re-read
    assert next(e for e in materialize(None, rt).entities if e.entity == "user").partitions_read == [T0.date()]
    with open_online_store(rt) as st:
        assert st.read("user", ["u2"], ["user_segment"])[0]["user_segment"].value == "d"
    with pytest.raises(StageError, match="up_to: not an ISO-8601 time"):
        materialize("tomorrow", rt)
    with pytest.raises(StageError, match="column 'price' cannot be stored here"):
        ingest("user", segments(("u1", T0, "a")).assign(price=1.0), rt)


def test_materialize_dag_runs_through_dag_test(tmp_path):
    home = tmp_path / "home"
    s = make_settings(home, 1, materialize_schedule="none")
    rt = runtime(s)
    ingest("user", segments(("u1", T0, "a"), ("u1", T0 + S, "b")), rt)
    env = {"PATH": "/usr/bin:/bin", "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(stack.REPO / "dags"), **stack.settings_env(s)}
    subprocess.run([str(stack.BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True,
                   cwd=stack.REPO)
    code = ("import json, sys\n"
            "from airflow.dag_processing.dagbag import DagBag\n"
            f"bag = DagBag(dag_folder={str(stack.REPO / 'dags' / 'materialize_features.py')!r})\n"
            "assert not bag.import_errors, bag.import_errors\n"
            "heavy = sorted(m for m in ('torch', 'mlflow', 'great_expectations', 'pandas') if m in sys.modules)\n"
            "assert heavy == [], heavy\n"
            "dag = bag.get_dag('flywheel_materialize')\n"
            "run = dag.test()\n"
            "ti = run.get_task_instance('materialize')\n"
            "print(json.dumps({'state': str(run.state), 'task': str(ti.state), "
            "'timetable': type(dag.timetable).__name__}))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=stack.REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"state": "success", "task": "success", "timetable": "NullTimetable"}
    with open_online_store(rt) as st:
        assert st.read("user", ["u1"], ["user_segment"])[0]["user_segment"].value == "b"
    assert materialize(None, rt).noop, "the DAG run recorded its watermark"


@pytest.fixture(scope="module")
def champion(tmp_path_factory, mlflow_server):
    """One bootstrapped champion in the shared MLflow registry; each server below follows it."""
    home = tmp_path_factory.mktemp("fs-bootstrap")
    s = make_settings(home, mlflow_server[1], model_name=f"fs-{home.name}")
    history = home / "history.parquet"
    SIM.history(2).to_parquet(history)
    bootstrap(history, runtime(s))
    return s.model_name


@pytest.fixture(params=["sqlite", "redis"], scope="module")
def server(request, tmp_path_factory, mlflow_server, champion):
    home = tmp_path_factory.mktemp(f"fs-serving-{request.param}")
    uri = None if request.param == "sqlite" else REDIS_URI
    s = make_settings(home, mlflow_server[1], model_name=champion, serving_port=free_port(), online_store_uri=uri,
                      spec_path=_spec_copy(home, f"ctr{uuid.uuid4().hex[:8]}", sources=True))
    rt = runtime(s)
    url = start_server_on_champion(s)
    yield s, rt, url
    stack.stop_all(s)
    _cleanup(rt)


def request_rows(n: int) -> list[dict]:
    frame = SIM.day(3).head(n)
    out = frame[CTR.feature_names].to_dict(orient="records")
    for r, t in zip(out, frame.event_time, strict=True):
        r["event_time"] = t.isoformat()
    return out


def test_server_fills_omitted_entity_features_from_the_store_and_logs_them(server):
    s, rt, url = server
    base = request_rows(3)
    known, other, unknown = base[0]["user_id"], base[1]["user_id"], "user-never-seen"
    assert known != other
    ingest("user", segments((known, T0, "old-seg"), (known, T0 + S, base[0]["user_segment"]),
                            (other, T0, "stored-seg")), rt)
    assert not materialize(None, rt).noop
    omitted = {k: v for k, v in base[0].items() if k != "user_segment"}
    given = {**base[1], "user_segment": "request-seg"}  # the request's value wins over the store's
    r = httpx.post(f"{url}/predict", json={"rows": [omitted, given], "request_id": "fs-1"})
    assert r.status_code == 200, r.text
    explicit = httpx.post(f"{url}/predict", json={"rows": [base[0]]}).json()
    assert r.json()["scores"][0] == pytest.approx(explicit["scores"][0]), "filled value is what was scored"

    missing = {**{k: v for k, v in base[2].items() if k != "user_segment"}, "user_id": unknown}
    bad = httpx.post(f"{url}/predict", json={"rows": [base[0], missing]})
    assert bad.status_code == 422
    assert bad.json()["detail"] == (f"rows[1].user_segment: missing in the request and the online store has no "
                                    f"value for user_id={unknown!r}")
    inv = httpx.post(f"{url}/invocations", json={"dataframe_records": [omitted]})
    assert inv.status_code == 200 and inv.json()["predictions"][0] == pytest.approx(explicit["scores"][0])

    text = httpx.get(f"{url}/metrics").text
    assert 'flywheel_feature_lookup_keys_total{entity="user",outcome="hit"} 2.0' in text
    assert 'flywheel_feature_lookup_keys_total{entity="user",outcome="miss"} 1.0' in text
    assert "flywheel_feature_lookup_seconds_count 3.0" in text

    admin = {"Authorization": f"Bearer {s.resolved_admin_token()}"}
    assert httpx.post(f"{url}/admin/flush", headers=admin).status_code == 200
    logged = pq.read_table(sorted((s.home_abs / "lake" / PREDICTIONS).rglob("*.parquet"))).to_pandas()
    mine = logged[logged.request_id == "fs-1"].sort_values("row")
    assert list(mine.user_segment) == [base[0]["user_segment"], "request-seg"]
    assert list(mine.user_id) == [known, other]

    schema = httpx.get(f"{url}/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]
    row = schema["content"]["application/json"]["schema"]["properties"]["rows"]["items"]
    assert "user_id" in row["required"] and "price" in row["required"]
    assert "user_segment" not in row["required"] and "item_category" not in row["required"]
    assert "online store" in row["properties"]["user_segment"]["description"]


def test_server_accepts_the_spec_source_names_and_logs_spec_names(server):
    """A user who declared `source:` because live rows keep their history file's column names sends those
    names; entity files under source names feed the store the server fills from."""
    s, rt, url = server
    base = request_rows(2)
    by_source = [{SOURCES.get(k, k): v for k, v in r.items()} for r in base]
    ingest("user", pd.DataFrame({"user_id": [base[1]["user_id"]], "event_time": [T0 + timedelta(minutes=5)],
                                 "UserSegment": ["src-seg"]}), rt)  # newer than any other test's value
    materialize(None, rt)
    omitted = {k: v for k, v in by_source[1].items() if k != "UserSegment"}
    r = httpx.post(f"{url}/predict", json={"rows": [by_source[0], omitted], "request_id": "fs-src"})
    assert r.status_code == 200, r.text
    same = httpx.post(f"{url}/predict", json={"rows": [base[0], {**base[1], "user_segment": "src-seg"}]}).json()
    assert r.json()["scores"] == pytest.approx(same["scores"]), "source names score as their spec names do"
    both = httpx.post(f"{url}/predict", json={"rows": [base[0], {**by_source[1], "device": base[1]["device"]}]})
    assert both.status_code == 422
    assert both.json()["detail"] == ("rows[1].Device: feature 'device' sent twice, as 'device' and as its source "
                                     "column 'Device'; send one of the two")
    admin = {"Authorization": f"Bearer {s.resolved_admin_token()}"}
    assert httpx.post(f"{url}/admin/flush", headers=admin).status_code == 200
    logged = pq.read_table(sorted((s.home_abs / "lake" / PREDICTIONS).rglob("*.parquet"))).to_pandas()
    assert not {"Device", "UserSegment"} & set(logged.columns), "the lake is in spec names"
    mine = logged[logged.request_id == "fs-src"].sort_values("row")
    assert list(mine.device) == [base[0]["device"], base[1]["device"]]
    assert list(mine.user_segment) == [base[0]["user_segment"], "src-seg"]
    row = httpx.get(f"{url}/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["properties"]["rows"]["items"]
    assert {"Device", "device", "UserSegment", "user_segment"} <= set(row["properties"])
    assert {"oneOf": [{"required": ["device"]}, {"required": ["Device"]}]} in row["allOf"]


def test_lake_table_layout(rt):
    ingest("user", segments(("u9", T0, "x")), rt)
    assert (rt.settings.home_abs / "lake" / table_name("user") / f"dt={T0.date()}" / "_manifest.json").exists()


def test_cli_ingest_and_materialize(tmp_path, monkeypatch):
    home = tmp_path / "home"
    # the CLI sets FLYWHEEL_HOME in os.environ; owning the variable here restores it afterwards
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    monkeypatch.setenv("FLYWHEEL_ONLINE_STORE_URI", "sqlite:///cli-online.db")
    path = tmp_path / "users.parquet"
    segments(("u1", T0, "a"), ("u2", T0 + S, "b")).to_parquet(path)
    try:
        runner = CliRunner()
        first = runner.invoke(app, ["--home", str(home), "features", "ingest", "user", str(path)])
        assert first.exit_code == 0, first.output
        assert json.loads(first.stdout)["partitions_written"] == 1
        done = runner.invoke(app, ["--home", str(home), "materialize", "--up-to", "2026-03-02T00:00:00Z"])
        assert done.exit_code == 0 and json.loads(done.stdout)["noop"] is False
        assert (home / "cli-online.db").exists()
        assert json.loads(runner.invoke(app, ["--home", str(home), "materialize", "--up-to",
                                              "2026-03-02T00:00:00Z"]).stdout)["noop"] is True
        bad = runner.invoke(app, ["--home", str(home), "features", "ingest", "shop", str(path)])
        assert bad.exit_code == 2 and "unknown entity 'shop'" in bad.output
    finally:
        get_settings.cache_clear()
