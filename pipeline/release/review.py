"""Human review: in `promotion_mode=review` a candidate that passed its gate waits for a reviewer's decision,
which lives on the model version itself as the tag `flywheel.approval` = `approved` | `rejected` (set in the
MLflow UI, or with `flywheel approve|reject`). The registry is the record: who decided and when are tags too.

MLflow does not record which user edited a tag, so a reviewer using the UI should also set `flywheel.approver`;
the CLI sets both. When the DAG observes the decision it stamps `flywheel.approval_observed_at`.
"""

from __future__ import annotations

import getpass
from datetime import UTC, datetime

from pydantic import BaseModel

from pipeline import registry
from pipeline.errors import StageError
from pipeline.runtime import Runtime, runtime
from pipeline.tags import Tag

APPROVED, REJECTED = "approved", "rejected"
DECISIONS = (APPROVED, REJECTED)


class ReviewResult(BaseModel):
    version: str
    mode: str
    decision: str | None
    approver: str | None
    decided_at: str | None
    waited: bool


def decision_of(tags: dict[str, str]) -> str | None:
    """The reviewer's decision, or None while pending. A typo is an error, not silently 'pending' forever."""
    raw = tags.get(Tag.APPROVAL)
    if raw is None or not raw.strip():
        return None
    value = raw.strip().lower()
    if value not in DECISIONS:
        raise StageError(f"tag {Tag.APPROVAL}={raw!r} on the version: expected 'approved' or 'rejected'")
    return value


def decide(version: str, decision: str, by: str | None = None, note: str = "",
           rt: Runtime | None = None) -> ReviewResult:
    """Record a reviewer's decision on a version (what the UI tag edit does, plus who and when)."""
    if decision not in DECISIONS:
        raise StageError(f"decision must be one of {DECISIONS}, got {decision!r}")
    rt = rt or runtime()
    client = rt.client()
    mv = registry.get_version(client, rt.model_name, version)
    if mv.tags.get(Tag.GATE_PASSED) != "true" and decision == APPROVED:
        raise StageError(f"v{version} did not pass its gate ({mv.tags.get('flywheel.gate_reason', 'no decision')});"
                         " approval cannot override the gate")
    by = by or getpass.getuser()
    at = datetime.now(UTC).isoformat()
    for key, value in {Tag.APPROVAL: decision, Tag.APPROVER: by, Tag.APPROVAL_AT: at,
                       Tag.APPROVAL_NOTE: note[:4900]}.items():
        client.set_model_version_tag(rt.model_name, version, key, value)
    return ReviewResult(version=version, mode=rt.settings.promotion_mode, decision=decision, approver=by,
                        decided_at=at, waited=False)


def request_review(version: str, rt: Runtime | None = None) -> ReviewResult:
    """Start of the wait: auto mode and failed gates need no reviewer; otherwise stamp the request time."""
    rt = rt or runtime()
    client = rt.client()
    mv = registry.get_version(client, rt.model_name, version)
    mode = rt.settings.promotion_mode
    if mode == "auto" or mv.tags.get(Tag.GATE_PASSED) != "true":
        return ReviewResult(version=version, mode=mode, decision=None, approver=None, decided_at=None, waited=False)
    if Tag.REVIEW_REQUESTED_AT not in mv.tags:
        client.set_model_version_tag(rt.model_name, version, Tag.REVIEW_REQUESTED_AT, datetime.now(UTC).isoformat())
    return observe(version, rt, stamp=False)


def observe(version: str, rt: Runtime | None = None, stamp: bool = True) -> ReviewResult:
    """Read the version's decision; once there is one, record when the loop saw it."""
    rt = rt or runtime()
    client = rt.client()
    tags = registry.get_version(client, rt.model_name, version).tags
    decision = decision_of(tags)
    if decision is not None and stamp and Tag.APPROVAL_OBSERVED_AT not in tags:
        client.set_model_version_tag(rt.model_name, version, Tag.APPROVAL_OBSERVED_AT, datetime.now(UTC).isoformat())
    return ReviewResult(version=version, mode=rt.settings.promotion_mode, decision=decision,
                        approver=tags.get(Tag.APPROVER) if decision else None,
                        decided_at=tags.get(Tag.APPROVAL_AT) if decision else None, waited=True)
