"""The Kubernetes pod that runs a night's training on a shared cluster, and the Airflow task that launches it.

Rendered from `infra/k8s/training-pod-template.yaml` so operators review one YAML file, with the day, image,
resources and priority filled in from settings. With `training_runner=kubernetes` the nightly DAG's `train` task
is a `KubernetesPodOperator` built from this same rendered pod: it runs `flywheel train --day {{ ds }} --xcom`
in the GPU pool, and the pod's XCom sidecar hands the `TrainResult` JSON to `evaluate` as the local task would.
"""

from __future__ import annotations

import copy
from datetime import date, timedelta
from functools import lru_cache
from typing import Any

import yaml

from pipeline.config import REPO, Settings

TEMPLATE = REPO / "infra" / "k8s" / "training-pod-template.yaml"
CONTAINER = "train"
DAY_TEMPLATE = "{{ ds }}"


@lru_cache(maxsize=1)
def _template() -> dict:
    return yaml.safe_load(TEMPLATE.read_text())


def train_args(day: str, xcom: bool = False) -> list[str]:
    """The container's `flywheel` arguments; with `xcom` the result is also written where the sidecar reads it."""
    return ["train", "--day", day, *(["--xcom"] if xcom else [])]


def training_pod(s: Settings, day: date | str, xcom: bool = False) -> dict:
    """The pod for one day; `day` may be a Jinja template (`{{ ds }}`) that Airflow renders per run."""
    label = day.isoformat() if isinstance(day, date) else day
    pod = copy.deepcopy(_template())
    pod["metadata"]["name"] = f"flywheel-train-{label}"
    pod["metadata"]["namespace"] = s.cluster.namespace
    pod["metadata"]["labels"]["flywheel/day"] = label
    pod["spec"]["priorityClassName"] = s.cluster.priority_class
    container = pod["spec"]["containers"][0]
    if container["name"] != CONTAINER:
        raise ValueError(f"{TEMPLATE}: the first container must be named {CONTAINER!r}, got {container['name']!r}")
    container["image"] = s.cluster.image
    container["args"] = train_args(label, xcom)
    resources = container["resources"]
    resources["requests"]["cpu"] = str(s.cluster.cpus)
    resources["requests"]["memory"] = resources["limits"]["memory"] = s.cluster.memory
    if s.cluster.gpus:
        resources["requests"]["nvidia.com/gpu"] = resources["limits"]["nvidia.com/gpu"] = str(s.cluster.gpus)
    else:
        resources["requests"].pop("nvidia.com/gpu", None)
        resources["limits"].pop("nvidia.com/gpu", None)
        pod["spec"].pop("tolerations", None)
    return pod


def preemption_retries(s: Settings) -> int:
    """As many retries as fit before the night's deadline: preemptions are retried "without limit" within the night;
    the operator fails at once on a real failure or past the deadline, so the number is only an upper bound."""
    return max(1, int(s.cluster.deadline_h * 3600 // s.cluster.retry_delay_s))


def training_pod_operator(s: Settings, task_id: str = "train", **kwargs: Any):
    """The nightly `train` task as a KubernetesPodOperator in the GPU pool (`TrainingPodOperator`: retries a
    preempted pod until the night's deadline, fails a failed one at once).

    The provider is imported here, not by the DAG file, so parsing a DAG on the local runner never loads the
    Kubernetes client. A finished pod is deleted only when it succeeded, so a failed night's pod stays for
    `kubectl logs`; `reattach_on_restart` lets a retried task pick up a pod that is still running.
    """
    from pipeline.orchestration.k8s_jobs import queued_pod
    from pipeline.orchestration.k8s_operator import TrainingPodOperator

    pod = queued_pod(s, DAY_TEMPLATE, xcom=True)
    if s.cluster.kueue_queue:  # a queued pod stays gated until admitted: wait for it as long as the night allows
        kwargs.setdefault("schedule_timeout_seconds", int(s.cluster.deadline_h * 3600))
    return TrainingPodOperator(
        task_id=task_id,
        deadline_h=s.cluster.deadline_h,
        queue_name=s.cluster.kueue_queue,
        retries=preemption_retries(s),
        retry_delay=timedelta(seconds=s.cluster.retry_delay_s),
        pod_template_dict=pod,
        namespace=s.cluster.namespace,
        image=s.cluster.image,
        arguments=train_args(DAY_TEMPLATE, xcom=True),
        base_container_name=CONTAINER,
        do_xcom_push=True,
        pool=s.cluster.gpu_pool,
        get_logs=True,
        reattach_on_restart=True,
        on_finish_action="delete_succeeded_pod",
        xcom_sidecar_container_security_context={"allowPrivilegeEscalation": False,
                                                 "capabilities": {"drop": ["ALL"]}},
        **kwargs,
    )
