"""Training on Kubernetes by config: the DAG parsed with `training_runner=kubernetes` launches the rendered
training pod through a real KubernetesPodOperator, and the pod it would submit passes Kubernetes validation.
No cluster here: the pod request object is built (templates rendered for a day) but never sent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from pipeline.ops.stack import REPO
from pipeline.orchestration.k8s_train import with_xcom, write_xcom
from pipeline.stages.train import TrainResult
from tests.unit.test_infra import _validate

PROBE = """
import json, sys
from types import SimpleNamespace
from airflow.dag_processing.dagbag import DagBag
from kubernetes.client import ApiClient
b = DagBag(dag_folder=sys.argv[1])
d = b.dags.get("flywheel_nightly")
info = {"errors": {k: str(v) for k, v in b.import_errors.items()}}
if d:
    op = d.get_task("train")
    info.update(type=type(op).__name__, pool=op.pool, xcom=op.do_xcom_push, retries=op.retries,
                upstream=sorted(op.upstream_task_ids), downstream=sorted(op.downstream_task_ids),
                heavy=sorted(m for m in ("torch", "mlflow", "great_expectations") if m in sys.modules))
    if info["type"] == "KubernetesPodOperator":
        ti = SimpleNamespace(dag_id=d.dag_id, task_id=op.task_id, map_index=-1, try_number=1)
        ctx = {"ds": "2026-03-01", "ti": ti, "run_id": "scheduled__2026-03-01T00:00:00+00:00", "dag": d}
        op.render_template_fields(ctx)
        info["pod"] = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(ctx, dry_run=True))
print(json.dumps(info))
"""


def _parse(tmp_path, **env: str) -> dict:
    base = {"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PATH": "/usr/bin:/bin",
            "AIRFLOW_CONN_KUBERNETES_DEFAULT": json.dumps({"conn_type": "kubernetes",
                                                           "extra": {"in_cluster": True}})}
    out = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "dags")], env={**base, **env},
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def k8s_dag(tmp_path_factory) -> dict:
    return _parse(tmp_path_factory.mktemp("af"), FLYWHEEL_TRAINING_RUNNER="kubernetes", FLYWHEEL_GPU_POOL="gpu-a100",
                  FLYWHEEL_TRAINING_IMAGE="registry.local/flywheel:1.2.3-cuda", FLYWHEEL_TRAINING_GPUS="2",
                  FLYWHEEL_TRAINING_CPUS="8", FLYWHEEL_TRAINING_MEMORY="32Gi", FLYWHEEL_TRAINING_NAMESPACE="ml")


def test_kubernetes_runner_makes_train_a_pod_operator_in_the_gpu_pool(k8s_dag, tmp_path):
    info = k8s_dag
    assert info["errors"] == {} and info["heavy"] == []
    assert info["type"] == "KubernetesPodOperator" and info["pool"] == "gpu-a100" and info["xcom"] is True
    assert info["upstream"] == ["validate"] and info["downstream"] == ["evaluate"] and info["retries"] == 2
    local = _parse(tmp_path)
    assert local["errors"] == {} and local["type"] != "KubernetesPodOperator" and local["pool"] == "default_pool"


def test_pod_request_runs_train_for_the_rendered_day_with_gpu_priority_and_secrets(k8s_dag):
    pod = k8s_dag["pod"]
    assert pod["metadata"]["namespace"] == "ml" and pod["metadata"]["labels"]["flywheel/day"] == "2026-03-01"
    assert pod["metadata"]["name"].startswith("flywheel-train-2026-03-01")
    train, sidecar = pod["spec"]["containers"]
    assert train["name"] == "train" and sidecar["name"] == "airflow-xcom-sidecar"
    assert train["image"] == "registry.local/flywheel:1.2.3-cuda"
    assert train["args"] == ["train", "--day", "2026-03-01", "--xcom"] and not train.get("command")
    res = train["resources"]
    assert res["requests"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}
    assert res["limits"] == {"memory": "32Gi", "nvidia.com/gpu": "2"}
    assert pod["spec"]["priorityClassName"] == "flywheel-training"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in train["env"] if "valueFrom" in e}
    assert secrets["MLFLOW_TRACKING_PASSWORD"] == {"name": "flywheel-secrets", "key": "mlflow-password"}
    assert secrets["AWS_SECRET_ACCESS_KEY"]["name"] == "flywheel-secrets"
    assert not any("value" in e for e in train["env"]), "no inline values: everything from the secret"
    assert {"configMapRef": {"name": "flywheel-config"}} in train["envFrom"]
    assert {"mountPath": "/airflow/xcom", "name": "xcom"} in train["volumeMounts"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_pod_request_passes_kubernetes_schema_validation(k8s_dag, tmp_path):
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(k8s_dag["pod"]))
    out = _validate(path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_train_result_reaches_the_sidecar_file_whole(tmp_path):
    result = TrainResult(day="2026-03-01", run_id="abc", parent_version="3", train_rows=10, holdout_rows=2,
                         new_vocab={"region": 1}, final_loss=0.5, device="cuda", reused=False)
    path = write_xcom(result, tmp_path / "return.json")
    assert json.loads(path.read_text()) == result.model_dump(mode="json")
    assert [p.name for p in tmp_path.iterdir()] == ["return.json"]
    with pytest.raises(FileNotFoundError, match="is not mounted"):
        write_xcom(result, tmp_path / "missing" / "return.json")


def test_with_xcom_writes_only_a_result_that_exists(tmp_path):
    path = tmp_path / "return.json"
    assert with_xcom(lambda day: {"day": day, "run_id": "r1"}, path)("2026-03-01") == {"day": "2026-03-01",
                                                                                      "run_id": "r1"}
    assert json.loads(path.read_text())["run_id"] == "r1"
    path.unlink()

    def failing(day: str) -> dict:
        raise RuntimeError(f"no validated data for {day}")

    with pytest.raises(RuntimeError, match="no validated data"):
        with_xcom(failing, path)("2026-03-02")
    assert not path.exists()
