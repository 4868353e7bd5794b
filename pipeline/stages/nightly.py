"""The nightly sequence (`stages.sequence.NIGHTLY`) in-process, for `flywheel nightly` and for debugging a day
without Airflow. The DAG makes one task of each of the same stages and ends, like this, with the loop-health
line."""

from __future__ import annotations

import logging
from datetime import date, timedelta

from pydantic import BaseModel

from pipeline.checks.loop_health import LoopHealth, assess, last_trained, report
from pipeline.errors import NothingToTrain
from pipeline.preflight import model_server_down, require_mlflow
from pipeline.runtime import Runtime, parse_day, runtime
from pipeline.stages.promote import PromoteResult
from pipeline.stages.sequence import NIGHTLY
from pipeline.tags import Alias, Tag

log = logging.getLogger("flywheel.nightly")


def loop_health(day: str | date, rt: Runtime | None = None) -> LoopHealth:
    """Nights without training and without a promotion as of `day`, read from the registry: every registered
    version carries the day it was trained on, the champion alias the one serving."""
    from pipeline import registry

    rt = rt or runtime()
    day, s = parse_day(day), rt.settings
    client = rt.client()
    versions = client.search_model_versions(f"name = '{rt.model_name}'")
    trained = [date.fromisoformat(v.tags[Tag.DAY]) for v in versions if Tag.DAY in (v.tags or {})]
    champion = registry.get_alias(client, rt.model_name, Alias.CHAMPION)
    return assess(day, trained, champion.version if champion else None, champion.data_day if champion else None,
                  s.loop_health.warn_nights, s.loop_health.fail_nights,
                  waiting_rows(rt, last_trained(day, trained), day), s.validation.min_rows)


def waiting_rows(rt: Runtime, last: date | None, day: date) -> int | None:
    """The labeled rows validated on the nights after the last training up to `day`, when every one of those
    nights validated its day and together they are fewer than `min_rows` (the loop is waiting for rows, as
    `train.pool` does); None when any night's day is missing or failed, or there are enough (it is stuck)."""
    from pipeline.stages.validate import VALIDATED

    if last is None or last >= day:
        return None
    rows = 0
    for k in range(1, (day - last).days + 1):
        manifest = rt.lake.read_manifest(VALIDATED, last + timedelta(days=k))
        if manifest is None:
            return None
        rows += manifest["rows"]
    return rows if rows < rt.settings.validation.min_rows else None


def _stages(day: str | date, rt: Runtime, rollout: bool) -> dict:
    """`NIGHTLY` in order. Without Airflow there may be no model server, so rollout says so instead of failing
    (`roll_out_if_served`), and it runs only when asked for. A stage with nothing to train yet
    (`NothingToTrain`: a small day waiting for more) skips itself and every later stage, as Airflow skips the
    downstream tasks."""
    out: dict = {}
    waiting: str | None = None
    for stage in NIGHTLY:
        if waiting is not None:
            if stage.name != "rollout" or rollout:
                out[stage.name] = {"skipped": waiting}
        elif stage.name == "rollout":
            if rollout:
                out["rollout"] = roll_out_if_served(out["promote"], rt)
        elif why := stage.skip_reason(out):
            out[stage.name] = {"skipped": why}
        else:
            try:
                out[stage.name] = stage.run(day, out, rt)
            except NothingToTrain as e:
                log.info("%s", e)
                out[stage.name] = {"skipped": str(e)}
                waiting = f"nothing to train tonight ({stage.name}): {e}"
    return {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in out.items()}


def roll_out_if_served(promoted: PromoteResult, rt: Runtime) -> dict:
    """The DAG's rollout step: make a running model server serve the new champion now. Without a server there
    is nothing to roll out (one started later loads the champion), which is said, not raised."""
    from pipeline.stages.promote import rollout

    if not promoted.promoted:
        return {"skipped": f"no promotion ({promoted.reason}); the server keeps its model"}
    if why := model_server_down(rt.settings):
        return {"skipped": f"{why}; champion v{promoted.version} is in the registry and a model server "
                           "loads it when it starts"}
    return rollout(rt).model_dump()


def run_nightly(day: str | date, rt: Runtime | None = None, rollout: bool = False) -> dict:
    """The stages, then the loop-health line (logged, written as gauges, the alert hook called on failure),
    also when a stage refused: a failed night is exactly when the count matters."""
    rt = rt or runtime()
    require_mlflow(rt.settings, "nightly")
    try:
        out = _stages(day, rt, rollout)
    except Exception:
        try:
            report(loop_health(day, rt), rt.settings, {"day": str(day)})
        except Exception as e:  # the stage's own error is the one to raise
            log.error("loop health could not be read after the failed night %s: %s", day, e)
        raise
    health = loop_health(day, rt)
    report(health, rt.settings, {"day": str(day)})
    out["loop_health"] = health.model_dump()
    return out
