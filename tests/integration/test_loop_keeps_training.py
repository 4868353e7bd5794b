"""The freeze case of issue 13, end to end: on a stream where most rows each day come from new customers with
branches of their own, the nightly stages (collect, validate, train, evaluate, register, promote) against a real
MLflow server keep training every day. Before the fix the validation gate failed every day after the first,
because the new customers' branches counted as unseen categories against validated days only."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pandas as pd
import pyarrow as pa
import pytest

from feature_store.log_schema import FEEDBACK, PREDICTIONS, feedback_schema, prediction_schema
from pipeline import registry
from pipeline.runtime import runtime
from pipeline.stages.bootstrap import bootstrap
from pipeline.stages.nightly import loop_health, run_nightly
from pipeline.tags import Alias
from serving.log_sink import SegmentLog
from tests.churn_stream import CHURN_SPEC, START, churn_day

pytestmark = [pytest.mark.integration, pytest.mark.slow]
HISTORY_DAYS, STREAM_DAYS = 3, 4


def log_day(rt, frame: pd.DataFrame) -> None:
    """Prediction rows and their feedback (5 minutes later) as the server's log sink writes them."""
    spec = rt.spec
    ps, fs = prediction_schema(spec), feedback_schema()
    preds = SegmentLog("predictions", ps, rt.settings.spool_dir, rt.lake, PREDICTIONS, (spec.event_time,))
    fb = SegmentLog("feedback", fs, rt.settings.spool_dir, rt.lake, FEEDBACK, ("label_time", "received_at"))
    n = len(frame)
    ids = [uuid.uuid4().hex for _ in range(n)]
    events = frame[spec.event_time].tolist()
    preds.append(pa.RecordBatch.from_pydict({
        "request_id": ids, "row": [0] * n, "served_at": events, spec.event_time: events,
        "model_version": ["1"] * n, "score": [0.3] * n, **{c: frame[c].tolist() for c in spec.feature_names}},
        schema=ps))
    labelled = [e + timedelta(minutes=5) for e in events]
    fb.append(pa.RecordBatch.from_pydict({
        "request_id": ids, "row": [0] * n, "label": frame[spec.label.name].astype(float).tolist(),
        "label_time": labelled, "received_at": labelled}, schema=fs))
    preds.seal()
    fb.seal()


def test_entity_churn_does_not_freeze_the_loop(settings_factory, tmp_path):
    rt = runtime(settings_factory(spec_path=CHURN_SPEC, epochs=2, batch_size=64, min_rows=100,
                                  collect_flushes_server=False, validation_suite_path=None))
    history = pd.concat([churn_day(k) for k in range(HISTORY_DAYS)])
    path = tmp_path / "history.parquet"
    history.to_parquet(path)
    assert bootstrap(path, rt).version == "1"

    trained, versions = [], []
    for k in range(HISTORY_DAYS, HISTORY_DAYS + STREAM_DAYS):
        day = START + timedelta(days=k)
        frame = churn_day(k)
        seen_branches = set(history.branch) | {b for j in range(HISTORY_DAYS, k) for b in churn_day(j).branch}
        # the stream really churns: most rows carry a branch no earlier day had
        assert (~frame.branch.isin(seen_branches)).mean() > rt.settings.validation.unseen_category_share
        log_day(rt, frame)
        out = run_nightly(day, rt)
        v = out["validate"]
        assert v["passed"] and v["unseen_category_share"]["branch"] < rt.settings.validation.unseen_category_share
        assert "champion v" in v["unseen_reference"][0]
        if k > HISTORY_DAYS:
            assert any(s.startswith("collected days") for s in v["unseen_reference"])
        trained.append(out["train"]["run_id"])
        versions.append(out["register"]["version"])
        health = out["loop_health"]
        assert health["nights_without_training"] == 0 and health["status"] in ("ok", "warn"), health
    assert len(set(trained)) == STREAM_DAYS  # a training run every day
    assert versions == [str(v) for v in range(2, 2 + STREAM_DAYS)]
    champion = registry.get_alias(rt.client(), rt.model_name, Alias.CHAMPION)
    assert champion is not None and int(champion.version) > 1
    later = loop_health(START + timedelta(days=HISTORY_DAYS + STREAM_DAYS + 5), rt)  # five nights with no run
    assert later.status == "fail" and later.nights_without_training == 6


def test_small_days_are_pooled_until_a_night_has_min_rows(settings_factory, tmp_path):
    """A stream of a few dozen rows a day. Each small day passes validation (its row-count and label-rate rules
    are reported, not gated), the night waits (train and what follows are skipped, not failed) until the days
    since the champion's data add up to `min_rows`, then trains on them together and is judged on the newest
    rows of all of them. Before, the row-count rule failed every such day and the loop never trained again."""
    per_day, min_rows = 45, 120
    rt = runtime(settings_factory(spec_path=CHURN_SPEC, epochs=2, batch_size=64, min_rows=min_rows,
                                  collect_flushes_server=False, validation_suite_path=None))
    history = pd.concat([churn_day(k) for k in range(HISTORY_DAYS)])
    path = tmp_path / "history.parquet"
    history.to_parquet(path)
    assert bootstrap(path, rt).version == "1"

    days = [START + timedelta(days=HISTORY_DAYS + i) for i in range(3)]
    outs = []
    for i, day in enumerate(days):
        log_day(rt, churn_day(HISTORY_DAYS + i).iloc[::13].head(per_day))
        outs.append(run_nightly(day, rt))
    for out in outs[:2]:
        v = out["validate"]
        assert v["passed"] and v["good"] == per_day
        assert any(w.startswith(f"small day: {per_day} labeled rows") for w in v["warnings"]), v["warnings"]
        assert "min_rows=120" in out["train"]["skipped"] and "not training tonight" in out["train"]["skipped"]
        assert all(out[s]["skipped"].startswith("nothing to train tonight (train)") for s in ("evaluate", "register", "promote"))
    assert f"{2 * per_day} labeled rows" in outs[1]["train"]["skipped"]
    assert outs[1]["loop_health"]["nights_without_training"] == 2
    assert [o["loop_health"]["waiting_rows"] for o in outs[:2]] == [per_day, 2 * per_day]  # waiting, not stuck
    assert outs[1]["loop_health"]["status"] == "warn" and "not stuck" in outs[1]["loop_health"]["message"]

    third = outs[2]
    pooled = [d.isoformat() for d in days]
    assert third["train"]["pooled_days"] == pooled
    assert third["train"]["train_rows"] + third["train"]["holdout_rows"] == 3 * per_day
    ev = third["evaluate"]
    assert ev["holdout_days"] == pooled and ev["holdout_rows"] == third["train"]["holdout_rows"]
    assert ev["holdout_rows"] > per_day * rt.settings.training.holdout_fraction * 2  # not the last day's alone
    assert third["register"]["version"] == "2"
    assert third["loop_health"]["nights_without_training"] == 0

    again = run_nightly(days[2], rt)  # idempotent: the same pooled night is found, not trained twice
    assert again["train"]["reused"] and again["train"]["run_id"] == third["train"]["run_id"]
    assert again["train"]["pooled_days"] == pooled
