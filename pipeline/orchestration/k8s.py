"""The Airflow task that launches a night's training pod on a shared cluster (the pod: `pipeline.cluster.pod`).

With `training_runner=kubernetes` (job kind `pod`) the nightly DAG's `train` task is a `KubernetesPodOperator`
built from the rendered pod: it runs `flywheel train --day {{ ds }} --xcom`
in the GPU pool, and the pod's XCom sidecar hands the `TrainResult` JSON to `evaluate` as the local task would.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pipeline.cluster.pod import CONTAINER, train_args
from pipeline.config import Settings

DAY_TEMPLATE = "{{ ds }}"


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
    from pipeline.cluster.jobs import queued_pod
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
