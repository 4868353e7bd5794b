"""Online evaluation against a real MLflow server: a promoted champion that is worse than the one it replaced
on the rows it actually served is rolled back automatically; too few labels means waiting; a good one stays."""

from __future__ import annotations

import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline import registry
from pipeline.learn.model import ModelBundle
from pipeline.release.online_eval import online_eval
from pipeline.runtime import runtime
from pipeline.stages.bootstrap import bootstrap
from pipeline.stages.train import experiment
from pipeline.tags import Alias, Tag
from tests.helpers import LOANS_SPEC, loans_frame

pytestmark = pytest.mark.integration
DAY = date(2026, 3, 10)


@pytest.fixture
def rt(settings_factory, tmp_path):
    r = runtime(settings_factory(spec_path=LOANS_SPEC, batch_size=64, bootstrap_min_steps=0, bootstrap_epochs=6,
                                 online_min_rows=400, online_min_positives=20, bootstrap_samples=200))
    history = pd.concat([loans_frame(DAY - timedelta(days=d), 400, seed=1) for d in (3, 2, 1)])
    path = tmp_path / "history.parquet"
    history.to_parquet(path)
    assert bootstrap(path, r).version == "1"
    return r


def register_bundle(rt, bundle: ModelBundle) -> str:
    """Register `bundle` as a child of v1 that passed its offline gate; returns the new version."""
    experiment(rt)
    with mlflow.start_run() as run, tempfile.TemporaryDirectory() as tmp:
        registry.log_bundle(bundle, rt.spec, Path(tmp))
    mv = registry.register(rt.client(), rt.model_name, run.info.run_id, {Tag.PARENT: "1",
                                                                          "flywheel.gate_passed": "true"})
    return mv.version


def promote_bundle(rt, bundle: ModelBundle) -> str:
    """Register `bundle` and make it champion (v1 becomes previous)."""
    version = register_bundle(rt, bundle)
    registry.move_champion(rt.client(), rt.model_name, version, "1", "test")
    return version


def serve_day(rt, bundle: ModelBundle, version: str, n: int, old_rows: int = 200) -> None:
    """training/dt=DAY as collect writes it: rows served by `version` (with its scores) after `old_rows`
    served by v1 earlier in the day, each with its label."""
    frame = loans_frame(DAY, n + old_rows, seed=9)
    v1 = registry.load_version(rt.client(), rt.model_name, "1", rt.cache_dir)
    scores = np.concatenate([v1.predict(frame.iloc[:old_rows]), bundle.predict(frame.iloc[old_rows:])])
    frame = frame.assign(request_id=[uuid.uuid4().hex for _ in range(len(frame))], row=0,
                         served_at=frame.applied_at, model_version=["1"] * old_rows + [version] * n, score=scores,
                         defaulted=frame.defaulted.astype(float))
    rt.lake.write_partition("training", DAY, pa.Table.from_pandas(frame, preserve_index=False))


def degraded(rt) -> ModelBundle:
    """A champion broken the ways a bad export breaks one: shifted numerics, misaligned ids, inverted output."""
    b = registry.load_version(rt.client(), rt.model_name, "1", rt.cache_dir)
    b.norm = {k: (m + 3 * s, s) for k, (m, s) in b.norm.items()}  # a feature-pipeline bug: numerics shifted
    for v in b.vocabs.values():  # and categories mapped to the wrong embedding rows
        ids = list(v.ids.values())
        v.ids = dict(zip(v.ids, ids[1:] + ids[:1], strict=True))
    import torch

    with torch.no_grad():  # and the output sign flipped (a label-inverted export): confident and wrong
        for t in (b.net.mlp[-1].weight, b.net.mlp[-1].bias, *(e.weight for e in b.net.biases)):
            t.neg_()
    return b


