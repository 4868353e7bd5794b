"""Loop health: how many nights the loop has gone without training and without a promotion.

A loop can fail quietly: a gate that fails every night, or a candidate vetoed every night, leaves the server
serving an ever older model while each night's task log only says "gate failed". These counts make that a
first-class signal: a line in every nightly result, a warning after `loop_health_warn_nights`, a failure after
`loop_health_fail_nights` that calls the user's alert hook (`loop_health_callback`, an Airflow
`on_failure_callback`-style callable taking a context dict), and Prometheus gauges written as a textfile for
node_exporter's textfile collector.

A stream of a few dozen rows a day trains only every few nights, when the days since its last training add up to
`validation.min_rows` (`stages/train.py::pool`). Those nights are waiting, not stuck: every one of them was
collected and validated, there are just not enough rows yet. They are counted and reported, and warn past
`warn_nights`, but never fail: on the email stream a count that did not tell them apart paged on 8 of 49 nights
of a loop that was working as configured (bench/results/backtest.md, round 8). A night whose day is missing or
failed validation is not waiting, so a stream that stops still pages.

Pure functions over dates; the registry read lives in `pipeline.stages.nightly`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from pipeline.config import Settings, knob
from pipeline.tags import Tag

log = logging.getLogger("flywheel.loop_health")
Status = Literal["ok", "warn", "fail"]
METRICS_FILE = "flywheel_loop_health.prom"


class LoopHealth(BaseModel):
    day: str
    status: Status
    nights_without_training: int
    nights_without_promotion: int
    last_trained_day: str | None
    champion_version: str | None
    champion_data_day: str | None
    message: str
    waiting_rows: int | None = None  # labeled rows since the last training while fewer than min_rows, else None


def data_age_s(tags: dict[str, str], now: datetime | None = None) -> float | None:
    """Seconds since the end of the last day of data a model version was trained on (its `flywheel.data_day`
    tag): how stale what the server answers with is. None for a version without the tag."""
    day = tags.get(Tag.DAY)
    if not day:
        return None
    end = datetime.combine(date.fromisoformat(day) + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    return max(0.0, ((now or datetime.now(UTC)) - end).total_seconds())


def last_trained(day: date, trained_days: Iterable[date]) -> date | None:
    return max((d for d in trained_days if d <= day), default=None)


def assess(day: date, trained_days: Iterable[date], champion_version: str | None, champion_day: date | None,
           warn_nights: int, fail_nights: int, waiting_rows: int | None = None, min_rows: int = 0) -> LoopHealth:
    """The loop's state after night `day`: nights since the newest day a model was trained on (any registered
    version, promoted or not, up to `day`) and since the day the champion was trained on. Nights the DAG did
    not run at all count too: that is a loop that stopped as well. `waiting_rows` (not None) says every night
    since the last training validated its day and together they hold fewer than `min_rows`: those nights warn
    at most (see the module docstring)."""
    last = last_trained(day, trained_days)
    no_training = (day - last).days if last else None
    no_promotion = (day - champion_day).days if champion_day and champion_day <= day else None
    waiting = (no_training or 0) if waiting_rows is not None else 0
    worst = max(n - waiting for n in (no_training, no_promotion, waiting) if n is not None)
    if last is None or champion_day is None:
        worst = max(worst, fail_nights)
    status: Status = "fail" if worst >= fail_nights else "warn" if max(worst, waiting) >= warn_nights else "ok"
    message = (f"loop health {status} on {day}: {_nights(no_training)} without training (last trained on "
               f"{last or 'never'}), {_nights(no_promotion)} without a promotion (champion "
               f"v{champion_version or '-'} trained on {champion_day or 'never'})")
    if waiting:
        message += (f"; waiting for rows, not stuck: the {_nights(waiting)} since validated {waiting_rows} "
                    f"labeled rows, fewer than the {min_rows} a night trains on ({knob('min_rows')}; lower it to "
                    "train on fewer)")
    if status != "ok":
        message += (f"; warns at {warn_nights}, fails at {fail_nights} nights ({knob('loop_health_warn_nights')}, "
                    f"{knob('loop_health_fail_nights')}). Read the failed nights' validation and evaluation "
                    "reasons: each names the rule and the setting that held the loop back")
    return LoopHealth(day=day.isoformat(), status=status,
                      nights_without_training=no_training if no_training is not None else -1,
                      nights_without_promotion=no_promotion if no_promotion is not None else -1,
                      last_trained_day=last.isoformat() if last else None, champion_version=champion_version,
                      champion_data_day=champion_day.isoformat() if champion_day else None, message=message,
                      waiting_rows=waiting_rows if waiting else None)


def _nights(n: int | None) -> str:
    return "no record of a night" if n is None else f"{n} night{'' if n == 1 else 's'}"


def log_alert(context: dict) -> None:
    """The default `loop_health_callback`: an ERROR in the log. Point the setting at your pager's callable."""
    log.error("LOOP HEALTH FAILURE: %s", context.get("loop_health", {}).get("message", context))


def callback(s: Settings) -> Callable[[dict], object]:
    """The configured alert hook, resolved from its dotted path `package.module.callable`."""
    module, _, name = s.loop_health.callback.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{knob('loop_health_callback')} = {s.loop_health.callback!r} is not an importable "
                         f"callable: {e}") from e
    if not callable(fn):
        raise ValueError(f"{knob('loop_health_callback')} = {s.loop_health.callback!r} is not callable")
    return fn


def report(health: LoopHealth, s: Settings, context: dict | None = None, alert: bool = True) -> None:
    """Log the night's line at its level, write the gauges, and on failure call the alert hook (unless the
    caller leaves that to Airflow's on_failure_callback). A broken hook is logged, never allowed to hide the
    failure it was meant to announce."""
    level = {"ok": logging.INFO, "warn": logging.WARNING, "fail": logging.ERROR}[health.status]
    log.log(level, "%s", health.message)
    write_metrics(health, s.home_abs / "metrics" / METRICS_FILE)
    if health.status == "fail" and alert:
        try:
            callback(s)({**(context or {}), "loop_health": health.model_dump()})
        except Exception:
            log.exception("loop health alert hook %s failed; the failure was: %s", s.loop_health.callback,
                          health.message)


def write_metrics(health: LoopHealth, path: Path) -> None:
    """Gauges in the Prometheus text format, written atomically (temp file + rename) for node_exporter's
    textfile collector."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()
    for name, doc, value in (
        ("flywheel_loop_nights_without_training", "Nights since the newest day a model was trained on.",
         health.nights_without_training),
        ("flywheel_loop_nights_without_promotion", "Nights since the day the champion was trained on.",
         health.nights_without_promotion),
        ("flywheel_loop_health_status", "0 ok, 1 warn, 2 fail.", ["ok", "warn", "fail"].index(health.status)),
    ):
        Gauge(name, doc, registry=registry).set(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
