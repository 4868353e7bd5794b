"""The nightly `train` task on Kubernetes: a KubernetesPodOperator that knows a preemption from a failure.

Imported only when `training_runner=kubernetes` (the local runner never loads the Kubernetes provider). The task
is given as many retries as fit in the night (`training_deadline_h` / `training_retry_delay_s`); every attempt
checks the deadline first, and a finished pod is classified (`preemption.classify_pod`): a preempted, evicted or
signalled pod raises a plain AirflowException (Airflow retries it, the retry resumes from the newest checkpoint
in object storage), anything else raises AirflowFailException (no retry: the same job fails the same way).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.common.compat.sdk import AirflowException
from airflow.sdk.exceptions import AirflowFailException

from pipeline.errors import DeadlinePassed, Preempted
from pipeline.orchestration.preemption import check_deadline, classify_pod


def _as_dict(pod: Any) -> dict | None:
    if pod is None or isinstance(pod, dict):
        return pod
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(pod)


def night_deadline(context: dict, hours: float) -> datetime:
    """The data day ends at the run's data interval end; training must be done `hours` later."""
    end = context.get("data_interval_end") or context["logical_date"] + timedelta(days=1)
    return end + timedelta(hours=hours)


class TrainingPodOperator(KubernetesPodOperator):
    def __init__(self, *, deadline_h: float, queue_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.deadline_h = deadline_h
        self.queue_name = queue_name

    def execute(self, context: Any) -> Any:
        self._deadline = night_deadline(context, self.deadline_h)
        try:
            check_deadline(datetime.now(UTC), self._deadline)
        except DeadlinePassed as e:
            raise AirflowFailException(str(e)) from e
        self.log.info("training attempt %s; the night's deadline is %s", context["ti"].try_number,
                      self._deadline.isoformat())
        if self.queue_name:
            self.log.info("submitting to Kueue LocalQueue %r: the pod stays Pending (scheduling gate "
                          "kueue.x-k8s.io/admission) until its ClusterQueue has quota for it; waiting up to %s s, "
                          "the night's deadline. `kubectl get workloads -n %s` shows why it waits.",
                          self.queue_name, self.schedule_timeout_seconds, self.namespace)
        return super().execute(context)

    def cleanup(self, pod: Any, remote_pod: Any, xcom_result: dict | None = None, context: Any = None) -> None:
        try:
            super().cleanup(pod, remote_pod, xcom_result=xcom_result, context=context)
        except AirflowException as e:
            self.judge(remote_pod, e)

    def judge(self, remote_pod: Any, cause: Exception) -> None:
        """Re-raise a failed attempt as retryable (preempted, before the deadline) or final (anything else)."""
        verdict = classify_pod(_as_dict(remote_pod), self.base_container_name)
        self.log.warning("%s", verdict)
        if isinstance(verdict, Preempted):
            deadline = getattr(self, "_deadline", None)
            try:
                if deadline is not None:
                    check_deadline(datetime.now(UTC), deadline, verdict)
            except DeadlinePassed as late:
                raise AirflowFailException(str(late)) from cause
            raise AirflowException(str(verdict)) from cause
        raise AirflowFailException(str(verdict)) from cause
