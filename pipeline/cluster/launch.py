"""Submit a night's Kubeflow job (`PyTorchJob` or `TrainJob`) and watch it to its end.

The nightly `train` stage calls this from the Airflow worker (or from `flywheel train` on a laptop with a
kubeconfig) after staging the night: the job's pods train, the stage logs. Why a custom-object watch and not an
operator: the cncf.kubernetes provider can create a custom resource but has nothing that waits for a training
job's conditions, and a plain poll of the job object is all that needs (one GET every `poll_s`).

- Create the job; if one of that name exists (a retried task, a worker restarted mid-night) attach to it, unless
  it already failed, in which case it is replaced: the retry starts a new job that resumes from the checkpoints
  under the staged location.
- While Kueue holds it (condition `Suspended`), say so and where to look; while it runs, log each new condition
  (`Running`, `Restarting` after a preemption or a membership change: torchrun and the operator handle those).
- `Succeeded` (PyTorchJob) or `Complete` (TrainJob) ends the wait. `Failed` raises `TrainingFailed` with the
  operator's reason and message and the `kubectl` line to read the pods' logs; the job is kept for that.
- No end within `timeout_s` (the night's deadline) deletes the job and raises `DeadlinePassed`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from urllib3.exceptions import HTTPError

from pipeline.errors import DeadlinePassed, ServiceUnavailable, TrainingFailed
from pipeline.poll import wait_until

log = logging.getLogger("flywheel.k8s")
SUCCEEDED = frozenset({"Succeeded", "Complete"})
FAILED = frozenset({"Failed"})
API = {"PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs"),
       "TrainJob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs")}
REQUEST_TIMEOUT_S = 30  # an API server that accepts but never answers must not hold the night
JOB_LABEL = {"PyTorchJob": "training.kubeflow.org/job-name", "TrainJob": "jobset.sigs.k8s.io/jobset-name"}


def custom_objects_api() -> Any:
    """The API of the cluster this process runs in, else the current kubeconfig context."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:  # KUBECONFIG read now: the client's own default is read once, at import
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        except (config.ConfigException, FileNotFoundError) as e:
            raise ServiceUnavailable(f"no Kubernetes cluster to submit the training job to ({e}): run inside the "
                                     "cluster or set KUBECONFIG, or set FLYWHEEL_CLUSTER__RUNNER=local") from e
    return client.CustomObjectsApi()


def condition(job: dict) -> tuple[str, str, str]:
    """The job's verdict (a true Failed, else Succeeded/Complete), else its newest true condition: (type, reason,
    message); ("Pending", "", "") before the first."""
    found = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    if not found:
        return "Pending", "", ""
    terminal = [c for kinds in (FAILED, SUCCEEDED) for c in found if c.get("type") in kinds]
    last = terminal[0] if terminal else max(found, key=lambda c: (c.get("lastTransitionTime") or "",
                                                                   found.index(c)))
    return last.get("type", "?"), last.get("reason") or "", last.get("message") or ""


@dataclass
class JobRun:
    kind: str
    name: str
    namespace: str
    attached: bool
    seconds: float
    conditions: list[str] = field(default_factory=list)


class Launcher:
    def __init__(self, job: dict, api: Any = None) -> None:
        self.job, self.api = job, api if api is not None else custom_objects_api()
        self.kind = job["kind"]
        self.group, self.version, self.plural = API[self.kind]
        self.name, self.namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        self.seen: list[str] = []

    def _call(self, method: str, *args: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return getattr(self.api, method)(self.group, self.version, self.namespace, self.plural, *args,
                                             _request_timeout=REQUEST_TIMEOUT_S)
        except HTTPError as e:
            raise ServiceUnavailable(f"the Kubernetes API does not answer ({e})") from e
        except ApiException as e:
            if e.status == 409 or (e.status == 404 and method != "create_namespaced_custom_object"):
                raise
            hint = (f" (is the {self.kind} custom resource installed? see infra/README.md)" if e.status == 404
                    else " (the task's service account needs create/get/delete on it)" if e.status == 403 else "")
            raise TrainingFailed(f"the Kubernetes API refused {method} of {self.kind} {self.namespace}/{self.name}: "
                                 f"HTTP {e.status} {e.reason}{hint}: {(e.body or '')[:500]}") from e

    def submit(self) -> bool:
        """Create the job; True when an existing one (still running or done) is attached to instead."""
        from kubernetes.client.exceptions import ApiException

        try:
            self._call("create_namespaced_custom_object", self.job)
            log.info("submitted %s %s/%s", self.kind, self.namespace, self.name)
            return False
        except ApiException as e:
            if e.status != 409:
                raise
        state, reason, _ = condition(self._call("get_namespaced_custom_object", self.name))
        if state not in FAILED:
            log.info("attaching to %s %s/%s (%s)", self.kind, self.namespace, self.name, state)
            return True
        log.warning("replacing %s %s/%s, which failed (%s): the new job resumes from the staged checkpoints",
                    self.kind, self.namespace, self.name, reason)
        self._call("delete_namespaced_custom_object", self.name)
        wait_until(self._gone, 120, 1.0, lambda: TrainingFailed(f"{self.kind} {self.name} was not deleted"))
        self._call("create_namespaced_custom_object", self.job)
        return False

    def _gone(self) -> bool | None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._call("get_namespaced_custom_object", self.name)
        except ApiException as e:
            if e.status == 404:
                return True
            raise
        return None

    def look(self) -> str | None:
        """One look at the job: its final state, or None while it is not over (logging what changed)."""
        try:
            state, reason, message = condition(self._call("get_namespaced_custom_object", self.name))
        except ServiceUnavailable as e:  # a blip of the API server is not the job's verdict
            log.warning("%s; looking again in a moment", e)
            return None
        if not self.seen or self.seen[-1] != state:
            self.seen.append(state)
            if state == "Suspended":
                log.info("%s %s waits for capacity: Kueue admits it when its ClusterQueue has quota (`kubectl get "
                         "workloads -n %s` says why it waits)", self.kind, self.name, self.namespace)
            else:
                log.info("%s %s: %s%s", self.kind, self.name, state, f" ({reason}: {message})" if reason else "")
        if state in FAILED:
            raise TrainingFailed(f"{self.kind} {self.namespace}/{self.name} failed: {reason}: {message}; its pods "
                                 f"are kept: kubectl logs -n {self.namespace} -l {JOB_LABEL[self.kind]}={self.name}")
        return state if state in SUCCEEDED else None

    def run(self, timeout_s: float, poll_s: float) -> JobRun:
        t0 = time.monotonic()
        attached = self.submit()

        def too_late() -> DeadlinePassed:
            self._call("delete_namespaced_custom_object", self.name)
            return DeadlinePassed(f"{self.kind} {self.name} did not finish within the night's {timeout_s:.0f} s "
                                  f"(last state: {self.seen[-1] if self.seen else 'never seen'}); deleted")

        wait_until(self.look, timeout_s, poll_s, too_late)
        return JobRun(self.kind, self.name, self.namespace, attached, time.monotonic() - t0, list(self.seen))
