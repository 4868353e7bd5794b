"""Rollback: put the `previous` champion back in one step, by hand (`flywheel rollback`, the flywheel_rollback
DAG) or automatically (online evaluation). The model server follows the alias, so this is the whole rollback.

The move is `registry.restore_previous`: the same guarded move as promotion (a compare-and-set under the lock,
the ledger entry written in it): a rollback decided about champion vX never
demotes a vY that another run promoted in the meantime. `previous` is cleared afterwards, so a second rollback
cannot flip back to the version just rolled back, and that version is tagged so it is never promoted again.
"""

from __future__ import annotations

import logging
import os

from pydantic import BaseModel

from pipeline import registry
from pipeline.errors import AliasConflict, StageError
from pipeline.release.review_card import refresh_cards
from pipeline.runtime import Runtime, runtime

log = logging.getLogger("flywheel.rollback")


class RollbackResult(BaseModel):
    rolled_back: str
    restored: str
    reason: str
    by: str
    at: str


def rollback(reason: str = "manual rollback", expected_champion: str | None = None, by: str | None = None,
             rt: Runtime | None = None) -> RollbackResult:
    """Restore `previous` as `champion`. With `expected_champion`, refuse unless that is still the champion."""
    if not reason.strip():
        raise StageError("a rollback needs a reason; it is recorded on both versions")
    rt = rt or runtime()
    by = by or f"manual (pid {os.getpid()})"
    try:
        champion, previous, at = registry.restore_previous(
            rt.client(), rt.model_name, reason, by, automatic=by == "online_eval", expected=expected_champion,
            stale_s=rt.settings.promotion.alias_lock_stale_s)
    except AliasConflict as e:
        raise StageError(str(e)) from e
    refresh_cards(rt, champion.version, previous.version)
    log.warning("rolled back %s: v%s -> v%s (%s)", rt.model_name, champion.version, previous.version, reason)
    return RollbackResult(rolled_back=champion.version, restored=previous.version, reason=reason, by=by, at=at)
