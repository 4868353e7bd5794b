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
from pipeline.tags import Tag, Why

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
    """Record a reviewer's decision on a version (what the UI tag edit does, plus who and when). A rejection
    takes `challenger` off the version at once, so it serves no more canary traffic."""
    if decision not in DECISIONS:
        raise StageError(f"decision must be one of {DECISIONS}, got {decision!r}")
    rt = rt or runtime()
    client = rt.client()
    mv = registry.get_version(client, rt.model_name, version)
    if mv.tags.get(Tag.GATE_PASSED) != "true" and decision == APPROVED:
        raise StageError(f"v{version} did not pass its gate ({mv.tags.get('flywheel.gate_reason', 'no decision')});"
                         " approval cannot override the gate")
    if decision == APPROVED and decision_of(mv.tags) == REJECTED:
        raise StageError(f"v{version} was rejected by {mv.tags.get(Tag.APPROVER) or 'a reviewer'}; a rejection is "
                         "final here (train or register a new candidate)")
    by = by or getpass.getuser()
    at = datetime.now(UTC).isoformat()
    for key, value in {Tag.APPROVAL: decision, Tag.APPROVER: by, Tag.APPROVAL_AT: at,
                       Tag.APPROVAL_NOTE: note[:4900]}.items():
        client.set_model_version_tag(rt.model_name, version, key, value)
    _apply(rt, version, decision, by, note)
    return ReviewResult(version=version, mode=rt.settings.promotion.mode, decision=decision, approver=by,
                        decided_at=at, waited=False)


def _apply(rt: Runtime, version: str, decision: str, by: str, note: str) -> None:
    """What a decision does besides the tags: a rejection clears `challenger` (ledger entry); both update the
    version's status line and review card."""
    from pipeline.release.review_card import refresh_cards

    client = rt.client()
    if decision == REJECTED:
        registry.clear_challenger(client, rt.model_name, version, Why.REJECTION, by,
                                  f"rejected by {by}" + (f": {note}" if note else ""), rt.settings.promotion.alias_lock_stale_s)
    status = "approved, waiting for promotion" if decision == APPROVED else "rejected: never promoted"
    client.set_model_version_tag(rt.model_name, version, Tag.STATUS, f"{status} (by {by})")
    refresh_cards(rt, version)


def request_review(version: str, rt: Runtime | None = None) -> ReviewResult:
    """Start of the wait: auto mode and failed gates need no reviewer; otherwise stamp the request time. The
    deadline counts from that stamp, so a retried task keeps its clock; after a timeout (the stamp
    `review_timed_out_at`), running the task again (clearing it in Airflow) starts a fresh wait."""
    rt = rt or runtime()
    client = rt.client()
    mv = registry.get_version(client, rt.model_name, version)
    mode = rt.settings.promotion.mode
    if mode == "auto" or mv.tags.get(Tag.GATE_PASSED) != "true":
        return ReviewResult(version=version, mode=mode, decision=None, approver=None, decided_at=None, waited=False)
    restart = Tag.REVIEW_TIMED_OUT_AT in mv.tags and decision_of(mv.tags) is None
    if restart:
        client.delete_model_version_tag(rt.model_name, version, Tag.REVIEW_TIMED_OUT_AT)
        registry.set_challenger(client, rt.model_name, version, "review (waiting again)",
                                rt.settings.promotion.alias_lock_stale_s)
    if restart or Tag.REVIEW_REQUESTED_AT not in mv.tags:
        from pipeline.release.review_card import refresh_cards

        client.set_model_version_tag(rt.model_name, version, Tag.STATUS, "waiting for review")
        refresh_cards(rt, version)  # before the stamp: the clock starts when the request is visible, not earlier
        client.set_model_version_tag(rt.model_name, version, Tag.REVIEW_REQUESTED_AT, datetime.now(UTC).isoformat())
    return observe(version, rt, stamp=False)


def expire(version: str, rt: Runtime | None = None) -> ReviewResult:
    """No decision before the deadline: the version loses `challenger` (no canary traffic, never promoted
    until re-reviewed); running the review task again waits anew."""
    from pipeline.release.review_card import refresh_cards

    rt = rt or runtime()
    client = rt.client()
    if decision_of(registry.get_version(client, rt.model_name, version).tags) is not None:
        return observe(version, rt)  # decided in the last poll interval: the decision wins over the clock
    at = datetime.now(UTC).isoformat()
    client.set_model_version_tag(rt.model_name, version, Tag.REVIEW_TIMED_OUT_AT, at)
    client.set_model_version_tag(rt.model_name, version, Tag.STATUS,
                                 "review timed out: not promoted (clear the await_approval task to wait again)")
    registry.clear_challenger(client, rt.model_name, version, Why.REVIEW_TIMEOUT, "review",
                              f"no decision by {at[:16]}Z", rt.settings.promotion.alias_lock_stale_s)
    refresh_cards(rt, version)
    return ReviewResult(version=version, mode=rt.settings.promotion.mode, decision=None, approver=None,
                        decided_at=None, waited=True)


def observe(version: str, rt: Runtime | None = None, stamp: bool = True) -> ReviewResult:
    """Read the version's decision. A decision set only as a UI tag has no time or reviewer of its own: the
    first observation records when it was seen (`approval_at`, marked as observed) and applies it."""
    rt = rt or runtime()
    client = rt.client()
    tags = registry.get_version(client, rt.model_name, version).tags
    decision = decision_of(tags)
    decided_at = tags.get(Tag.APPROVAL_AT)
    if decision is not None and not decided_at:
        decided_at = datetime.now(UTC).isoformat()
        client.set_model_version_tag(rt.model_name, version, Tag.APPROVAL_AT, decided_at)
        client.set_model_version_tag(rt.model_name, version, Tag.APPROVAL_NOTE,
                                     (tags.get(Tag.APPROVAL_NOTE) or "") + " (set in the MLflow UI; time observed)")
        _apply(rt, version, decision, tags.get(Tag.APPROVER) or "unknown (MLflow UI)", "")
    if decision is not None and stamp and Tag.APPROVAL_OBSERVED_AT not in tags:
        client.set_model_version_tag(rt.model_name, version, Tag.APPROVAL_OBSERVED_AT, datetime.now(UTC).isoformat())
    return ReviewResult(version=version, mode=rt.settings.promotion.mode, decision=decision,
                        approver=(tags.get(Tag.APPROVER) or "unknown (MLflow UI)") if decision else None,
                        decided_at=decided_at if decision else None, waited=True)
