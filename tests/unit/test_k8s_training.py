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
    if info["type"] == "TrainingPodOperator":
        info.update(schedule_timeout=op.schedule_timeout_seconds, queue=op.queue_name)
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
                  FLYWHEEL_TRAINING_CPUS="8", FLYWHEEL_TRAINING_MEMORY="32Gi", FLYWHEEL_TRAINING_NAMESPACE="ml",
                  FLYWHEEL_KUEUE_QUEUE="flywheel-training")


def test_kubernetes_runner_makes_train_a_pod_operator_in_the_gpu_pool(k8s_dag, tmp_path):
    info = k8s_dag
    assert info["errors"] == {} and info["heavy"] == []
    assert info["type"] == "TrainingPodOperator" and info["pool"] == "gpu-a100" and info["xcom"] is True
    # preemptions retry for the whole night (8 h / 60 s); real failures fail fast (see the cleanup test below)
    assert info["upstream"] == ["validate"] and info["downstream"] == ["evaluate", "note"] and info["retries"] == 480
    local = _parse(tmp_path)
    assert local["errors"] == {} and local["type"] != "TrainingPodOperator" and local["pool"] == "default_pool"
    # A Kubeflow job kind: `train` stays the worker's task (it stages, submits and watches), in the GPU pool.
    job = _parse(tmp_path, FLYWHEEL_CLUSTER__RUNNER="kubernetes", FLYWHEEL_CLUSTER__JOB_KIND="pytorchjob",
                 FLYWHEEL_CLUSTER__GPU_POOL="gpu-a100")
    assert job["errors"] == {} and job["type"] == local["type"] and job["pool"] == "gpu-a100"
    assert job["heavy"] == [] and job["downstream"] == local["downstream"]


def test_pod_request_runs_train_for_the_rendered_day_with_gpu_priority_and_secrets(k8s_dag):
    pod = k8s_dag["pod"]
    assert pod["metadata"]["namespace"] == "ml" and pod["metadata"]["labels"]["flywheel/day"] == "2026-03-01"
    # queued through Kueue: the pod carries the LocalQueue label and the task waits for admission all night
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "flywheel-training"
    assert k8s_dag["queue"] == "flywheel-training" and k8s_dag["schedule_timeout"] == 8 * 3600
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


CLEANUP = """
import json, sys
from datetime import UTC, datetime, timedelta
from kubernetes.client import V1ContainerState, V1ContainerStateTerminated, V1ContainerStatus, V1ObjectMeta, V1Pod, \\
    V1PodCondition, V1PodStatus
from airflow.providers.common.compat.sdk import AirflowException
from airflow.sdk.exceptions import AirflowFailException
from pipeline.orchestration.k8s_operator import TrainingPodOperator

def pod(code, reason=None, condition=None, pod_reason=None):
    term = V1ContainerStateTerminated(exit_code=code, reason=reason)
    status = V1ContainerStatus(name="train", state=V1ContainerState(terminated=term), image="i", image_id="i",
                               ready=False, restart_count=0)
    conds = [V1PodCondition(type="DisruptionTarget", status="True", reason=condition)] if condition else None
    return V1Pod(metadata=V1ObjectMeta(name="flywheel-train-x", namespace="ml"),
                 status=V1PodStatus(phase="Failed", reason=pod_reason, container_statuses=[status], conditions=conds))

op = TrainingPodOperator(task_id="train", deadline_h=8, name="x", image="i", base_container_name="train",
                         namespace="ml", do_xcom_push=False, on_finish_action="keep_pod")
out = {}
cases = {"sigterm": pod(143), "sigkill": pod(137, "Error"), "evicted": pod(137, pod_reason="Evicted"),
         "scheduler": pod(143, condition="PreemptionByScheduler"), "taint": pod(137, condition="DeletionByTaintManager"),
         "oom": pod(137, "OOMKilled"), "crash": pod(1, "Error")}
for late in (False, True):
    op._deadline = datetime.now(UTC) + timedelta(hours=-1 if late else 1)
    for name, p in cases.items():
        try:
            op.judge(p, AirflowException('Pod flywheel-train-x returned a failure.'))
            out[f"{name}{'-late' if late else ''}"] = "ok"
        except AirflowFailException as e:
            out[f"{name}{'-late' if late else ''}"] = "fail: " + str(e)
        except AirflowException as e:
            out[f"{name}{'-late' if late else ''}"] = "retry: " + str(e)
print(json.dumps(out))
"""


def test_preempted_pods_retry_and_failed_pods_fail_fast(tmp_path):
    """What `TrainingPodOperator.cleanup` raises once the provider has found the pod failed (the provider's own
    check needs a cluster, so the verdict is called with the exception it raises)."""
    env = {"AIRFLOW_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", CLEANUP], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("sigterm", "sigkill", "evicted", "scheduler", "taint"):
        assert got[name].startswith("retry: training was preempted"), (name, got[name])
        assert got[f"{name}-late"].startswith("fail: ") and "deadline" in got[f"{name}-late"], got[f"{name}-late"]
    assert "Evicted" in got["evicted"] and "PreemptionByScheduler" in got["scheduler"]
    for name in ("oom", "crash", "oom-late", "crash-late"):
        assert got[name].startswith("fail: training failed"), (name, got[name])
    assert "OOMKilled" in got["oom"]


def test_classify_reads_exit_codes_and_reasons():
    from pipeline.errors import Preempted, TrainingFailed
    from pipeline.orchestration.preemption import classify, classify_pod

    assert isinstance(classify(-9, []), Preempted) and isinstance(classify(143, []), Preempted)
    assert isinstance(classify(137, ["OOMKilled"]), TrainingFailed)
    assert isinstance(classify(2, []), TrainingFailed) and isinstance(classify(0, ["Evicted"]), Preempted)
    assert isinstance(classify_pod(None, "train"), Preempted)  # deleted under us
    api = {"metadata": {"name": "p"}, "status": {"reason": "Evicted", "containerStatuses": [
        {"name": "train", "state": {"terminated": {"exitCode": 137, "reason": "Error"}}}]}}
    assert isinstance(classify_pod(api, "train"), Preempted)
