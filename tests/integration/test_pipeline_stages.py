"""The nightly stages in-process against a real MLflow server, on the second spec (loans): nothing in the code
knows these column names."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from feature_store.log_schema import FEEDBACK, PREDICTIONS, feedback_schema, prediction_schema
from pipeline import registry
from pipeline.errors import GateFailed, NoDataError
from pipeline.runtime import runtime
from pipeline.stages.bootstrap import bootstrap
from pipeline.stages.collect import collect
from pipeline.stages.nightly import run_nightly
from pipeline.stages.validate import QUARANTINE, VALIDATED, validate
from pipeline.tags import Alias, Tag
from serving.log_sink import SegmentLog
from tests.helpers import LOANS_SPEC, loans_frame

pytestmark = pytest.mark.integration
DAY = date(2026, 3, 10)


def log_day(rt, frame: pd.DataFrame, label_delay=timedelta(hours=5), lost_every=10, late_every=13,
            replay: bool = False) -> dict:
    """Write a day as the server would: prediction rows with scores, then feedback through the log sink.
    Every `lost_every`-th label never arrives; every `late_every`-th arrives after the 2-day window."""
    spec = rt.spec
    ps, fs = prediction_schema(spec), feedback_schema()
    preds = SegmentLog("predictions", ps, rt.settings.spool_dir, rt.lake, PREDICTIONS, (spec.event_time,))
    fb = SegmentLog("feedback", fs, rt.settings.spool_dir, rt.lake, FEEDBACK, ("label_time", "received_at"))
    n = len(frame)
    ids = [uuid.uuid4().hex for _ in range(n)]
    events = frame[spec.event_time].tolist()
    now = datetime.now(UTC)
    served = [now + timedelta(milliseconds=i) for i in range(n)] if replay else events
    cols = {"request_id": ids, "row": [0] * n, "served_at": served, spec.event_time: events,
            "model_version": ["1"] * n, "score": [0.3] * n, **{c: frame[c].tolist() for c in spec.feature_names}}
    preds.append(pa.RecordBatch.from_pydict(cols, schema=ps))
    keep = [i for i in range(n) if i % lost_every]
    when = [events[i] + (spec.label.attribution_window + timedelta(hours=1) if i % late_every == 0 else label_delay)
            for i in keep]
    received = [served[i] + (w - events[i]) for i, w in zip(keep, when, strict=True)]
    fb.append(pa.RecordBatch.from_pydict({
        "request_id": [ids[i] for i in keep], "row": [0] * len(keep),
        "label": [float(frame.defaulted.iloc[i]) for i in keep],
        "label_time": [None] * len(keep) if replay else when, "received_at": received,
    }, schema=fs))
    preds.seal()
    fb.seal()
    in_window = sum(1 for i in keep if i % late_every)
    return {"ids": ids, "in_window": in_window}


@pytest.fixture
def rt(settings_factory, tmp_path):
    s = settings_factory(spec_path=LOANS_SPEC, epochs=3, batch_size=64, max_auc_regression=0.5)
    r = runtime(s)
    history = pd.concat([loans_frame(DAY - timedelta(days=d), 400, seed=1) for d in (3, 2, 1)])
    path = tmp_path / "history.parquet"
    history.to_parquet(path)
    boot = bootstrap(path, r)
    assert boot.version == "1" and boot.rows == 1200 and boot.rejected == 0
    return r


def test_nightly_on_second_spec_collects_quarantines_trains_registers_idempotently(rt):
    frame = loans_frame(DAY, 500, seed=2)
    frame.loc[frame.index[:4], "amount"] = -5.0  # bad rows: negative amounts
    frame.loc[frame.index[5:10], "region"] = "r-brand-new"
    logged = log_day(rt, frame)

    out = run_nightly(DAY, rt)
    assert out["collect"]["rows"] == logged["in_window"]  # missing: drop -> lost and late labels dropped
    assert out["collect"]["dropped_unlabeled"] == 500 - logged["in_window"]
    q = rt.lake.read_partition(QUARANTINE, DAY).to_pandas()
    assert len(q) >= 1 and (q.amount < 0).all() and q.reason.str.contains("amount").all()
    assert out["validate"]["quarantined"] == len(q)
    report_dir = rt.settings.reports_dir / "validation" / f"dt={DAY}"
    assert out["validate"]["report"] == str(report_dir / "index.html") and Path(out["validate"]["data_docs"]).is_file()
    assert rt.lake.read_manifest("drift", DAY) is not None
    # no collected day before this one, but the champion's vocabulary (what bootstrap saw) is the reference
    assert out["validate"]["unseen_reference"] == ["champion v1"]
    validated = rt.lake.read_partition(VALIDATED, DAY).to_pandas()
    assert out["validate"]["unseen_category_share"]["region"] == pytest.approx(5 / len(validated), abs=0.01)
    assert (validated.amount >= 0).all() and len(validated) + len(q) == out["collect"]["rows"]

    client = rt.client()
    v2 = registry.get_version(client, rt.model_name, out["register"]["version"])
    assert v2.version == "2"
    assert v2.tags[Tag.PARENT] == "1" and v2.tags[Tag.DAY] == DAY.isoformat()
    assert v2.tags["flywheel.gate_passed"] == "true"
    assert registry.get_alias(client, rt.model_name, Alias.CHAMPION).version == "2"
    assert registry.get_alias(client, rt.model_name, Alias.PREVIOUS).version == "1"
    assert out["train"]["new_vocab"]["region"] == 1  # the new region got its own embedding row

    before = rt.lake.read_partition("training", DAY).to_pandas()
    again = run_nightly(DAY, rt)
    assert again["register"]["version"] == "2" and again["train"]["reused"]
    pd.testing.assert_frame_equal(rt.lake.read_partition("training", DAY).to_pandas(), before)
    versions = client.search_model_versions(f"name = '{rt.model_name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]


def test_day_without_logs_refuses_to_train(rt):
    with pytest.raises(NoDataError, match="no prediction log for 2026-03-20"):
        collect(date(2026, 3, 20), rt)


def test_gate_blocks_a_mostly_bad_day_but_keeps_its_rows(rt):
    frame = loans_frame(DAY, 300, seed=3)
    frame.loc[frame.index[::2], "tenure_months"] = 9999.0
    log_day(rt, frame)
    collected = collect(DAY, rt)
    with pytest.raises(GateFailed, match="quarantined, above max_bad_fraction"):
        validate(DAY, rt)
    q = rt.lake.read_partition(QUARANTINE, DAY)
    assert q.num_rows >= 100 and rt.lake.read_manifest(VALIDATED, DAY) is None
    assert q.num_rows < collected.rows


def test_replayed_history_with_untimed_feedback_keeps_real_label_delays(rt):
    """A historical day replayed through the API today: rows carry their old event time, feedback carries no
    time of its own. Delays are then measured on the server's clock, so in-window labels still count."""
    frame = loans_frame(DAY, 300, seed=4)
    logged = log_day(rt, frame, replay=True)
    result = collect(DAY, rt)
    assert result.rows == logged["in_window"] and result.feedback_segments >= 1
    training = rt.lake.read_partition("training", DAY).to_pandas()
    assert (training.applied_at.dt.date == DAY).all()
    assert training.defaulted.sum() == sum(frame.defaulted.iloc[i] for i in range(300) if i % 10 and i % 13)


