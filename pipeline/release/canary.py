"""Canary decision: the challenger serves a sticky share of live traffic (see the server's `canary_share`);
once its labels arrive it is compared with the champion on the rows it served, the champion re-scored
offline on the same logged features, and it is promoted, retired, or left waiting for more evidence."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime

from pydantic import BaseModel

from pipeline import registry
from pipeline.errors import StageError
from pipeline.release.online_eval import Comparison, compare, window
from pipeline.runtime import Runtime, parse_day, runtime
from pipeline.tags import Alias, Tag

log = logging.getLogger("flywheel.canary")


class CanaryResult(BaseModel):
    day: str
    champion: str | None
    challenger: str | None
    decision: str  # no_canary | wait | promoted | retired
    reason: str
    comparison: Comparison | None = None


def canary_eval(day: str | date, rt: Runtime | None = None) -> CanaryResult:
    rt = rt or runtime()
    day = parse_day(day)
    client = rt.client()
    name = rt.model_name
    champion = registry.get_alias(client, name, Alias.CHAMPION)
    challenger = registry.get_alias(client, name, Alias.CHALLENGER)
    if champion is None:
        raise StageError(f"{name} has no champion: run `flywheel bootstrap` first")
    base = {"day": day.isoformat(), "champion": champion.version,
            "challenger": challenger.version if challenger else None}
    if challenger is None or challenger.version == champion.version:
        return CanaryResult(**base, decision="no_canary", reason="no challenger distinct from the champion")
    c = compare(rt, client, window(rt, day), challenger.version, champion.version)
    if not c.enough:
        result = CanaryResult(**base, decision="wait", reason=c.detail, comparison=c)
    elif c.worse:
        client.delete_registered_model_alias(name, Alias.CHALLENGER)
        result = CanaryResult(**base, decision="retired", comparison=c,
                              reason=f"challenger v{challenger.version} worse than champion {c.detail}")
    elif c.at_least_as_good:
        registry.move_champion(client, name, challenger.version, expected=champion.version, owner="canary_eval",
                               stale_s=rt.settings.alias_lock_stale_s)
        result = CanaryResult(**base, decision="promoted", comparison=c,
                              reason=f"challenger v{challenger.version} at least as good as champion {c.detail}")
    else:
        result = CanaryResult(**base, decision="wait", comparison=c,
                              reason=f"no clear difference yet {c.detail}")
    client.set_model_version_tag(name, challenger.version, Tag.CANARY,
                                 f"{result.decision} at {datetime.now(UTC).isoformat()}: {result.reason}"[:4900])
    log.info("canary %s", result.decision, extra={"challenger": challenger.version, "champion": champion.version})
    return result