def test_a_degraded_champion_is_rolled_back_once_labels_arrive(rt):
    bad = degraded(rt)
    v2 = promote_bundle(rt, bad)
    serve_day(rt, bad, v2, 1500)
    result = online_eval(DAY, rt)
    assert result.decision == "rolled_back", result.reason
    assert result.rows == 1500 and result.auc_diff.estimate < 0
    margin = rt.settings.online_eval.max_logloss_regression * result.previous_metrics["logloss"]
    assert result.logloss_diff.low > margin  # confidently worse beyond the declared margin, not by noise
    client = rt.client()
    assert registry.get_alias(client, rt.model_name, Alias.CHAMPION).version == "1"
    tags = registry.get_version(client, rt.model_name, v2).tags
    assert tags[Tag.ROLLED_BACK] == "true" and tags["flywheel.rollback_by"] == "online_eval"
    assert tags[Tag.ONLINE_EVAL].startswith("rolled_back: online evaluation")
    # nothing left to compare with: the next hourly run does not flip back
    assert online_eval(DAY, rt).decision == "no_baseline"


def test_too_few_labels_waits_and_a_sound_champion_stays(rt):
    v1 = registry.load_version(rt.client(), rt.model_name, "1", rt.cache_dir)
    v2 = promote_bundle(rt, v1)  # same weights: no worse
    serve_day(rt, v1, v2, 150)
    waiting = online_eval(DAY, rt)
    assert waiting.decision == "wait" and waiting.rows == 150 and "need 400 rows" in waiting.reason
    serve_day(rt, v1, v2, 1500)
    kept = online_eval(DAY, rt)
    assert kept.decision == "keep", kept.reason
    assert kept.auc_diff.estimate == pytest.approx(0.0, abs=1e-9)
    client = rt.client()
    assert registry.get_alias(client, rt.model_name, Alias.CHAMPION).version == v2
    assert registry.get_version(client, rt.model_name, v2).tags[Tag.ONLINE_EVAL].startswith("keep:")


@contextmanager
def degraded_release(tmp_path, rows_per_day: int):
    """Its own MLflow and model server, a champion bootstrapped from the simulator, and a degraded v2 promoted
    and served: yields (simulator, settings, runtime, server URL, the degraded bundle, its version, when it was
    released)."""
    from pipeline.demo.simulate import Simulator
    from pipeline.ops import stack
    from pipeline.stages.promote import rollout
    from tests.helpers import free_port, make_settings

    sim = Simulator(seed=5, rows_per_day=rows_per_day, horizon_days=10)
    s = make_settings(tmp_path / "home", free_port(), online_min_rows=400, online_min_positives=10,
                      bootstrap_samples=200)
    try:
        stack.start_mlflow(s)
        r = runtime(s)
        sim.history(3).to_parquet(tmp_path / "history.parquet")
        bootstrap(tmp_path / "history.parquet", r)
        stack.start_server(s)
        released, bad = time.monotonic(), degraded(r)
        v2 = promote_bundle(r, bad)
        assert rollout(r).served_version == v2
        yield sim, s, r, s.resolved_serving_url(), bad, v2, released
    finally:
        stack.stop_all(s)


@pytest.mark.slow
def test_degraded_rollout_under_live_traffic_is_rolled_back_without_a_person_or_a_failed_request(tmp_path):
    """Real model server and HTTP traffic: a degraded v2 becomes champion and serves a day; once that day's
    labels are collected, online evaluation rolls it back and the server swaps back to v1 while traffic flows."""
    import threading

    import httpx

    from pipeline.demo.traffic import send_day
    from pipeline.stages.collect import collect, flush_server
    from pipeline.stages.promote import rollout

    with degraded_release(tmp_path, rows_per_day=1500) as (sim, s, r, url, bad, v2, _):
        day = sim.day_date(3)
        sent = send_day(url, sim.day(3), r.spec.feature_names)
        flush_server(url, s.resolved_admin_token())
        assert sent.errors == 0 and set(sent.served.model_version) == {v2}
        assert np.allclose(bad.predict(sent.served[r.spec.feature_names]), sent.served.score, atol=1e-6)
        collect(day, r)

        stop, during = threading.Event(), []

        def traffic() -> None:  # keeps requests flowing across the decision and the server's swap
            live = sim.day(4)
            while not stop.is_set():
                for start in range(0, len(live), 100):
                    during.append(send_day(url, live.iloc[start:start + 100], r.spec.feature_names))
                    if stop.is_set():
                        return

        background = threading.Thread(target=traffic)
        background.start()
        result = online_eval(day, r)
        assert result.decision == "rolled_back", result.reason
        assert rollout(r).served_version == "1"
        during.append(send_day(url, sim.day(4).head(100), r.spec.feature_names))
        stop.set()
        background.join()
        versions = set().union(*(set(t.served.model_version) for t in during))
        assert sum(t.errors for t in during) == 0 and versions == {v2, "1"}  # swapped under load, none failed
        assert httpx.get(f"{url}/health").json()["model_version"] == "1"
        assert registry.get_version(r.client(), r.model_name, v2).tags[Tag.ROLLED_BACK] == "true"


