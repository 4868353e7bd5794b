"""Starts and stops the stack: MLflow, Airflow (separate api-server/scheduler/dag-processor/triggerer, plus a
Celery worker under the CeleryExecutor) and the model server, on embedded defaults (SQLite, local artifacts,
LocalExecutor) or on the production profile (PostgreSQL, Celery on Redis, S3 lake and artifacts, MLflow basic auth).

Each process gets a pid file and a log file under `<home>/run`, and the same FLYWHEEL_* environment, so
Airflow's task processes run the pipeline with exactly the settings the CLI used. Secrets reach processes only
through their environment or 0600 files, never their command lines (which `ps` and logs show).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from pipeline.config import REPO, Settings
from pipeline.poll import wait_until

BIN = Path(sys.executable).parent


def settings_env(s: Settings) -> dict[str, str]:
    """`s` as FLYWHEEL_* variables (canonical nested names; a legacy flat name inherited from this process is
    overwritten with the same value), so every child runs with exactly these settings."""
    env = s.to_env()
    env["FLYWHEEL_SERVING__URL"] = s.resolved_serving_url()
    env.update({k: env["FLYWHEEL_SERVING__URL"] for k in os.environ if k.upper() == "FLYWHEEL_SERVING_URL"})
    return env


def airflow_password(s: Settings) -> str:
    return s.airflow_password or s.secret("airflow_admin_password", 12)


def airflow_env(s: Settings) -> dict[str, str]:
    home = s.home_abs / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    pw_file = home / "simple_auth_manager_passwords.json"
    pw_file.write_text(json.dumps({s.airflow_user: airflow_password(s)}))
    pw_file.chmod(0o600)
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str((s.airflow.dags_folder or REPO / "dags").resolve()),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": s.airflow.executor,
        "AIRFLOW__CORE__PARALLELISM": str(s.airflow.parallelism),
        **airflow_db_env(s),
        **celery_env(s),
        "AIRFLOW__CORE__AUTH_MANAGER":
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{s.airflow_user}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(pw_file),
        "AIRFLOW__API_AUTH__JWT_SECRET": s.secret("airflow_jwt_secret", 64),
        "AIRFLOW__API__SECRET_KEY": s.secret("airflow_api_secret", 32),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(s.airflow_port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{s.airflow_port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{s.airflow_port}/execution/",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": s.mlflow_tracking_uri,
        "NO_PROXY": "*",
        "no_proxy": "*",
    }


def airflow_db_env(s: Settings) -> dict[str, str]:
    """SQLite under home by default; any SQLAlchemy URL otherwise. Airflow 3 also opens an async engine, which
    psycopg 3 serves from the same URL."""
    if not s.airflow_db_uri:
        return {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{s.home_abs / 'airflow' / 'airflow.db'}"}
    return {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": s.airflow_db_uri,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": s.airflow_db_uri}


def celery_env(s: Settings) -> dict[str, str]:
    """Broker and result backend for the CeleryExecutor; without an explicit result backend Airflow stores
    results in its own metadata database."""
    if s.airflow.executor != "CeleryExecutor":
        return {}
    if not s.airflow.broker_url:
        raise ValueError("FLYWHEEL_AIRFLOW__EXECUTOR=CeleryExecutor needs FLYWHEEL_AIRFLOW__BROKER_URL "
                         "(e.g. redis://127.0.0.1:6379/1)")
    env = {"AIRFLOW__CELERY__BROKER_URL": s.airflow.broker_url,
           "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(s.airflow.celery_concurrency)}
    if s.airflow.result_backend:
        env["AIRFLOW__CELERY__RESULT_BACKEND"] = s.airflow.result_backend
    return env


def production_profile(s: Settings) -> bool:
    """Any external backend means a shared deployment, where nothing may fall back to a generated secret."""
    return any((s.airflow_db_uri, s.mlflow_backend_uri, s.s3_endpoint_url, s.airflow.broker_url))


def object_storage_env(s: Settings) -> dict[str, str]:
    """Point pyarrow's S3 filesystem (the lake) and boto3 (MLflow artifacts) at an S3-compatible endpoint.
    Both read `AWS_ENDPOINT_URL`; MLflow's artifact client also reads `MLFLOW_S3_ENDPOINT_URL`. Credentials
    come from the environment (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, e.g. from a Kubernetes secret)."""
    if not s.s3_endpoint_url:
        return {}
    missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(k)]
    if missing:
        raise ValueError(f"s3_endpoint_url={s.s3_endpoint_url} is set but {' and '.join(missing)} "
                         "is not: export the object store's credentials")
    return {**object_storage_endpoints(s), "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"]}


def object_storage_endpoints(s: Settings) -> dict[str, str]:
    """The endpoint variables alone: what a hand-run command needs when its credentials come from elsewhere
    (its own environment, an instance profile)."""
    if not s.s3_endpoint_url:
        return {}
    return {"AWS_ENDPOINT_URL": s.s3_endpoint_url, "MLFLOW_S3_ENDPOINT_URL": s.s3_endpoint_url}


def mlflow_user(s: Settings) -> str:
    return s.mlflow_username or "admin"


def mlflow_password(s: Settings) -> str:
    """The MLflow admin password: from the settings (env `FLYWHEEL_MLFLOW_PASSWORD`, a mounted secret), or
    generated once per home locally; the production profile refuses to invent one."""
    if s.mlflow_password:
        return s.mlflow_password
    if production_profile(s):
        raise ValueError("mlflow_auth is on in the production profile but FLYWHEEL_MLFLOW_PASSWORD is not set: "
                         "refusing to start MLflow without a configured admin password")
    return s.secret("mlflow_admin_password", 24)


def mlflow_client_env(s: Settings) -> dict[str, str]:
    """What every MLflow client (Airflow tasks, the model server, the CLI) needs to pass basic auth."""
    if not s.mlflow_auth:
        return {}
    return {"MLFLOW_TRACKING_USERNAME": mlflow_user(s), "MLFLOW_TRACKING_PASSWORD": mlflow_password(s)}


def mlflow_auth_server_env(s: Settings) -> dict[str, str]:
    """The basic-auth app's config: an ini (user store under home, credential cache so a request does not
    hash a password each time) and the admin bootstrap password and Flask secret through the environment."""
    if not s.mlflow_auth:
        return {}
    auth_dir = s.home_abs / "mlflow-auth"
    auth_dir.mkdir(parents=True, exist_ok=True)
    ini = auth_dir / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{auth_dir / 'basic_auth.db'}\n"
        f"admin_username = {mlflow_user(s)}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n"
    )
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": mlflow_password(s),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": s.secret("mlflow_flask_secret", 32)}


def mlflow_backend(s: Settings) -> str:
    return s.mlflow_backend_uri or f"sqlite:///{s.home_abs / 'mlflow.db'}"


def db_upgrade(s: Settings) -> dict[str, str]:
    """Bring the Airflow and MLflow schemas to this release's version; a second run is a no-op."""
    env = full_env(s)
    done = {}
    for name, argv in (("airflow", [str(BIN / "airflow"), "db", "migrate"]),
                       ("mlflow", [str(BIN / "mlflow"), "db", "upgrade", mlflow_backend(s)])):
        out = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{name} schema upgrade failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
        done[name] = "ok"
    return done


