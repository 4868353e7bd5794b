"""MLflow with basic auth, as `stack.start_mlflow` starts it when `mlflow_auth` is on: anonymous requests are
refused, the configured user gets in, and the password shows up in neither the logs nor a command line."""

from __future__ import annotations

import secrets

import httpx
import pytest

from pipeline.ops import stack
from tests.helpers import free_port, make_settings

SEARCH = "/api/2.0/mlflow/experiments/search"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlflow-auth")
    password = secrets.token_urlsafe(18)
    s = make_settings(home, free_port(), mlflow_auth=True, mlflow_username="flywheel-admin", mlflow_password=password)
    try:
        stack.start_mlflow(s)
        yield s, password
    finally:
        stack.stop_all(s)


def test_anonymous_and_wrong_password_are_rejected_and_the_user_is_accepted(auth_server):
    s, password = auth_server
    url = f"http://127.0.0.1:{s.mlflow_port}"
    assert httpx.get(url + SEARCH, params={"max_results": 1}).status_code == 401
    assert httpx.get(url + SEARCH, params={"max_results": 1}, auth=("flywheel-admin", "nope")).status_code == 401
    r = httpx.post(url + "/api/2.0/mlflow/experiments/create", json={"name": "auth-probe"},
                   auth=("flywheel-admin", password))
    assert r.status_code == 200, r.text
    found = httpx.get(url + SEARCH, params={"max_results": 10}, auth=("flywheel-admin", password)).json()
    assert "auth-probe" in {e["name"] for e in found["experiments"]}


def test_clients_started_by_the_stack_get_the_credentials(auth_server):
    s, password = auth_server
    env = stack.full_env(s)
    assert env["MLFLOW_TRACKING_USERNAME"] == "flywheel-admin" and env["MLFLOW_TRACKING_PASSWORD"] == password
    r = httpx.get(f"{s.mlflow_tracking_uri}{SEARCH}", params={"max_results": 1},
                  auth=(env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]))
    assert r.status_code == 200


def test_password_never_reaches_logs_command_lines_or_the_auth_config(auth_server):
    s, password = auth_server
    logs = list(s.run_dir.glob("*.log"))
    assert logs and any(f.stat().st_size for f in logs)
    for f in logs:
        assert password not in f.read_text(errors="replace"), f"password leaked into {f}"
    pid = int((s.run_dir / "mlflow.pid").read_text())
    assert (s.home_abs / "mlflow.db").exists(), "the backend URI reached the server through its environment"
    assert "basic-auth" in open(f"/proc/{pid}/cmdline").read()
    assert password not in open(f"/proc/{pid}/cmdline").read()
    ini = s.home_abs / "mlflow-auth" / "basic_auth.ini"
    assert password not in ini.read_text() and "auth_cache_ttl_seconds = 60" in ini.read_text()


def test_production_profile_refuses_auth_without_a_configured_password(tmp_path):
    s = make_settings(tmp_path, free_port(), mlflow_auth=True,
                      mlflow_backend_uri="postgresql+psycopg://postgres@127.0.0.1:5432/never_created")
    with pytest.raises(ValueError, match="FLYWHEEL_MLFLOW_PASSWORD is not set"):
        stack.start_mlflow(s)
    assert not (s.run_dir / "mlflow.pid").exists()
    local = make_settings(tmp_path / "local", free_port(), mlflow_auth=True)
    generated = stack.mlflow_password(local)
    assert len(generated) >= 24 and stack.mlflow_password(local) == generated