def test_a_day_not_collected_yet_is_judged_from_its_sealed_logs_and_arrived_feedback(rt):
    """The hourly run reads logs/predictions/dt=D and logs/feedback directly when training/dt=D does not exist:
    only rows whose label is known count (feedback arrived; the loans spec drops unlabelled rows)."""
    from feature_store.log_schema import FEEDBACK, PREDICTIONS, feedback_schema, prediction_schema
    from feature_store.offline import Lake
    from pipeline.release.online_eval import served_rows

    bad = degraded(rt)
    v2 = promote_bundle(rt, bad)
    frame = loans_frame(DAY, 1500, seed=9)
    served_at = pd.Timestamp(DAY, tz="UTC") + pd.Timedelta(hours=1)
    preds = frame.assign(request_id=[uuid.uuid4().hex for _ in range(len(frame))], row=0, served_at=served_at,
                         model_version=v2, score=bad.predict(frame))
    table = pa.Table.from_pandas(preds[prediction_schema(rt.spec).names], schema=prediction_schema(rt.spec),
                                 preserve_index=False)
    for i, start in enumerate(range(0, len(preds), 500)):  # three sealed segments, as the server writes them
        rt.lake.write_file_atomic(rt.lake.path(PREDICTIONS, f"dt={DAY}", f"seg-{i}.parquet"),
                                  Lake.parquet_bytes(table.slice(start, 500)))
    fb = preds.iloc[:1400]  # feedback for all but the last 100 rows has arrived (the loans spec drops the rest)
    feedback = pa.Table.from_pandas(pd.DataFrame({
        "request_id": fb.request_id, "row": fb.row.astype("int32"), "label": fb.defaulted.astype(float),
        "label_time": fb.applied_at + pd.Timedelta(hours=1), "received_at": fb.applied_at + pd.Timedelta(hours=1)}),
        schema=feedback_schema(), preserve_index=False)
    rt.lake.write_file_atomic(rt.lake.path(FEEDBACK, f"dt={DAY}", "seg-0.parquet"), Lake.parquet_bytes(feedback))
    assert rt.lake.read_manifest("training", DAY) is None
    rows = served_rows(rt, [DAY], v2)
    assert len(rows) == 1400 and rows.defaulted.sum() == fb.defaulted.sum()
    result = online_eval(DAY, rt)
    assert result.decision == "rolled_back", result.reason
    assert registry.get_alias(rt.client(), rt.model_name, Alias.CHAMPION).version == "1"


@pytest.mark.slow
def test_time_from_a_bad_release_to_rollback_under_labelled_live_traffic(tmp_path):
    """Real server, real HTTP traffic with feedback, nothing collected: a sign-flipped release is rolled back by
    the first hourly evaluation that has enough labels. Measures rows and seconds from release to rollback."""
    from pipeline.demo.traffic import send_day
    from pipeline.stages.collect import flush_server
    from pipeline.stages.promote import rollout

    with degraded_release(tmp_path, rows_per_day=2000) as (sim, s, r, url, _, v2, released):
        day, live = sim.day_date(3), sim.day(3)
        sent, evaluations, result = 0, 0, None
        for start in range(0, len(live), 200):  # each step stands for a slice of an hour's labelled traffic
            traffic = send_day(url, live.iloc[start:start + 200], r.spec.feature_names)
            assert traffic.errors == 0
            sent += traffic.rows
            flush_server(url, s.resolved_admin_token())  # the server seals its spools every few seconds on its own
            result, evaluations = online_eval(day, r), evaluations + 1
            if result.decision != "wait":
                break
        elapsed = time.monotonic() - released
        assert result is not None and result.decision == "rolled_back", result
        assert r.lake.read_manifest("training", day) is None  # judged before any collection
        assert rollout(r).served_version == "1"
        print(f"\nbad release -> rollback: {sent} live rows sent, {result.rows} labelled rows judged, "
              f"{evaluations} evaluations, {elapsed:.1f}s wall (plus up to one online_eval_schedule period)")