def test_a_night_also_learns_from_the_rows_the_night_before_held_out(rt):
    """Night D judges with its newest rows (validation slice, holdout) and never trains on them; night D+1
    does: a region that only D's newest rows brought gets its embedding row then, counted as carried rows."""
    first = loans_frame(DAY, 500, seed=5)
    first.loc[first.index[-12:], "region"] = "r-only-late-on-day-one"  # in day one's holdout
    log_day(rt, first)
    one = run_nightly(DAY, rt)
    assert one["train"]["carried_rows"] == 0 and "region" not in {k for k, v in one["train"]["new_vocab"].items() if v}

    log_day(rt, loans_frame(DAY + timedelta(days=1), 500, seed=6))
    two = run_nightly(DAY + timedelta(days=1), rt)
    n = len(rt.lake.read_partition(VALIDATED, DAY))
    train_rows = round(n * (1 - rt.settings.training.holdout_fraction))
    cut = round(train_rows * (1 - rt.settings.training.validation_fraction))
    assert two["train"]["carried_from"] == DAY.isoformat() and two["train"]["carried_rows"] == n - cut
    assert two["train"]["new_vocab"]["region"] == 1
    run = rt.client().get_run(two["train"]["run_id"])
    assert run.data.params["carried_rows"] == str(n - cut) and run.data.tags[Tag.DATA_DIGEST].count("+") == 1


def test_a_night_after_a_held_night_learns_what_the_held_candidate_learned(rt, settings_factory):
    """Day one's candidate was not promoted (here: review mode, no reviewer), so the champion never trained on
    day one: night two trains on all of day one, not only its held-out rows. (After a promotion a night
    carries only the held-out rows: the test above.)"""
    review = runtime(settings_factory(spec_path=LOANS_SPEC, epochs=3, batch_size=64, model_name=rt.model_name,
                                      promotion_mode="review", approval_timeout_s=0.2, approval_poll_interval_s=0.05))
    log_day(rt, loans_frame(DAY, 400, seed=5))
    assert run_nightly(DAY, review)["promote"]["promoted"] is False

    day_two = DAY + timedelta(days=1)
    log_day(rt, loans_frame(day_two, 400, seed=6))
    two = run_nightly(day_two, rt)
    assert two["train"]["parent_version"] == "1" and two["train"]["carried_from"] == DAY.isoformat()
    assert two["train"]["carried_rows"] == len(rt.lake.read_partition(VALIDATED, DAY))


def test_a_night_after_a_rollback_does_not_learn_again_what_live_traffic_rejected(rt, settings_factory):
    """Day one's model was promoted, then rolled back (it did worse live): the champion is the bootstrap model
    again, which never trained on day one, yet night two leaves day one out instead of learning it again."""
    lenient = runtime(settings_factory(spec_path=LOANS_SPEC, epochs=3, batch_size=64, max_auc_regression=0.5,
                                       model_name=rt.model_name, gate_on_inconclusive="pass"))
    log_day(rt, loans_frame(DAY, 400, seed=5))
    one = run_nightly(DAY, lenient)
    assert one["promote"]["promoted"] is True
    registry.restore_previous(rt.client(), rt.model_name, "worse on live traffic", "test", automatic=True)

    day_two = DAY + timedelta(days=1)
    log_day(rt, loans_frame(day_two, 400, seed=6))
    two = run_nightly(day_two, rt)
    assert two["train"]["parent_version"] == "1"
    assert two["train"]["carried_rows"] == 0 and two["train"]["carried_from"] is None
