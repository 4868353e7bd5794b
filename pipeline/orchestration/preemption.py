"""Preempted or failed? How the nightly `train` task reads a finished training pod or process.

On a shared cluster a low-priority training pod is taken away as a matter of course: the scheduler preempts it for
higher-priority work (`DisruptionTarget` condition, reason `PreemptionByScheduler`), the kubelet evicts it under
node pressure (`status.reason: Evicted`), a tainted or drained node deletes it (`DeletionByTaintManager`,
`EvictionByEvictionAPI`), a node shuts down (`Shutdown`, `NodeLost`), or its container simply gets SIGTERM then
SIGKILL (exit 143 / 137). None of that says anything about the job, so the task retries and the retry resumes from
the newest checkpoint, for as long as the night's deadline allows. Everything else (a non-zero exit of the trainer
itself, an OOM kill, which also exits 137 but would happen again) fails the task at once.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pipeline.errors import DeadlinePassed, FlywheelError, Preempted, TrainingFailed

PREEMPTED_EXIT_CODES = frozenset({128 + signal.SIGTERM, 128 + signal.SIGKILL, -signal.SIGTERM, -signal.SIGKILL})
PREEMPTED_REASONS = frozenset({
    "Preempted", "PreemptionByScheduler", "PreemptionByKubeScheduler", "Evicted", "EvictionByEvictionAPI",
    "DeletionByTaintManager", "DeletionByPodGC", "TerminationByKubelet", "Shutdown", "NodeShutdown", "NodeLost",
    "NodeAffinity", "Terminated",
})
FAILED_REASONS = frozenset({"OOMKilled", "ContainerCannotRun", "DeadlineExceeded", "CreateContainerError",
                            "ImagePullBackOff", "ErrImagePull", "InvalidImageName"})


def classify(exit_code: int | None, reasons: Iterable[str], detail: str = "") -> FlywheelError:
    """`Preempted` when the exit code or a reason says the work was taken away, else `TrainingFailed`."""
    found = [r for r in reasons if r]
    failed = [r for r in found if r in FAILED_REASONS]
    preempted = [r for r in found if r in PREEMPTED_REASONS]
    where = f" ({detail})" if detail else ""
    if failed and not preempted:
        return TrainingFailed(f"training failed: {', '.join(failed)}, exit code {exit_code}{where}")
    if preempted or exit_code in PREEMPTED_EXIT_CODES:
        why = ", ".join(preempted) or f"killed by signal (exit code {exit_code})"
        return Preempted(f"training was preempted: {why}{where}; retrying from the newest checkpoint")
    return TrainingFailed(f"training failed with exit code {exit_code}{', ' + ', '.join(found) if found else ''}"
                          f"{where}")


def pod_outcome(pod: dict[str, Any], container: str) -> tuple[int | None, list[str]]:
    """The container's exit code and every reason the pod gives (status, DisruptionTarget condition, container)."""
    status = pod.get("status") or {}
    reasons = [status.get("reason") or ""]
    reasons += [c.get("reason") or "" for c in status.get("conditions") or [] if c.get("type") == "DisruptionTarget"]
    code = None
    for cs in status.get("container_statuses") or status.get("containerStatuses") or []:
        if cs.get("name") != container:
            continue
        term = (cs.get("state") or {}).get("terminated") or (cs.get("last_state") or cs.get("lastState") or {}
                                                              ).get("terminated")
        if term:
            code = term.get("exit_code", term.get("exitCode"))
            reasons.append(term.get("reason") or "")
    return code, [r for r in reasons if r]


def classify_pod(pod: dict[str, Any] | None, container: str) -> FlywheelError:
    """Classify a finished pod (a dict as the API returns it); a pod that is gone was deleted under us."""
    if not pod:
        return Preempted("the training pod disappeared (deleted by preemption or a node drain); retrying")
    name = (pod.get("metadata") or {}).get("name", "")
    code, reasons = pod_outcome(pod, container)
    return classify(code, reasons, f"pod {name}")


def check_deadline(now: datetime, deadline: datetime, error: FlywheelError | None = None) -> None:
    """Raise `DeadlinePassed` once the night is over, whatever the error, so a preemption never retries forever."""
    if now >= deadline:
        cause = f" (last attempt: {error})" if error else ""
        raise DeadlinePassed(f"the night's training deadline {deadline.isoformat()} has passed{cause}")
