"""Canary decision: the challenger serves a sticky share of live traffic (see the server's `canary_share`);
once its labels arrive it is compared with the champion on the rows it served, the champion re-scored
offline on the same logged features, and it is promoted, retired, or left waiting for more evidence."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime

from pydantic import BaseModel

from pipeline import registry
from pipeline.errors import PromotionRefused, StageError
from pipeline.release.online_eval import Comparison, compare, window
from pipeline.release.review_card import refresh_cards
from pipeline.runtime import Runtime, parse_day, runtime
from pipeline.tags import Alias, Tag, Why

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
    review = rt.settings.promotion.mode == "review"
    refusal = registry.hard_refusal(challenger.tags)
    if refusal:  # rejected (perhaps by a UI tag the review task has not seen yet), rolled back, failed gate
        result = _retire(rt, challenger.version, base, f"challenger v{challenger.version} retired: {refusal}")
    else:
        result = _judge(rt, day, base, challenger, champion, review)
    client.set_model_version_tag(name, challenger.version, Tag.CANARY,
                                 f"{result.decision} at {datetime.now(UTC).isoformat()}: {result.reason}"[:4900])
    log.info("canary %s", result.decision, extra={"challenger": challenger.version, "champion": champion.version})
    return result


def _judge(rt: Runtime, day: date, base: dict, challenger, champion, review: bool) -> CanaryResult:
    c = compare(rt, rt.client(), window(rt, day), challenger.version, champion.version)
    if not c.enough:
        return CanaryResult(**base, decision="wait", reason=c.detail, comparison=c)
    if c.worse:
        return _retire(rt, challenger.version, base, f"challenger v{challenger.version} worse than champion "
                       f"{c.detail}", c)
    if not c.at_least_as_good:
        return CanaryResult(**base, decision="wait", comparison=c, reason=f"no clear difference yet {c.detail}")
    refusal = registry.champion_refusal(challenger.tags, review)
    if refusal:  # review mode: live evidence never replaces the reviewer
        return CanaryResult(**base, decision="wait", comparison=c,
                            reason=f"at least as good live, but not promoted: {refusal} {c.detail}")
    try:
        registry.move_champion(rt.client(), rt.model_name, challenger.version, expected=champion.version,
                               owner="canary_eval", stale_s=rt.settings.promotion.alias_lock_stale_s, why=Why.CANARY,
                               review=review, evaluation=c.detail[:400], note="at least as good on its canary rows")
    except PromotionRefused as e:
        return _retire(rt, challenger.version, base, str(e), c)
    refresh_cards(rt, challenger.version, champion.version)
    return CanaryResult(**base, decision="promoted", comparison=c,
                        reason=f"challenger v{challenger.version} at least as good as champion {c.detail}")


def _retire(rt: Runtime, version: str, base: dict, reason: str, c: Comparison | None = None) -> CanaryResult:
    registry.clear_challenger(rt.client(), rt.model_name, version, Why.CANARY, "canary_eval", reason[:600],
                              rt.settings.promotion.alias_lock_stale_s)
    return CanaryResult(**base, decision="retired", comparison=c, reason=reason)