def full_env(s: Settings) -> dict[str, str]:
    env = {**os.environ, **settings_env(s), **airflow_env(s), **object_storage_env(s), **mlflow_client_env(s)}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}:{env.get('PYTHONPATH', '')}".rstrip(":")
    return env


def _start(s: Settings, name: str, argv: list[str], env: dict[str, str]) -> int:
    run = s.run_dir
    run.mkdir(parents=True, exist_ok=True)
    pid_file = run / f"{name}.pid"
    if pid_file.exists() and _alive(int(pid_file.read_text())):
        return int(pid_file.read_text())
    log = open(run / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=True)
    pid_file.write_text(str(proc.pid))
    return proc.pid


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_http(url: str, timeout: float, what: str, log: Path | None = None, pid: int | None = None) -> None:
    """Wait until `url` answers; a process that exits meanwhile is reported at once, with its log's tail."""
    last = ""

    def unhealthy(reason: str) -> RuntimeError:
        tail = ""
        if log and log.exists():
            tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        return RuntimeError(f"{what} did not become healthy at {url} within {timeout:.0f}s ({reason}){tail}")

    def answers() -> bool | None:
        nonlocal last
        if pid is not None and not _alive(pid):
            raise unhealthy(f"the process {pid} exited")
        try:
            r = httpx.get(url, timeout=3)
            if r.status_code < 500:
                return True
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = str(e)
        return None

    wait_until(answers, timeout, 0.5, lambda: unhealthy(last))


def start_mlflow(s: Settings) -> None:
    """The backend URI (which may hold a database password) goes through the environment, not argv."""
    env = {**full_env(s), **mlflow_auth_server_env(s), "MLFLOW_BACKEND_STORE_URI": mlflow_backend(s)}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    home = s.home_abs
    auth = ["--app-name", "basic-auth"] if s.mlflow_auth else []
    pid = _start(s, "mlflow", [str(BIN / "mlflow"), "server", "--artifacts-destination", s.mlflow_artifacts_uri or str(home / "mlartifacts"),
                         "--serve-artifacts", *auth,
                         "--host", "127.0.0.1", "--port", str(s.mlflow_port), "--workers", "1"], env)
    wait_http(f"http://127.0.0.1:{s.mlflow_port}/health", s.service_start_timeout_s, "MLflow", s.run_dir / "mlflow.log",
              pid)


