"""Rollback: put the `previous` champion back in one step, by hand (`flywheel rollback`, the flywheel_rollback
DAG) or automatically (online evaluation). The model server follows the alias, so this is the whole rollback.

The move is a compare-and-set under the same lock as promotion: a rollback decided about champion vX never
demotes a vY that another run promoted in the meantime. `previous` is cleared afterwards, so a second rollback
cannot flip back to the version just rolled back, and that version is tagged so it is never promoted again.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime

from pydantic import BaseModel

from pipeline import registry
from pipeline.errors import AliasConflict, StageError
from pipeline.runtime import Runtime, runtime
from pipeline.tags import Alias, Tag

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
    client = rt.client()
    name = rt.model_name
    by = by or f"{os.environ.get('USER', 'unknown')} (pid {os.getpid()})"
    try:
        with registry.alias_lock(client, name, f"rollback by {by}", rt.settings.alias_lock_stale_s):
            champion = registry.get_alias(client, name, Alias.CHAMPION)
            previous = registry.get_alias(client, name, Alias.PREVIOUS)
            if champion is None:
                raise StageError(f"{name} has no champion: nothing to roll back")
            if expected_champion is not None and champion.version != expected_champion:
                raise StageError(f"champion of {name} is v{champion.version}, not v{expected_champion} as this "
                                 "rollback expected: it moved since the decision; not rolling back")
            if previous is None:
                raise StageError(f"{name} has no 'previous' version to restore (champion v{champion.version}); "
                                 "promote a known-good version with `flywheel promote` instead")
            if previous.version == champion.version:
                raise StageError(f"'previous' and 'champion' both point at v{champion.version}; nothing to restore")
            at = datetime.now(UTC).isoformat()
            client.set_registered_model_alias(name, Alias.CHAMPION, previous.version)
            registry.delete_alias(client, name, Alias.PREVIOUS)
            challenger = registry.get_alias(client, name, Alias.CHALLENGER)
            if challenger is not None and challenger.version == champion.version:
                registry.delete_alias(client, name, Alias.CHALLENGER)
            for key, value in {Tag.ROLLED_BACK: "true", Tag.ROLLBACK_REASON: reason[:4900], Tag.ROLLBACK_AT: at,
                               Tag.ROLLBACK_BY: by}.items():
                client.set_model_version_tag(name, champion.version, key, value)
            for key, value in {Tag.RESTORED_FROM: champion.version, Tag.ROLLBACK_AT: at,
                               Tag.ROLLBACK_REASON: reason[:4900]}.items():
                client.set_model_version_tag(name, previous.version, key, value)
    except AliasConflict as e:
        raise StageError(str(e)) from e
    log.warning("rolled back %s: v%s -> v%s (%s)", name, champion.version, previous.version, reason)
    return RollbackResult(rolled_back=champion.version, restored=previous.version, reason=reason, by=by, at=at)
