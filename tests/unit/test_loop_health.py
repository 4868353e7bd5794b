"""Loop health as a pure function of dates, its gauges, its alert hook, and the served model's data age."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta

import pytest

from pipeline.checks.loop_health import METRICS_FILE, assess, callback, data_age_s, report
from pipeline.tags import Tag
from tests.helpers import make_settings

D = date(2026, 6, 10)
ALERTS: list[dict] = []


def record_alert(context: dict) -> None:
    """A user's hook, as `loop_health_callback` names it."""
    ALERTS.append(context)


def days_before(*ns: int) -> list[date]:
    return [D - timedelta(days=n) for n in ns]


def test_counts_and_status_by_nights():
    ok = assess(D, days_before(0, 1, 2), "7", D, warn_nights=2, fail_nights=5)
    assert (ok.status, ok.nights_without_training, ok.nights_without_promotion) == ("ok", 0, 0)
    # trained every night, but the gate kept the champion from three nights ago: a stuck loop too
    vetoed = assess(D, days_before(0, 1, 2, 3), "4", D - timedelta(days=3), 2, 5)
    assert (vetoed.status, vetoed.nights_without_training, vetoed.nights_without_promotion) == ("warn", 0, 3)
    assert "FLYWHEEL_LOOP_HEALTH__WARN_NIGHTS" in vetoed.message and "champion v4" in vetoed.message
    # the validation gate failed the last five nights: no training, no promotion
    frozen = assess(D, days_before(5, 6), "2", D - timedelta(days=5), 2, 5)
    assert (frozen.status, frozen.nights_without_training) == ("fail", 5)
    # a later version (a backfill run ahead) does not hide the nights before `day`
    assert assess(D, [*days_before(4), D + timedelta(days=3)], "2", D - timedelta(days=4), 2, 5).status == "warn"
    never = assess(D, [], None, None, 2, 5)
    assert never.status == "fail" and never.nights_without_training == -1 and "never" in never.message


def test_nights_waiting_for_rows_warn_but_never_page():
    """A small stream trains when its days add up to min_rows: the nights between are waiting, not stuck."""
    waiting = assess(D, days_before(7), "3", D - timedelta(days=7), 2, 5, waiting_rows=140, min_rows=200)
    assert (waiting.status, waiting.nights_without_training, waiting.waiting_rows) == ("warn", 7, 140)
    assert "waiting for rows, not stuck" in waiting.message and "140 labeled rows" in waiting.message
    assert "FLYWHEEL_VALIDATION__MIN_ROWS" in waiting.message
    assert assess(D, days_before(1), "3", D - timedelta(days=1), 2, 5, waiting_rows=30, min_rows=200).status == "ok"
    # the nights before the last training still count: a candidate held for four nights, then three waiting
    held = assess(D, days_before(3, 7), "2", D - timedelta(days=7), 2, 5, waiting_rows=90, min_rows=200)
    assert (held.status, held.nights_without_promotion) == ("warn", 7)
    stuck = assess(D, days_before(3, 9), "2", D - timedelta(days=9), 2, 5, waiting_rows=90, min_rows=200)
    assert stuck.status == "fail"  # six nights held before the waiting began
    assert assess(D, days_before(7), "3", D - timedelta(days=7), 2, 5).status == "fail"  # not waiting: stuck


def test_report_writes_gauges_and_calls_the_hook_only_on_failure(tmp_path, caplog):
    ALERTS.clear()
    s = make_settings(tmp_path, 1, loop_health_callback=f"{__name__}.record_alert")
    report(assess(D, days_before(3), "2", D - timedelta(days=3), 2, 5), s)
    assert ALERTS == []
    prom = (s.home_abs / "metrics" / METRICS_FILE).read_text()
    assert "flywheel_loop_nights_without_training 3.0" in prom and "flywheel_loop_health_status 1.0" in prom
    with caplog.at_level(logging.ERROR, "flywheel.loop_health"):
        report(assess(D, days_before(6), "2", D - timedelta(days=6), 2, 5), s, {"day": str(D)})
    assert len(ALERTS) == 1 and ALERTS[0]["loop_health"]["nights_without_training"] == 6 and ALERTS[0]["day"]
    assert "loop health fail" in caplog.text
    assert "flywheel_loop_health_status 2.0" in (s.home_abs / "metrics" / METRICS_FILE).read_text()


def test_default_hook_logs_an_error_and_a_broken_hook_does_not_hide_the_failure(tmp_path, caplog):
    failing = assess(D, days_before(9), "2", D - timedelta(days=9), 2, 5)
    with caplog.at_level(logging.ERROR, "flywheel.loop_health"):
        report(failing, make_settings(tmp_path / "a", 1))
    assert "LOOP HEALTH FAILURE" in caplog.text and "9 nights without training" in caplog.text
    with pytest.raises(ValueError, match="FLYWHEEL_LOOP_HEALTH__CALLBACK.*no.such"):
        callback(make_settings(tmp_path / "b", 1, loop_health_callback="no.such.hook"))
    caplog.clear()
    with caplog.at_level(logging.ERROR, "flywheel.loop_health"):
        report(failing, make_settings(tmp_path / "b", 1, loop_health_callback="no.such.hook"))
    assert "alert hook no.such.hook failed" in caplog.text and "9 nights" in caplog.text


def test_data_age_of_a_model_version():
    now = datetime(2026, 6, 12, 6, 0, tzinfo=UTC)
    assert data_age_s({Tag.DAY: "2026-06-10"}, now) == pytest.approx(30 * 3600)  # data ended 06-11 00:00
    assert data_age_s({}, now) is None
