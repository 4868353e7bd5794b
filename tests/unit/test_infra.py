"""Deployment material is validated, not just written: manifests against Kubernetes schemas, the rendered
training pod against its contract (resources, image, command, secrets, priority)."""

from __future__ import annotations

import subprocess
import sys
from datetime import date
from pathlib import Path

import yaml

from pipeline.config import Settings
from pipeline.k8s import training_pod

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
