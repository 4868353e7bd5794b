"""The night's training as a Kubernetes job for a shared cluster: a single pod, an elastic Kubeflow `PyTorchJob`, or
a Kubeflow Trainer `TrainJob` (`training_job_kind`), optionally queued through Kueue (`kueue_queue`).

All three are built from the one reviewed pod template (`pod.training_pod`): same image, secrets, security context,
low `PriorityClass` and GPU tolerations. The distributed kinds run the pod's entry point under torchrun elastic:

    torchrun --nnodes=MIN:MAX --nproc-per-node=GPUS --rdzv-backend=c10d --rdzv-endpoint=<job>-worker-0:29400
             --max-restarts=N -m pipeline.learn.ddp_train --staged <staging_uri>/<model>/<night>

The nightly `train` stage prepares the night in the Airflow worker, stages it (`pipeline.learn.staging`), submits
the job and watches it (`launch`), then logs the trained bundle the job left beside the inputs. A worker that is preempted leaves the rendezvous, the others restart from the newest checkpoint in object storage
with the smaller world size, and a worker that comes back joins at the next restart (`ddp_train`'s docstring says
why the result stays the same). `restartPolicy: ExitCode` lets the training operator restart a pod killed by a
signal (exit >= 128, preemption) and fail one whose trainer exited 1-127 (a real failure), the same split the
Airflow task makes (`preemption.classify`).

With `kueue_queue` set, the job carries the `kueue.x-k8s.io/queue-name` label: Kueue holds it (suspended job,
gated pod) until its ClusterQueue has quota, instead of the API server refusing it, and `activeDeadlineSeconds`
bounds the whole wait + run by the night's deadline.
"""

from __future__ import annotations

import copy
import hashlib
from datetime import date

from pipeline.cluster.pod import training_pod
from pipeline.config import Settings

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# torchrun's agents share the rendezvous TCP store with the workers by default, and the agent that stays rank 0
# then keeps the first round's master address: a worker that re-joins later waits for a key no one writes
# (DistStoreError on MASTER_ADDR; measured on torch 2.13, `tests/integration/test_ddp.py`). Opting out makes every
# rendezvous round publish its own.
ELASTIC_ENV = [{"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"}]
PYTORCH_CONTAINER = "pytorch"  # the training operator finds the container by this name
RDZV_PORT = 29400


def job_name(day: date | str, staged: str = "") -> str:
    """One name per staged night: re-training a day on another parent (after a rollback) is another job."""
    label = day.isoformat() if isinstance(day, date) else day
    return f"flywheel-train-{label}-{hashlib.sha256(staged.encode()).hexdigest()[:8]}" if staged else \
        f"flywheel-train-{label}"


def ddp_args(staged: str) -> list[str]:
    """The entry point's arguments: the staged night (inputs, checkpoints and output all live under it)."""
    return ["-m", "pipeline.learn.ddp_train", "--staged", staged]


def torchrun_command(s: Settings, name: str) -> list[str]:
    return ["torchrun", f"--nnodes={s.cluster.min_nodes}:{s.cluster.max_nodes}",
            f"--nproc-per-node={max(1, s.cluster.gpus)}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={name}-worker-0:{RDZV_PORT}", f"--rdzv-id={name}",
            f"--max-restarts={s.cluster.max_restarts}"]


def deadline_seconds(s: Settings) -> int:
    return int(s.cluster.deadline_h * 3600)


def _labels(s: Settings, day: str) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "flywheel-train", "app.kubernetes.io/part-of": "flywheel", "flywheel/day": day}
    if s.cluster.kueue_queue:
        labels[QUEUE_LABEL] = s.cluster.kueue_queue
    return labels


def queued_pod(s: Settings, day: str, xcom: bool = False) -> dict:
    """The single training pod, with the Kueue label when a queue is configured (Kueue's pod integration)."""
    pod = training_pod(s, day, xcom)
    pod["metadata"]["labels"].update(_labels(s, day))
    return pod


def pytorch_job(s: Settings, day: str, staged: str) -> dict:
    """A Kubeflow training-operator `PyTorchJob` (kubeflow.org/v1) with an elastic policy: MIN..MAX workers."""
    name = job_name(day, staged)
    pod = training_pod(s, day)
    spec = copy.deepcopy(pod["spec"])
    spec.pop("restartPolicy", None)  # the replica spec's restartPolicy governs the pods
    container = spec["containers"][0]
    container["name"] = PYTORCH_CONTAINER
    container["command"] = torchrun_command(s, name)
    container["args"] = ddp_args(staged)
    container["env"] = [*container.get("env", []), *ELASTIC_ENV]
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": s.cluster.namespace, "labels": _labels(s, day)},
        "spec": {
            "elasticPolicy": {"minReplicas": s.cluster.min_nodes, "maxReplicas": s.cluster.max_nodes,
                              "rdzvBackend": "c10d", "rdzvPort": RDZV_PORT, "maxRestarts": s.cluster.max_restarts},
            "runPolicy": {"cleanPodPolicy": "None", "activeDeadlineSeconds": deadline_seconds(s),
                          "backoffLimit": s.cluster.max_restarts,
                          "schedulingPolicy": {"priorityClass": s.cluster.priority_class}},
            "pytorchReplicaSpecs": {"Worker": {
                "replicas": s.cluster.max_nodes, "restartPolicy": "ExitCode",
                "template": {"metadata": {"labels": _labels(s, day)}, "spec": spec}}},
        },
    }


def train_job(s: Settings, day: str, staged: str, runtime: str = "torch-distributed") -> dict:
    """A Kubeflow Trainer `TrainJob` (trainer.kubeflow.org/v1alpha1) on a torch ClusterTrainingRuntime. Elasticity
    and the pod's priority/tolerations come from the runtime (an admin object, see infra/README.md)."""
    name = job_name(day, staged)
    container = training_pod(s, day)["spec"]["containers"][0]
    resources = copy.deepcopy(container["resources"])
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
        "metadata": {"name": name, "namespace": s.cluster.namespace, "labels": _labels(s, day)},
        "spec": {
            "runtimeRef": {"name": runtime, "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime"},
            "activeDeadlineSeconds": deadline_seconds(s),
            "trainer": {"image": s.cluster.image, "command": [*torchrun_command(s, name), *ddp_args(staged)],
                        "numNodes": s.cluster.max_nodes, "resourcesPerNode": resources,
                        "env": [*(e for e in container.get("env", []) if "valueFrom" not in e), *ELASTIC_ENV]},
        },
    }


def training_job(s: Settings, day: str, staged: str = "") -> dict:
    """What `job_kind` selects, for one day (the distributed kinds for the night staged at `staged`)."""
    if s.cluster.job_kind == "pod":
        return queued_pod(s, day)
    if not staged:
        raise ValueError(f"a {s.cluster.job_kind} trains a staged night: pass its location")
    return {"pytorchjob": pytorch_job, "trainjob": train_job}[s.cluster.job_kind](s, day, staged)
