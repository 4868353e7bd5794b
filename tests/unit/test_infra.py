"""Deployment material is validated, not just written: manifests against Kubernetes schemas, the rendered
training pod against its contract (resources, image, command, secrets, priority)."""

from __future__ import annotations

import subprocess
import sys
from datetime import date
from pathlib import Path

import yaml

from pipeline.cluster.pod import training_pod
from pipeline.config import Settings

INFRA = Path(__file__).resolve().parents[2] / "infra"
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"


def _validate(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(VALIDATE), "--strict", "--quiet", *map(str, paths)], capture_output=True, text=True)


def test_all_manifests_pass_kubernetes_schema_validation():
    manifests = sorted((INFRA / "k8s").glob("*.yaml"))
    assert len(manifests) >= 5
    out = _validate(*manifests)
    assert out.returncode == 0, out.stdout + out.stderr


def test_schema_validation_catches_a_broken_manifest(tmp_path):
    bad = yaml.safe_load((INFRA / "k8s" / "training-pod-template.yaml").read_text())
    bad["spec"]["containers"][0]["resources"]["requests"] = "lots"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert _validate(path).returncode != 0


def test_rendered_training_pod_requests_gpu_low_priority_and_mounts_secrets(tmp_path):
    s = Settings(home=tmp_path, training_image="registry.local/flywheel:1.2.3", training_gpus=2, training_cpus=8,
                 training_memory="32Gi")
    pod = training_pod(s, date(2026, 3, 1))
    c = pod["spec"]["containers"][0]
    assert c["image"] == "registry.local/flywheel:1.2.3"
    assert c["args"] == ["train", "--day", "2026-03-01"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2" and c["resources"]["requests"]["cpu"] == "8"
    assert pod["spec"]["priorityClassName"] == "flywheel-training" and pod["spec"]["tolerations"]
    secret_keys = {e["valueFrom"]["secretKeyRef"]["key"] for e in c["env"] if "valueFrom" in e}
    assert {"aws-secret-access-key", "mlflow-password"} <= secret_keys
    assert not any("value" in e and "secret" in e["name"].lower() for e in c["env"]), "no inline secrets"
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(pod))
    out = _validate(path)
    assert out.returncode == 0, out.stdout + out.stderr
    cpu_only = training_pod(Settings(home=tmp_path, training_gpus=0), date(2026, 3, 1))
    assert "nvidia.com/gpu" not in cpu_only["spec"]["containers"][0]["resources"]["limits"]
    assert "tolerations" not in cpu_only["spec"]


def test_dockerfile_pins_versions_and_runs_as_non_root():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    base = next(line for line in text.splitlines() if line.startswith("FROM "))
    assert ":latest" not in base and any(ch.isdigit() for ch in base.split(":")[1])
    assert "-c constraints.txt" in text and '"torch==2.13.0"' in text
    assert "USER 10001" in text


COMPOSE = INFRA / "compose"
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "JWT")


def _compose() -> dict:
    return yaml.safe_load((COMPOSE / "compose.yaml").read_text())


def test_compose_runs_the_production_profile_with_pinned_images():
    services = _compose()["services"]
    assert {"postgres", "redis", "mlflow", "airflow-init", "airflow-api-server", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "serving"} <= set(services)
    for name, svc in services.items():
        repo, _, tag = svc["image"].rpartition(":")
        assert repo and tag and tag != "latest" and any(ch.isdigit() for ch in tag), f"{name}: unpinned {svc['image']}"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE / source).exists(), f"{name} mounts missing {source}"
    airflow = services["airflow-scheduler"]["environment"]
    assert airflow["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert airflow["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    assert services["airflow-worker"]["command"][:2] == ["celery", "worker"]
    assert "basic-auth" in services["mlflow"]["command"]


def test_compose_has_no_password_literals_and_every_secret_is_required():
    import configparser
    import re

    text = (COMPOSE / "compose.yaml").read_text()
    assert not re.search(r"\$\{\w+:?-", text), "a secret with a default value"
    required = set(re.findall(r"\$\{(\w+):\?", text))
    example = dict(line.split("=", 1) for line in (COMPOSE / "env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert required == set(example), "env.example lists exactly the variables compose requires"
    assert all(not v for k, v in example.items() if any(w in k for w in SECRET_WORDS)), "no example secrets"
    for name, svc in _compose()["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if key.endswith(("_FILE", "_PATH")):  # where a secret lives, not the secret
                continue
            if any(w in key for w in SECRET_WORDS) or re.search(r"://[^/@\s]*:[^/@\s]*@", str(value)):
                assert re.fullmatch(r"(.*\$\{\w+:\?[^}]*\}.*|.*\$\$\w+.*)", str(value)), f"{name}.{key} is a literal"
    for url in re.findall(r"\w+://[^\s'\"]+", text):
        if "@" in url:
            assert re.match(r"[\w+]+://[^:@]*:\$\{\w+:\?", url), f"credentials literal in {url}"
    auth = configparser.ConfigParser()
    auth.read(COMPOSE / "mlflow-auth.ini")
    assert int(auth["mlflow"]["auth_cache_ttl_seconds"]) > 0 and "admin_password" not in auth["mlflow"]


def test_a_half_configured_production_profile_refuses_to_start_naming_the_missing_setting(tmp_path, monkeypatch):
    import pytest

    from pipeline.ops import stack

    with pytest.raises(ValueError, match="FLYWHEEL_AIRFLOW__BROKER_URL"):
        stack.full_env(Settings(home=tmp_path, airflow_executor="CeleryExecutor"))
    celery = stack.full_env(Settings(home=tmp_path, airflow_executor="CeleryExecutor",
                                     airflow_broker_url="redis://127.0.0.1:6379/9", airflow_celery_concurrency=3))
    assert celery["AIRFLOW__CELERY__BROKER_URL"] == "redis://127.0.0.1:6379/9"
    assert celery["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == "3"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with pytest.raises(ValueError, match="AWS_ACCESS_KEY_ID is not"):
        stack.full_env(Settings(home=tmp_path, s3_endpoint_url="http://127.0.0.1:9000"))
    with pytest.raises(ValueError, match="FLYWHEEL_MLFLOW_PASSWORD is not set"):
        stack.full_env(Settings(home=tmp_path, mlflow_auth=True, airflow_db_uri="postgresql+psycopg://h/db"))
    assert not (tmp_path / "secrets" / "mlflow_admin_password").exists(), "no password invented in production"
