"""Promote and roll out: move `champion` to a version that passed its gate, then make sure the model server
actually serves it (the server also follows the alias on its own; this step waits and reports)."""

from __future__ import annotations

import logging
import os
import time

import httpx
from pydantic import BaseModel

from pipeline import registry
from pipeline.errors import AliasConflict, PromotionRefused, StageError
from pipeline.poll import wait_until
from pipeline.release.review_card import refresh_cards
from pipeline.runtime import Runtime, runtime
from pipeline.tags import Alias, Tag, Why

log = logging.getLogger("flywheel.promote")


class PromoteResult(BaseModel):
    version: str
    promoted: bool
    previous: str | None
    reason: str


class RolloutResult(BaseModel):
    version: str
    served_version: str | None
    seconds: float


def promote(version: str, rt: Runtime | None = None, owner: str | None = None) -> PromoteResult:
    """Move `champion` to a version that passed its gate (and, in review mode, was approved). The move is
    `registry.move_champion`, the one guarded move every path takes: a compare-and-set against the champion the
    candidate was trained from (of two runs racing to promote candidates of the same parent, exactly one moves
    the alias), refusing rejected, unapproved, rolled-back and gate-failed versions, written to the ledger."""
    rt = rt or runtime()
    s = rt.settings
    client = rt.client()
    mv = registry.get_version(client, rt.model_name, version)
    current = registry.get_alias(client, rt.model_name, Alias.CHAMPION)
    if current is not None and current.version == version:
        return PromoteResult(version=version, promoted=True, previous=current.tags.get(Tag.PARENT),
                             reason="already champion")
    review = s.promotion.mode == "review"
    refusal = registry.champion_refusal(mv.tags, review)
    if refusal:  # the guard says the same under the lock; asking first gives a result instead of an error
        log.warning("not promoting v%s: %s", version, refusal)
        refresh_cards(rt, version, current.version if current else None)
        return PromoteResult(version=version, promoted=False, previous=None, reason=refusal)
    why = Why.APPROVAL if review else Why.PROMOTION
    try:
        previous = registry.move_champion(client, rt.model_name, version, mv.tags.get(Tag.PARENT),
                                          owner or f"promote v{version} (pid {os.getpid()})", s.promotion.alias_lock_stale_s,
                                          why=why, review=review, note=_note(mv.tags, why))
    except PromotionRefused as e:
        return PromoteResult(version=version, promoted=False, previous=None, reason=str(e))
    except AliasConflict as e:
        raise StageError(str(e)) from e
    refresh_cards(rt, version, previous)
    return PromoteResult(version=version, promoted=True, previous=previous,
                         reason="approved by the reviewer" if review else "passed the gate")


def _note(tags: dict[str, str], why: str) -> str:
    if why == Why.APPROVAL:
        return f"approved by {tags.get(Tag.APPROVER) or 'the reviewer'}: {tags.get(Tag.GATE_REASON, '')}"[:600]
    return f"passed the gate: {tags.get(Tag.GATE_REASON, '')}"[:600]


def served_version(url: str) -> str | None:
    r = httpx.get(f"{url}/health", timeout=5)
    r.raise_for_status()
    return r.json().get("model_version")


def rollout(rt: Runtime | None = None) -> RolloutResult:
    """Ask the server to reload now and wait until it serves the registry's champion."""
    rt = rt or runtime()
    s = rt.settings
    champion = registry.get_alias(rt.client(), rt.model_name, Alias.CHAMPION)
    if champion is None:
        raise StageError(f"{rt.model_name} has no champion to roll out")
    url = s.resolved_serving_url()
    start = time.monotonic()
    try:
        httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {s.resolved_admin_token()}"},
                   timeout=30).raise_for_status()
        current = None

        def serves_champion() -> str | None:
            nonlocal current
            current = served_version(url)
            return current if current == champion.version else None

        wait_until(serves_champion, s.promotion.rollout_timeout_s, 0.5, lambda: StageError(
            f"server at {url} still serves v{current} {s.promotion.rollout_timeout_s}s after champion moved to "
            f"v{champion.version}; see the server's /health and log"))
    except httpx.HTTPError as e:
        raise StageError(f"model server at {url} not reachable for rollout ({e}); the registry's champion is "
                         f"v{champion.version} and the server loads it when it next polls the alias") from e
    return RolloutResult(version=champion.version, served_version=current, seconds=round(time.monotonic() - start, 3))