def start_airflow(s: Settings) -> None:
    env = full_env(s)
    airflow = str(BIN / "airflow")
    s.run_dir.mkdir(parents=True, exist_ok=True)
    migrate_log = s.run_dir / "airflow-migrate.log"
    with open(migrate_log, "ab") as log:
        done = subprocess.run([airflow, "db", "migrate"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "\n".join(migrate_log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"airflow db migrate failed (exit {done.returncode}); {migrate_log}:\n{tail}")
    _start(s, "airflow-api", [airflow, "api-server", "--port", str(s.airflow_port)], env)
    _start(s, "airflow-scheduler", [airflow, "scheduler"], env)
    _start(s, "airflow-dag-processor", [airflow, "dag-processor"], env)
    _start(s, "airflow-triggerer", [airflow, "triggerer"], env)
    if s.airflow.executor == "CeleryExecutor":
        _start(s, "airflow-celery-worker", [airflow, "celery", "worker", "--concurrency",
                                            str(s.airflow.celery_concurrency)], env)
    wait_http(f"http://127.0.0.1:{s.airflow_port}/api/v2/monitor/health", s.service_start_timeout_s, "Airflow api-server",
              s.run_dir / "airflow-api.log")
    ensure_gpu_pool(s)


def ensure_gpu_pool(s: Settings) -> None:
    """Create (or resize) the pool that bounds concurrent training (`gpu_pool`, `gpu_pool_slots`): a task in a
    pool that does not exist is never scheduled, so it must exist before the first night runs. Airflow 3
    validates a PATCH body as a whole pool (name, slots and `include_deferred` required) even with an update
    mask, so an existing pool is resized with its own `include_deferred` carried over, and only the masked
    fields change."""
    from pipeline.ops.airflow_client import AirflowClient

    af = AirflowClient(f"http://127.0.0.1:{s.airflow_port}", s.airflow_user, airflow_password(s))
    body = {"name": s.cluster.gpu_pool, "slots": s.cluster.gpu_pool_slots, "include_deferred": False,
            "description": "Flywheel: concurrent GPU training jobs (nights, backfills included)"}
    current = af.request("GET", f"/api/v2/pools/{s.cluster.gpu_pool}")
    if current.status_code == 404:
        r = af.request("POST", "/api/v2/pools", json=body)
    elif current.status_code == 200:
        body["include_deferred"] = bool(current.json().get("include_deferred", False))
        r = af.request("PATCH", f"/api/v2/pools/{s.cluster.gpu_pool}", json=body,
                       params=[("update_mask", "slots"), ("update_mask", "description")])
    else:
        r = current
    if r.status_code >= 300:
        raise RuntimeError(f"could not create the Airflow pool {s.cluster.gpu_pool!r}: HTTP {r.status_code} {r.text[:300]}")


def start_server(s: Settings) -> None:
    env = full_env(s)
    pid = _start(s, "serving", [str(BIN / "flywheel"), "serve"], env)
    wait_http(f"{s.resolved_serving_url()}/health", s.service_start_timeout_s, "model server",
              s.run_dir / "serving.log", pid)


def stop_all(s: Settings, timeout: float = 20) -> list[str]:
    """TERM each process group, then KILL what is left (LocalExecutor workers can outlive a TERM)."""
    stopped = []
    run = s.run_dir
    if not run.exists():
        return stopped
    pids = {}
    for pid_file in run.glob("*.pid"):
        pid = int(pid_file.read_text())
        if _alive(pid):
            pids[pid_file.stem] = pid
            try:
                os.killpg(pid, signal.SIGTERM)
            except OSError:
                pass
    wait_until(lambda: None if any(_alive(p) for p in pids.values()) else True, timeout, 0.2)
    for name, pid in pids.items():
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        stopped.append(name)
    for pid_file in run.glob("*.pid"):
        pid_file.unlink()
    return stopped


def describe(s: Settings, airflow: bool = True, server: bool = True) -> str:
    """What `up` started, with the real model name and the stop command that works for this home: nothing
    about a service that was not started."""
    from feature_store.spec import load_spec

    model = s.resolved_model_name(load_spec(s.spec_path).name)
    lines = []
    if airflow:
        lines.append(f"Airflow UI   http://127.0.0.1:{s.airflow_port}  user {s.airflow_user} / password "
                     f"{airflow_password(s)}")
    auth = (f"  user {mlflow_user(s)} / password in FLYWHEEL_MLFLOW_PASSWORD or "
            f"{s.home_abs / 'secrets' / 'mlflow_admin_password'}" if s.mlflow_auth else "")
    lines.append(f"MLflow UI    http://127.0.0.1:{s.mlflow_port}  (registry: Models -> {model}){auth}")
    if server:
        lines.append(f"Model server {s.resolved_serving_url()}  (/docs, /health, /metrics)")
    lines.append(f"Logs         {s.run_dir}/*.log")
    lines.append(f"Stop with    {stop_command(s)}")
    return "\n".join(lines)


def stop_command(s: Settings) -> str:
    return f"flywheel --home {s.home_abs} down"
