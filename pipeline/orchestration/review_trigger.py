"""Waiting for a reviewer without holding a worker slot: the `await_approval` task checks once, then defers to
`ApprovalTrigger`, which polls the model version's tags from the triggerer's event loop (the blocking MLflow
call runs in a thread) until a decision appears or the deadline passes. The deadline is absolute and derived
from the version's `flywheel.review_requested_at` tag, so a retried task or a restarted triggerer does not
restart the clock; after a timeout (`flywheel.review_timed_out_at`), clearing the task starts a fresh wait. Only Airflow itself is imported at module level; MLflow is imported inside the calls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator
from airflow.triggers.base import BaseTrigger, TriggerEvent

from pipeline.tags import Tag


class ApprovalTrigger(BaseTrigger):
    """Carries the registry address and model name itself: the triggerer may run with other settings."""

    def __init__(self, version: str, deadline: float, poll_interval_s: float, model_name: str,
                 tracking_uri: str) -> None:
        super().__init__()
        self.version = version
        self.deadline = deadline
        self.poll_interval_s = poll_interval_s
        self.model_name = model_name
        self.tracking_uri = tracking_uri

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"version": self.version, "deadline": self.deadline, "poll_interval_s": self.poll_interval_s,
                 "model_name": self.model_name, "tracking_uri": self.tracking_uri})

    def _tags(self) -> dict[str, str]:
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri, self.tracking_uri)
        return dict(client.get_model_version(self.model_name, self.version).tags or {})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from pipeline.errors import StageError
        from pipeline.release.review import decision_of

        while True:
            try:
                decision = decision_of(await asyncio.to_thread(self._tags))
            except StageError as e:  # a malformed decision tag: report it rather than wait forever
                yield TriggerEvent({"status": "error", "version": self.version, "message": str(e)})
                return
            except Exception as e:  # registry briefly unreachable: keep waiting until the deadline
                self.log.warning("could not read v%s's tags (%s); retrying", self.version, e)
                decision = None
            if decision is not None:
                yield TriggerEvent({"status": "decided", "version": self.version, "decision": decision})
                return
            left = self.deadline - time.time()
            if left <= 0:
                yield TriggerEvent({"status": "timeout", "version": self.version})
                return
            await asyncio.sleep(min(self.poll_interval_s, left))


def review_deadline(requested_at: str | None, timeout_s: float) -> float:
    from datetime import datetime

    start = datetime.fromisoformat(requested_at).timestamp() if requested_at else time.time()
    return start + timeout_s


class AwaitApprovalOperator(BaseOperator):
    """In auto mode (or for a candidate that failed its gate) this returns at once; in review mode it defers
    until the reviewer's decision. Returns the ReviewResult as a dict."""

    template_fields = ("registered",)

    def __init__(self, *, registered: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.registered = registered

    def execute(self, context: Any) -> dict:
        from pipeline import registry
        from pipeline.release.review import request_review
        from pipeline.runtime import runtime

        version = str(self.registered["version"])
        result = self._call(request_review, version)
        if result["mode"] == "auto" or not result["waited"] or result["decision"] is not None:
            return self._finish(version, result)
        rt = runtime()
        tags = registry.get_version(rt.client(), rt.model_name, version).tags
        s = rt.settings
        deadline = review_deadline(tags.get(Tag.REVIEW_REQUESTED_AT), s.promotion.approval_timeout_s)
        self.log.info("v%s waits for review: set tag flywheel.approval=approved|rejected on the version "
                      "(MLflow UI) or run `flywheel approve --version %s`; deadline in %.0fs",
                      version, version, deadline - time.time())
        self.defer(trigger=ApprovalTrigger(version, deadline, s.promotion.approval_poll_interval_s, rt.model_name,
                                           s.mlflow_tracking_uri),
                   method_name="execute_complete", timeout=timedelta(seconds=s.promotion.approval_timeout_s + 600))

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from pipeline.release.review import expire, observe

        version = event["version"]
        if event["status"] == "timeout":
            late = self._call(expire, version)
            if late["decision"] is not None:
                return self._finish(version, late)
            raise AirflowFailException(f"no review decision on v{version} before the approval timeout; not "
                                       "promoted and its challenger alias cleared (clear this task to wait again: "
                                       "the wait restarts from then)")
        if event["status"] == "error":
            raise AirflowFailException(event["message"])
        return self._finish(version, self._call(observe, version))

    def _finish(self, version: str, result: dict) -> dict:
        if result["decision"] is not None:
            self.log.info("v%s %s by %s at %s", version, result["decision"], result["approver"], result["decided_at"])
        return result

    @staticmethod
    def _call(fn: Any, *args: Any) -> dict:
        from pipeline.orchestration.airflow_tasks import _stage

        return _stage(fn, *args)
